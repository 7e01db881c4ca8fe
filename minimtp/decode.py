"""Speculative decoding of one sequence, in one screen: the algorithm the batched :class:`~minimtp.engine.Engine` runs.

Each round: the assistant drafts n ≤ k tokens at the constant position p, the target scores the pending token and
the drafts in one forward pass (n+1 rows), the verification rule accepts a prefix and adds one token (the correction
at the first rejection, or the bonus), and the cache rolls back to what was accepted. The output has exactly the
distribution of plain decoding (docs: concepts/speculative-decoding); with the same seed it is token for token what
``Engine.generate([prompt], ...)`` returns (tests/test_decode.py).
"""

from __future__ import annotations

import torch

from minimtp.attention import DraftPagedContext, PagedContext, paged_attention
from minimtp.kv_cache import KVCache
from minimtp.sampling import SamplingParams, draw_exponentials, draw_uniforms, make_generators, process_logits, sample
from minimtp.speculative import verify, verify_greedy


@torch.inference_mode()
def speculative_decode(
    target,
    assistant,
    prompt: list[int],
    max_new_tokens: int = 64,
    k: int = 4,
    *,
    temperature: float = 0.0,
    top_k=None,
    top_p=None,
    min_p=None,
    seed: int | None = None,
    draft_mode: str = "argmax",
    stop_token_ids=None,
) -> list[int]:
    params = SamplingParams(temperature, top_k, top_p, min_p).validate()
    gen = make_generators(seed, 1)  # a list of one: the draws take a generator per row
    V = target.config.vocab_size
    stops = set(target.config.eos_token_ids if stop_token_ids is None else stop_token_ids)
    keep = max(target.config.sliding_window, assistant.config.text.sliding_window + 1)  # sliding keys still seen
    dtype = target.model.embed_tokens.weight.dtype
    cache = KVCache.for_requests(target.config, [len(prompt)], max_new_tokens, k, keep, dtype=dtype)
    cache.add(0)

    def target_forward(tokens: list[int], start: int, prefill=False):  # K/V of positions start.. into the cache
        cache.reserve(0, start + len(tokens))
        ctx = PagedContext(cache, paged_attention, [0], [start], [len(tokens)])
        forward = target.prefill if prefill else target.run  # the prefill's logits: the last row only
        return forward(torch.tensor(tokens), torch.arange(start, start + len(tokens)), ctx)

    def pick(logits):  # plain decoding's draw from the processed distribution p
        probs = process_logits(logits, params)
        return probs.argmax(-1) if params.is_greedy else sample(probs, draw_exponentials(gen, V))

    first = target_forward(prompt, 0, prefill=True)
    cache.trim_window(0, len(prompt))
    p = len(prompt)  # the position of the pending token: the cache holds positions < p
    hidden = first.hidden[-1:]
    out = [int(pick(first.logits[-1:]))]
    while len(out) < max_new_tokens and out[-1] not in stops:
        n = min(k, max_new_tokens - len(out) - 1)  # never draft past the budget
        # 1. draft n tokens, every step at position p (the pending token's), reading the target's K/V at < p
        ctx = DraftPagedContext(cache, assistant.config.text, paged_attention, [0], [p])
        last = torch.tensor(out[-1:])
        h = hidden
        drafts = []
        qs = []
        for _ in range(n):
            logits, h = assistant.step(target.embed(last), h, torch.tensor([p]), ctx)
            if draft_mode == "sample" and not params.is_greedy:  # x ~ q' (the processed drafter distribution)
                qs.append(process_logits(logits, params))
                last = sample(qs[-1], draw_exponentials(gen, V))
            else:  # x = argmax q: verified with the one-hot rule
                last = logits.float().argmax(-1)
            drafts.append(int(last))
        # 2. verify: one target forward over [pending, d_1 .. d_n] at positions p .. p+n
        res = target_forward(out[-1:] + drafts, p)
        d = torch.tensor([drafts], dtype=torch.long)
        num = torch.tensor([n])
        # 3. accept a prefix, then one more token: the correction at the first rejection, or the bonus
        if params.is_greedy:
            ids, n_emit = verify_greedy(res.logits[None], d, num)
        else:
            probs = process_logits(res.logits, params)[None]
            q = torch.stack(qs, 1) if qs else None
            ids, n_emit = verify(probs, d, q, num, draw_uniforms(gen, k)[:, :n], draw_exponentials(gen, V))
        accepted = int(n_emit) - 1
        # 4. roll back: the pending token and the accepted drafts keep their K/V, the rejected ones are dropped
        p += 1 + accepted
        cache.truncate(0, p)
        cache.trim_window(0, p)  # and sliding-window blocks no query can see again are freed
        hidden = res.hidden[accepted : accepted + 1]
        for t in ids[0, : accepted + 1].tolist():  # emit, stopping at a stop token or the budget
            out.append(t)
            if t in stops or len(out) == max_new_tokens:
                break
    return out
