"""The decoding engine: plain and speculative decoding for a batch of ragged prompts over a paged KV cache.

One round for every active sequence b (cache holds positions < p_b; token t_b at p_b is emitted but not yet run;
h_b is the target's post-norm hidden state at p_b - 1):

    draft   k tokens with the assistant at the constant position p_b  (k = 0: plain decoding)
    verify  one target forward on [t_b, d_1 .. d_k] at positions p_b .. p_b + k   (k+1 rows of logits)
    accept  n drafts by the rule of the sampling mode, emit d_1..d_n and one more token (correction or bonus)
    roll back the cache to p_b + n + 1 positions, h_b ← the hidden state of row n, repeat

The emitted sequence has exactly the distribution of plain decoding (docs: concepts/speculative-decoding). The
same round for one sequence, in one screen: :func:`minimtp.decode.speculative_decode`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch.nn.utils.rnn import pad_sequence

from minimtp.attention import DraftPagedContext, PagedContext, get_attention_backend
from minimtp.controls import NO_CONTROLS, Controls, Penalties, make_controls
from minimtp.errors import CompatibilityError, GenerationError, MinimtpError
from minimtp.grammar import grammar_source
from minimtp.kv_cache import KVCache
from minimtp.sampling import SamplingParams, draw_exponentials, draw_uniforms, make_generators, process_logits, sample
from minimtp.stats import Stats
from minimtp.stop_strings import StopStrings, check_stop_strings


@dataclass
class GenerationResult:
    tokens: list[list[int]]  # new tokens per prompt (a stop token that ended a sequence is included)
    finish_reasons: list[str]  # "stop" | "length" | "context"
    stats: Stats
    seq_stats: list[Stats]
    texts: list[str] | None = None  # the continuations, cut at a stop string (when the engine has a tokenizer)
    stop_reasons: list = field(default_factory=list)  # the stop token id or stop string that ended each, else None
    healed_prompts: list[list[int]] | None = None  # the prompts as run, with token healing (last token removed)


@dataclass
class _Seq:
    idx: int
    prompt: list[int]
    out: list[int] = field(default_factory=list)
    cache_len: int = 0  # positions with K/V in the cache
    pending: int = -1  # emitted token at position cache_len, not yet run through the target
    hidden: torch.Tensor | None = None  # target hidden state at cache_len - 1
    done: str | None = None
    stop_reason: int | str | None = None
    stats: Stats = field(default_factory=Stats)


@dataclass
class _Run:
    """The state of one :meth:`Engine.generate` call; the engine itself keeps only models, backends and settings."""

    cache: KVCache
    params: SamplingParams
    k: int  # drafts per round (0: plain decoding)
    draft_mode: str  # "argmax" | "sample"
    gens: list[torch.Generator]  # one per prompt
    stops: set[int]
    max_new: int
    stats: Stats
    on_tokens: Callable | None = None
    controls: list[Controls] = field(default_factory=list)  # one per prompt (penalties, grammar, token healing)
    stop_strings: list[StopStrings | None] = field(default_factory=list)  # one per prompt

    @property
    def controlled(self) -> bool:
        return any(c.active for c in self.controls)

    @property
    def sampled_drafts(self) -> bool:
        return self.draft_mode == "sample" and not self.params.is_greedy


def _verify_backends(name: str):
    if name == "torch":
        from minimtp import speculative

        return speculative.verify, speculative.verify_greedy
    if name == "triton":
        from minimtp.kernels import verify as kv

        return kv.verify, kv.verify_greedy
    raise CompatibilityError(f"verify backend {name!r}: expected 'torch' or 'triton'")


class Engine:
    """Owns the backends and the settings; each :meth:`generate` call builds its own KV pool. ``assistant=None``
    gives plain decoding.

    ``draft_mode="argmax"`` drafts argmax q and verifies with the one-hot rule (accept with p(x): expected
    acceptance p(argmax q)); ``"sample"`` samples drafts from the processed drafter distribution q' and accepts
    with min(1, p/q') (expected acceptance Σ min(p, q')). Both are exact; at temperature 0 both are greedy.
    The models are used as given; ``minimtp.fast.FastEngine`` is this engine with the CPU fast twins.
    """

    draft_context = DraftPagedContext  # how the assistant reads the cache (attention.AttentionContext)
    process_logits = staticmethod(process_logits)  # logits -> the processed distribution p (sampling.py)

    def __init__(
        self,
        target,
        assistant=None,
        *,
        attention_backend: str = "torch",
        verify_backend: str = "torch",
        block_size: int = 16,
        num_blocks: int | None = None,
        draft_mode: str = "argmax",
        tokenizer=None,
    ):
        self.target, self.assistant, self._tokenizer = target, assistant, tokenizer
        self.cfg = target.config
        self.attention = get_attention_backend(attention_backend)
        self.verify, self.verify_greedy = _verify_backends(verify_backend)
        self.attention_backend, self.verify_backend = attention_backend, verify_backend
        if block_size < 1:
            raise GenerationError(f"block_size = {block_size}, expected >= 1")
        self.block_size, self.num_blocks = block_size, num_blocks
        self.draft_mode = _check_draft_mode(draft_mode)
        if assistant is not None:
            from minimtp.assistant import check_pair

            check_pair(self.cfg, assistant.config)
        self.dtype = target.model.embed_tokens.weight.dtype
        self.device = target.model.embed_tokens.weight.device

    @property
    def tokenizer(self):
        """The tokenizer given, else the one in the target's checkpoint directory (for stop strings, grammars and
        token healing; token ids alone need none)."""
        if self._tokenizer is None:
            path = getattr(self.target, "name_or_path", None)
            if path is None:
                raise GenerationError(
                    "stop strings, grammars and token healing need a tokenizer: Engine(..., tokenizer=)"
                )
            from minimtp.generate import load_tokenizer

            self._tokenizer = load_tokenizer(path)
        return self._tokenizer

    def _optional_tokenizer(self):
        try:
            return self.tokenizer
        except MinimtpError:  # in-memory models and directories without tokenizer.json decode no text
            return None

    @property
    def default_num_speculative_tokens(self) -> int:
        n = self.assistant.config.num_assistant_tokens if self.assistant is not None else None
        return n or 6

    def _check_prompts(self, prompts) -> list[list[int]]:
        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise GenerationError("prompts must be a non-empty list of token-id lists")
        if all(isinstance(x, int) for x in prompts):
            raise GenerationError("prompts must be a list of token-id lists, e.g. [[2, 651, 1234]], not a flat list")
        V, out = self.cfg.vocab_size, []
        for b, p in enumerate(prompts):
            if isinstance(p, torch.Tensor):
                p = p.tolist()
            if not isinstance(p, (list, tuple)) or len(p) == 0:
                raise GenerationError(f"prompt {b} is empty (or not a list of token ids)")
            for t in p:
                if isinstance(t, bool) or not isinstance(t, int):
                    raise GenerationError(f"prompt {b}: token id {t!r} is not an integer")
                if not 0 <= t < V:
                    raise GenerationError(f"prompt {b}: token id {t} out of range, expected 0 <= id < vocab_size {V}")
            if len(p) >= self.cfg.max_position_embeddings:
                raise GenerationError(
                    f"prompt {b} has {len(p)} tokens; the context limit (max_position_embeddings) is "
                    f"{self.cfg.max_position_embeddings}"
                )
            out.append(list(p))
        return out

    @torch.inference_mode()
    def generate(
        self,
        prompts,
        max_new_tokens: int = 64,
        num_speculative_tokens: int | None = None,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        min_p: float | None = None,
        seed: int | list[int] | None = None,
        stop_token_ids=None,
        draft_mode: str | None = None,
        use_assistant: bool = True,
        on_tokens=None,
        repetition_penalty: float | None = None,
        presence_penalty: float | None = None,
        frequency_penalty: float | None = None,
        stop: str | list[str] | None = None,
        include_stop_str_in_output: bool = False,
        json_schema=None,
        regex: str | None = None,
        grammar: str | None = None,
        token_healing: bool = False,
    ) -> GenerationResult:
        """Generate up to ``max_new_tokens`` for each prompt (a list of token-id lists).

        ``temperature=0`` is greedy. Stops at any of ``stop_token_ids`` (default: the model's EOS ids), at a
        ``stop`` string, at ``max_new_tokens`` or at the context limit; tokens accepted past a stop are trimmed.
        ``seed``: one int, or one per prompt. Penalties, a grammar (one of ``json_schema``, ``regex``, ``grammar``)
        and ``token_healing`` change p itself, row by row (docs: concepts/controls). ``on_tokens(i, ids)`` is
        called as tokens of prompt i are accepted (streaming)."""
        t0 = time.perf_counter()
        prompts = self._check_prompts(prompts)
        params = SamplingParams(temperature, top_k, top_p, min_p).validate()
        pen = Penalties(*(d if v is None else v for v, d in ((repetition_penalty, 1.0), (presence_penalty, 0.0),
                                                             (frequency_penalty, 0.0)))).validate()  # fmt: skip
        stop_strs, source = check_stop_strings(stop), grammar_source(json_schema, regex, grammar)
        controls, healed = [NO_CONTROLS] * len(prompts), [""] * len(prompts)
        if source is not None or token_healing or pen.active:
            tok = self.tokenizer if source is not None or token_healing else None
            made = make_controls(prompts, tok, self.cfg.vocab_size, self.cfg.eos_token_ids, pen, source, token_healing)
            prompts, controls, healed = (list(x) for x in zip(*made))
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise GenerationError(f"max_new_tokens = {max_new_tokens!r}, expected an integer >= 1")
        k = self.default_num_speculative_tokens if num_speculative_tokens is None else num_speculative_tokens
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise GenerationError(f"num_speculative_tokens = {k!r}, expected an integer >= 1")
        k = k if self.assistant is not None and use_assistant else 0
        mode = _check_draft_mode(self.draft_mode if draft_mode is None else draft_mode)
        # sliding blocks stay while the target (W keys) or the drafter (the last W+1) can still see them
        keep = max(self.cfg.sliding_window, self.assistant.config.text.sliding_window + 1 if self.assistant else 0)
        lens = [len(p) for p in prompts]
        cache = KVCache.for_requests(
            self.cfg, lens, max_new_tokens, k, keep, self.block_size, self.num_blocks, self.dtype, self.device
        )
        stops = set(self.cfg.eos_token_ids if stop_token_ids is None else stop_token_ids)
        gens = make_generators(seed, len(prompts))
        run = _Run(cache, params, k, mode, gens, stops, max_new_tokens, Stats(sum(lens), prefill_steps=1), on_tokens)
        run.controls = controls
        tok = self.tokenizer if stop_strs else self._optional_tokenizer()
        run.stop_strings = [StopStrings(tok, stop_strs, include_stop_str_in_output, h) if stop_strs else None
                            for h in healed]  # fmt: skip
        seqs = [_Seq(i, p) for i, p in enumerate(prompts)]
        self._prefill(run, seqs)
        run.stats.ttft_s = time.perf_counter() - t0
        while active := [s for s in seqs if s.done is None]:
            self._round(run, active)
        run.stats.elapsed_s = time.perf_counter() - t0
        run.stats.generated_tokens = sum(len(s.out) for s in seqs)
        for s in seqs:
            s.stats.ttft_s, s.stats.elapsed_s = run.stats.ttft_s, run.stats.elapsed_s
        texts = None
        if tok is not None:
            texts = [
                (st or StopStrings(tok, [], prefix=h)).cut(s.out) for s, st, h in zip(seqs, run.stop_strings, healed)
            ]
        res = GenerationResult([s.out for s in seqs], [s.done for s in seqs], run.stats, [s.stats for s in seqs], texts)
        res.stop_reasons = [s.stop_reason for s in seqs]
        res.healed_prompts = prompts if token_healing else None
        return res

    def _prefill(self, run: _Run, seqs: list[_Seq]) -> None:
        """Every prompt in one packed forward; the first token from the last row of each."""
        for s in seqs:
            run.cache.add(s.idx)
        out, cu = self._target_forward(run, seqs, [s.prompt for s in seqs])
        rows = [c - 1 for c in cu[1:]]
        logits = _controlled(run, seqs, out.logits[rows][:, None], [[]] * len(seqs), 0, [1] * len(seqs))[:, 0]
        for s, r, t in zip(seqs, rows, self._pick(run, logits)):
            s.cache_len, s.hidden, s.stats.prompt_tokens = len(s.prompt), out.hidden[r], len(s.prompt)
            run.cache.trim_window(s.idx, s.cache_len)
            self._emit(run, s, [t])

    def _round(self, run: _Run, active: list[_Seq]) -> None:
        """Draft, verify, accept, roll back: one round for every active sequence (module docstring)."""
        max_ctx = self.cfg.max_position_embeddings
        # drafts per sequence: never more than the budget left (the round also emits one target token)
        ks = [max(0, min(run.k, run.max_new - len(s.out) - 1, max_ctx - s.cache_len - 2)) for s in active]
        B, K = len(active), max(ks)
        t0 = time.perf_counter()
        drafts, q = self._draft(run, active, ks) if K > 0 else (torch.zeros(B, 0, dtype=torch.long), None)
        drafts_l = drafts.tolist()
        t1 = time.perf_counter()
        out, cu = self._target_forward(run, active, [[s.pending] + drafts_l[b][: ks[b]] for b, s in enumerate(active)])
        run.stats.draft_s += t1 - t0
        run.stats.verify_s += time.perf_counter() - t1
        logits = pad_sequence(list(out.logits.split([kb + 1 for kb in ks])), batch_first=True)  # [B, K+1, V]
        logits = _controlled(run, active, logits, drafts_l, 0, [kb + 1 for kb in ks])  # row j: after d_1..d_j
        num_drafts = torch.tensor(ks, dtype=torch.long)
        if run.params.is_greedy:
            ids, n_emit = self.verify_greedy(logits, drafts, num_drafts)
        else:
            g, V = [run.gens[s.idx] for s in active], logits.shape[-1]
            probs = self.process_logits(logits.view(B * (K + 1), V), run.params).view(B, K + 1, V)
            u = draw_uniforms(g, run.k)[:, :K]  # k draws whatever the round's K: streams independent of batchmates
            ids, n_emit = self.verify(probs, drafts, q, num_drafts, u, draw_exponentials(g, V))
        ids_l, n_l = ids.tolist(), n_emit.tolist()
        for b, s in enumerate(active):
            n_acc = n_l[b] - 1
            run.stats.count_round(ks[b], n_acc, forward=b == 0)  # one batched forward for the whole round
            s.stats.count_round(ks[b], n_acc)
            s.hidden = out.hidden[cu[b] + n_acc]
            s.cache_len += 1 + n_acc  # the pending token and the accepted drafts now have valid K/V
            run.cache.truncate(s.idx, s.cache_len)  # roll back the rejected drafts
            run.cache.trim_window(s.idx, s.cache_len)
            self._emit(run, s, ids_l[b][: n_l[b]])

    def _target_forward(self, run: _Run, seqs: list[_Seq], new_tokens: list[list[int]]):
        """One target forward over the packed new tokens of several sequences (their K/V go into the cache)."""
        starts, counts = [s.cache_len for s in seqs], [len(t) for t in new_tokens]
        for s, c in zip(seqs, counts):
            run.cache.reserve(s.idx, s.cache_len + c)
        ctx = PagedContext(run.cache, self.attention, [s.idx for s in seqs], starts, counts)
        tok = torch.tensor([t for ts in new_tokens for t in ts], dtype=torch.long, device=self.device)
        pos = torch.cat([torch.arange(a, a + c) for a, c in zip(starts, counts)]).to(self.device)
        return self.target.run(tok, pos, ctx, logit_rows="all"), ctx.cu_q_lens.tolist()

    def _draft(self, run: _Run, seqs: list[_Seq], ks: list[int]):
        """max(ks) drafting steps for every sequence at its constant position p = cache_len. Returns draft ids
        ``[B, K]`` and, for sampled drafts, the processed drafter distributions q' ``[B, K, V]`` (else None)."""
        positions = [s.cache_len for s in seqs]
        ctx = self.draft_context(
            run.cache, self.assistant.config.text, self.attention, [s.idx for s in seqs], positions
        )
        p = torch.tensor(positions, device=self.device)
        rope = self.assistant.rope(p)  # the position is the same at every step of the round
        last = torch.tensor([s.pending for s in seqs], device=self.device)
        hidden = torch.stack([s.hidden for s in seqs])
        drafts, qs = [], []
        for j in range(max(ks)):
            logits, hidden = self.assistant.step(self.target.embed(last), hidden, p, ctx, rope)
            made = torch.stack(drafts, 1).tolist() if drafts else [[]] * len(seqs)  # step j follows d_1..d_j
            logits = _controlled(run, seqs, logits[:, None], made, j, [int(kb > j) for kb in ks])[:, 0]
            if run.sampled_drafts:
                q = self.process_logits(logits, run.params)
                # only sequences that use step j draw from their generator: a sequence's random stream never
                # depends on its batchmates (the others get dummy noise; their step-j drafts are discarded)
                noise = torch.ones_like(q)
                use = [b for b, kb in enumerate(ks) if kb > j]
                noise[use] = draw_exponentials([run.gens[seqs[b].idx] for b in use], q.shape[-1]).to(q.device)
                last = sample(q, noise)
                qs.append(q)
            else:
                last = logits.float().argmax(-1)  # (an exact upcast)
            drafts.append(last)
        return torch.stack(drafts, 1), (torch.stack(qs, 1) if qs else None)

    def _pick(self, run: _Run, logits: torch.Tensor) -> list[int]:
        if run.params.is_greedy:
            return logits.argmax(-1).tolist()
        probs = self.process_logits(logits, run.params)
        return sample(probs, draw_exponentials(run.gens, probs.shape[-1])).tolist()

    def _emit(self, run: _Run, s: _Seq, toks: list[int]) -> None:
        """Append emitted tokens, trimming at the first stop token / the budget."""
        new, stop_strings = [], run.stop_strings[s.idx] if run.stop_strings else None
        for t in toks:
            new.append(t)
            if t in run.stops:
                s.done, s.stop_reason = "stop", t
                break
            if stop_strings is not None and (hit := stop_strings.find(stop_strings.text(s.out + new))):
                s.done, s.stop_reason = "stop", hit[1]
                break
            if len(s.out) + len(new) >= run.max_new:
                s.done = "length"
                break
        s.out.extend(new)
        s.stats.generated_tokens += len(new)
        s.pending = new[-1]
        if s.done is None and s.cache_len + 1 >= self.cfg.max_position_embeddings:
            s.done = "context"
        if run.on_tokens is not None and new:
            run.on_tokens(s.idx, new)


def _controlled(run: _Run, seqs: list[_Seq], logits: torch.Tensor, drafts: list[list[int]], first: int, rows):
    """logits [B, R, V]; row r of sequence b follows its emitted tokens and drafts[b][:first + r], for r < rows[b]
    (later rows are padding). Returns them with each sequence's controls applied (controls.py)."""
    if not run.controlled:
        return logits
    x = logits.double() if logits.dtype == torch.float64 else logits.float()
    for b, s in enumerate(seqs):
        if rows[b]:
            x[b, : rows[b]] = run.controls[s.idx](
                x[b, : rows[b]], [s.out + drafts[b][: first + r] for r in range(rows[b])]
            )
    return x


def _check_draft_mode(mode: str) -> str:
    if mode not in ("argmax", "sample"):
        raise GenerationError(f"draft_mode = {mode!r}, expected 'argmax' or 'sample'")
    return mode
