"""The exact distribution of the first m tokens plain decoding samples, by enumerating its support.

    P(y_1 .. y_m | prompt) = prod_i p_i(y_i),   p_i = process_logits(penalties(logits(prompt, y_<i)), settings)

with the penalties of the request applied to the raw logits first (minimtp.controls.penalties: repetition over the
prompt and the generated tokens, presence and frequency over the generated ones), then temperature, top-k, top-p,
min-p (minimtp.sampling). A small top-k keeps the support enumerable: at most k^m sequences (ties with the k-th
logit included). Each level is one batched dense forward of the target over every prefix of that length. The
texts are the pushforward through the tokenizer's ``decode(ids, skip_special_tokens=True)``: sequences that decode
to the same text share a cell, as they must when an endpoint returns text.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from minimtp.controls.penalties import Penalties, apply_penalties
from minimtp.errors import GenerationError
from minimtp.sampling import SamplingParams, process_logits

MAX_SEQUENCES = 50_000  # the most sequences one prompt's support may hold


@torch.inference_mode()
def first_tokens(
    target, prompt: list[int], m: int, params: SamplingParams, penalties: Penalties | None = None
) -> dict[tuple[int, ...], float]:
    """{(y_1 .. y_m): probability} over the whole support of the first m tokens after ``prompt`` (float64)."""
    pen = penalties if penalties is not None and penalties.active else None
    dev = target.model.embed_tokens.weight.device
    level: dict[tuple[int, ...], float] = {(): 1.0}
    prompt_t = torch.tensor(prompt)
    for _ in range(m):
        prefixes = list(level)
        ids = torch.tensor([prompt + list(s) for s in prefixes])
        logits = target(ids.to(dev))[:, -1].double().cpu()
        if pen is not None:
            rows = [
                apply_penalties(logits[b], prompt_t, torch.tensor(s, dtype=torch.long), pen)
                for b, s in enumerate(prefixes)
            ]
            logits = torch.stack(rows)
        probs = process_logits(logits, params)
        nxt: dict[tuple[int, ...], float] = {}
        for b, s in enumerate(prefixes):
            row = probs[b]
            for y in torch.nonzero(row > 0)[:, 0].tolist():
                nxt[s + (y,)] = level[s] * float(row[y])
        if len(nxt) > MAX_SEQUENCES:
            raise GenerationError(
                f"the first {m} tokens have more than {MAX_SEQUENCES} sequences in their support: lower top_k or the "
                "number of tokens"
            )
        level = nxt
    return level


def by_text(dist: dict[tuple[int, ...], float], tokenizer) -> dict[str, float]:
    """The distribution of the decoded texts (special tokens skipped)."""
    out: dict[str, float] = defaultdict(float)
    for ids, p in dist.items():
        out[tokenizer.decode(list(ids), skip_special_tokens=True)] += p
    return dict(out)
