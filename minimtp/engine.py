"""The decoding engine: plain and speculative decoding for a batch of ragged prompts over a paged KV cache.

One round for every active sequence b (cache holds positions < p_b; token t_b at p_b is emitted but not yet run;
h_b is the target's post-norm hidden state at p_b - 1):

    draft   k tokens with the assistant at the constant position p_b  (k = 0: plain decoding)
    verify  one target forward on [t_b, d_1 .. d_k] at positions p_b .. p_b + k   (k+1 rows of logits)
    accept  n drafts by the rule of the sampling mode, emit d_1..d_n and one more token (correction or bonus)
    roll back the cache to p_b + n + 1 positions, h_b ← the hidden state of row n, repeat

The emitted sequence has exactly the distribution of plain decoding (docs: concepts/speculative-decoding). The
same round for one sequence, in one screen: :func:`minimtp.decode.speculative_decode`. Every request carries its
own settings (settings.py, request.py). The engine executes what the scheduler plans (scheduler.py) and returns what
it did; `generate` runs that loop for its requests, the server (serve/) for its clients':

    plan = scheduler.schedule();  result = engine.execute(plan, cache);  scheduler.postprocess(plan, result)
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch.nn.utils.rnn import pad_sequence

from minimtp import speculative
from minimtp.assistant import check_pair
from minimtp.attention import DraftPagedContext, PagedContext, get_attention_backend
from minimtp.errors import CompatibilityError, GenerationError, MinimtpError
from minimtp.kv_cache import KVCache
from minimtp.request import Request, make_requests
from minimtp.sampling import draw_exponentials, process_logits, sample, token_logprobs
from minimtp.scheduler import Plan, Scheduler, StepResult
from minimtp.settings import GenerationSettings
from minimtp.stats import Stats
from minimtp.tokenizer import load_tokenizer


@dataclass
class GenerationResult:
    tokens: list[list[int]]  # new tokens per prompt (a stop token that ended a sequence is included)
    finish_reasons: list[str]  # "stop" | "length" | "context"
    stats: Stats
    seq_stats: list[Stats]
    texts: list[str] | None = None  # the continuations, cut at a stop string (when the engine has a tokenizer)
    stop_reasons: list = field(default_factory=list)  # the stop token id or stop string that ended each, else None
    healed_prompts: list[list[int]] | None = None  # the prompts as run, with token healing (last token removed)
    logprobs: list[list[tuple]] | None = None  # with settings.logprobs: per prompt, (logprob, top) per token


def _verify_backends(name: str):
    if name == "torch":
        return speculative.verify, speculative.verify_greedy
    if name == "triton":
        from minimtp.kernels import verify as kv  # Triton, on request only

        return kv.verify, kv.verify_greedy
    raise CompatibilityError(f"verify backend {name!r}: expected 'torch' or 'triton'")


def _groups(seqs: list[Request], key) -> list[tuple[object, list[int], slice | torch.Tensor]]:
    """[(key, positions of the requests with that key, their index)] in first-seen order: one batched call per
    setting. The index is a slice when one setting covers the batch, so its rows are views, not copies."""
    out: dict = defaultdict(list)
    for b, s in enumerate(seqs):
        out[key(s)].append(b)
    return [(k, bs, slice(None) if len(out) == 1 else torch.tensor(bs)) for k, bs in out.items()]


class Engine:
    """Owns the models, the backends and the defaults. :meth:`execute` runs one scheduled step; :meth:`generate`
    builds requests, a KV pool that fits them and a :class:`~minimtp.scheduler.Scheduler`, and steps until they
    are done. ``assistant=None`` gives plain decoding.

    ``draft_mode="argmax"`` drafts argmax q and verifies with the one-hot rule (accept with p(x): expected
    acceptance p(argmax q)); ``"sample"`` samples drafts from the processed drafter distribution q' and accepts
    with min(1, p/q') (expected acceptance Σ min(p, q')). Both are exact; at temperature 0 both are greedy.
    The models are used as given; ``minimtp.fast.FastEngine`` is this engine with the CPU fast twins.
    ``prefill_chunk``: the most prompt tokens of one request per prefill forward (docs: concepts/paged-kv-cache,
    "Chunked prefill"). ``tokenizer``: for stop strings, grammars, token healing and the texts; None loads the one
    in the target's checkpoint directory when one of them needs it.
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
        prefill_chunk: int = 2048,
        draft_mode: str = "argmax",
        tokenizer=None,
    ):
        for name, v in (("block_size", block_size), ("prefill_chunk", prefill_chunk)):
            if v < 1:
                raise GenerationError(f"{name}={v} is invalid: expected an integer >= 1")
        if draft_mode not in ("argmax", "sample"):
            raise GenerationError(f"draft_mode={draft_mode!r} is invalid: expected 'argmax' or 'sample'")
        if assistant is not None:
            check_pair(target.config, assistant.config)
        self.target = target
        self.assistant = assistant
        self.cfg = target.config
        self.attention_backend = attention_backend
        self.verify_backend = verify_backend
        self.attention = get_attention_backend(attention_backend)
        self.verify, self.verify_greedy = _verify_backends(verify_backend)
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.prefill_chunk = prefill_chunk
        self.draft_mode = draft_mode
        self.dtype = target.model.embed_tokens.weight.dtype
        self.device = target.model.embed_tokens.weight.device
        self._tokenizer = tokenizer

    @property
    def tokenizer(self):
        """The tokenizer given, else the one in the target's checkpoint directory (loaded once)."""
        if self._tokenizer is None:
            path = getattr(self.target, "name_or_path", None)
            if path is None:
                raise GenerationError("stop strings, grammars and token healing need a tokenizer: Engine(tokenizer=)")
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

    @property
    def sliding_keep(self) -> int:
        """Sliding blocks stay while the target (W keys) or the drafter (the last W+1) can still see them."""
        return max(self.cfg.sliding_window, self.assistant.config.text.sliding_window + 1 if self.assistant else 0)

    @torch.inference_mode()
    def generate(
        self,
        prompts,
        max_new_tokens: int | None = None,
        *,
        settings: GenerationSettings | None = None,
        on_tokens=None,
        **keywords,
    ) -> GenerationResult:
        """Generate for each prompt (a list of token-id lists) with ``settings``, any field of which a keyword of
        the same name replaces (`minimtp.settings.GenerationSettings`: ``max_new_tokens``, ``temperature``,
        ``top_k``, ``top_p``, ``min_p``, ``seed``, ``num_speculative_tokens``, ``stop``, ``json_schema``, ...).

        ``temperature=0`` is greedy. Stops at any of ``stop_token_ids`` (default: the model's EOS ids), at a
        ``stop`` string, at ``max_new_tokens`` or at the context limit; tokens accepted past a stop are trimmed.
        ``seed``: one int, or one per prompt. Penalties, a grammar (one of ``json_schema``, ``regex``, ``grammar``)
        and ``token_healing`` change p itself, row by row (docs: concepts/controls). ``on_tokens(i, ids)`` is
        called as tokens of prompt i are accepted (streaming)."""
        t0 = time.perf_counter()
        if max_new_tokens is not None:
            keywords["max_new_tokens"] = max_new_tokens
        settings = GenerationSettings.of(settings, **keywords)
        reqs = make_requests(self, prompts, settings, on_tokens)
        cache = KVCache.for_requests(
            self.cfg,
            [len(r.prompt) for r in reqs],
            settings.max_new_tokens,
            reqs[0].k,
            self.sliding_keep,
            self.block_size,
            self.num_blocks,
            self.dtype,
            self.device,
        )
        sched = Scheduler(cache, max_num_seqs=len(reqs))
        for r in reqs:
            r.arrival = t0
            sched.add(r)
        while sched.has_work:
            plan = sched.schedule()
            sched.postprocess(plan, self.execute(plan, cache))
        st = sched.stats
        st.elapsed_s = time.perf_counter() - t0
        st.generated_tokens = sum(len(r.out) for r in reqs)
        st.ttft_s = max(r.stats.ttft_s for r in reqs)
        for r in reqs:
            r.stats.elapsed_s = st.elapsed_s
        tok = self._optional_tokenizer()
        return GenerationResult(
            tokens=[r.out for r in reqs],
            finish_reasons=[r.done for r in reqs],
            stats=st,
            seq_stats=[r.stats for r in reqs],
            texts=[r.text(tok) for r in reqs] if tok is not None else None,
            stop_reasons=[r.stop_reason for r in reqs],
            healed_prompts=[r.prompt for r in reqs] if settings.token_healing else None,
            logprobs=[r.out_logprobs for r in reqs] if settings.logprobs is not None else None,
        )

    def execute(self, plan: Plan, cache: KVCache) -> StepResult:
        """Run one scheduled step on ``cache`` (blocks reserved by the scheduler): the plan's prefills, or one round
        for its running requests. The requests' K/V, ``cache_len`` and ``hidden`` move on; their tokens come back
        in the result for the scheduler to append."""
        if plan.prefill:
            return self.prefill(plan.prefill, cache)
        if plan.decode:
            return self.round(plan.decode, cache)
        return StepResult([], [], [])

    def prefill(self, seqs: list[Request], cache: KVCache) -> StepResult:
        """The prompts in packed forwards of at most ``prefill_chunk`` tokens per request (chunked prefill: a
        query chunk attends only the keys it can see, so a long prompt costs chunk × context, not context²); the
        first token from each last row. A preempted request recomputes prompt + its tokens but the last (still
        pending) and emits nothing new."""
        todo = [s.prompt + s.out[:-1] for s in seqs]
        n = self.prefill_chunk
        last_logits = [None] * len(seqs)
        for a in range(0, max(map(len, todo)), n):
            part = [b for b, t in enumerate(todo) if len(t) > a]
            chunk = [todo[b][a : a + n] for b in part]
            out, _ = self._target_forward(cache, [seqs[b] for b in part], chunk, last_rows=True)
            for r, b in enumerate(part):  # out has one row per request (its last)
                seqs[b].cache_len = min(len(todo[b]), a + n)
                seqs[b].hidden = out.hidden[r]
                cache.trim_window(seqs[b].id, seqs[b].cache_len)
                last_logits[b] = out.logits[r]
        tokens: list[list[int]] = [[] for _ in seqs]
        logprobs = [None] * len(seqs)
        fresh = [b for b, s in enumerate(seqs) if not s.out]
        if fresh:
            logits = torch.stack([last_logits[b] for b in fresh])[:, None]
            logits = _controlled([seqs[b] for b in fresh], logits, [[]] * len(fresh), 0, [1] * len(fresh))[:, 0]
            for r, (b, t) in enumerate(zip(fresh, self._pick([seqs[b] for b in fresh], logits))):
                tokens[b] = [t]
                logprobs[b] = _logprobs(seqs[b], logits[r : r + 1], tokens[b])
        return StepResult(tokens, drafted=[0] * len(seqs), accepted=[0] * len(seqs), logprobs=logprobs)

    def round(self, active: list[Request], cache: KVCache) -> StepResult:
        """Draft, verify, accept, roll back: one round for every active request (module docstring)."""
        max_ctx = self.cfg.max_position_embeddings
        # drafts per request: never more than the budget left (the round also emits one target token)
        ks = [max(0, min(s.k, s.max_new - len(s.out) - 1, max_ctx - s.cache_len - 2)) for s in active]
        B = len(active)
        K = max(ks)
        t0 = time.perf_counter()
        if K > 0:
            drafts, q = self._draft(cache, active, ks)
        else:
            drafts, q = torch.zeros(B, 0, dtype=torch.long), None
        drafts_l = drafts.tolist()
        t1 = time.perf_counter()
        rows = [[s.pending] + drafts_l[b][: ks[b]] for b, s in enumerate(active)]
        out, cu = self._target_forward(cache, active, rows)
        t2 = time.perf_counter()
        logits = pad_sequence(list(out.logits.split([kb + 1 for kb in ks])), batch_first=True)  # [B, K+1, V]
        logits = _controlled(active, logits, drafts_l, 0, [kb + 1 for kb in ks])  # row j: after d_1..d_j
        num_drafts = torch.tensor(ks, dtype=torch.long)
        V = logits.shape[-1]
        ids = torch.full((B, K + 1), -1, dtype=torch.long)
        n_emit = torch.zeros(B, dtype=torch.long)
        for (params, sampled), bs, i in _groups(active, lambda s: (s.params, s.sampled_drafts)):
            if params.is_greedy:
                ids[i], n_emit[i] = self.verify_greedy(logits[i], drafts[i], num_drafts[i])
                continue
            g = [active[b].gen for b in bs]
            probs = self.process_logits(logits[i].view(len(bs) * (K + 1), V), params).view(len(bs), K + 1, V)
            # k uniforms whatever the round's K: a request's stream is independent of its batchmates
            u = torch.zeros(len(bs), K, dtype=torch.float64)
            for r, b in enumerate(bs):
                u[r, : min(active[b].k, K)] = torch.rand(active[b].k, generator=g[r], dtype=torch.float64)[:K]
            qi = q[i] if sampled and q is not None else None
            ids[i], n_emit[i] = self.verify(probs, drafts[i], qi, num_drafts[i], u, draw_exponentials(g, V))
        ids_l = ids.tolist()
        n_l = n_emit.tolist()
        for b, s in enumerate(active):
            n_acc = n_l[b] - 1
            s.hidden = out.hidden[cu[b] + n_acc]
            s.cache_len += 1 + n_acc  # the pending token and the accepted drafts now have valid K/V
            cache.truncate(s.id, s.cache_len)  # roll back the rejected drafts
            cache.trim_window(s.id, s.cache_len)
        tokens = [ids_l[b][: n_l[b]] for b in range(B)]
        logprobs = [_logprobs(s, logits[b, : n_l[b]], tokens[b]) for b, s in enumerate(active)]
        accepted = [n - 1 for n in n_l]
        return StepResult(tokens, ks, accepted, draft_s=t1 - t0, verify_s=t2 - t1, logprobs=logprobs)

    def _target_forward(self, cache: KVCache, seqs: list[Request], new_tokens: list[list[int]], last_rows=False):
        """One target forward over the packed new tokens of several requests (their K/V go into the cache). Logits
        of every row, or with ``last_rows`` of each request's last row only (a prefill: the head is V wide)."""
        starts = [s.cache_len for s in seqs]
        counts = [len(t) for t in new_tokens]
        ctx = PagedContext(cache, self.attention, [s.id for s in seqs], starts, counts)
        tok = torch.tensor([t for ts in new_tokens for t in ts], dtype=torch.long, device=self.device)
        pos = torch.cat([torch.arange(a, a + c) for a, c in zip(starts, counts)]).to(self.device)
        cu = ctx.cu_q_lens.tolist()
        if last_rows:
            return self.target.prefill(tok, pos, ctx), cu
        return self.target.run(tok, pos, ctx), cu

    def _draft(self, cache: KVCache, seqs: list[Request], ks: list[int]):
        """max(ks) drafting steps for every request at its constant position p = cache_len. Returns draft ids
        ``[B, K]`` and, if any request samples its drafts, the processed drafter distributions q' ``[B, K, V]``
        (zero rows for the others; else None)."""
        positions = [s.cache_len for s in seqs]
        ctx = self.draft_context(cache, self.assistant.config.text, self.attention, [s.id for s in seqs], positions)
        p = torch.tensor(positions, device=self.device)
        rope = self.assistant.rope(p)  # the position is the same at every step of the round
        last = torch.tensor([s.pending for s in seqs], device=self.device)
        hidden = torch.stack([s.hidden for s in seqs])
        sampled = _groups(seqs, lambda s: s.params if s.sampled_drafts else None)
        controlled = any(s.controls.active for s in seqs)
        drafts = []
        qs = []
        for j in range(max(ks)):
            logits, hidden = self.assistant.step(self.target.embed(last), hidden, p, ctx, rope)
            if controlled:  # step j follows d_1..d_j
                made = torch.stack(drafts, 1).tolist() if drafts else [[]] * len(seqs)
                logits = _controlled(seqs, logits[:, None], made, j, [int(kb > j) for kb in ks])[:, 0]
            last = logits.float().argmax(-1)  # argmax drafts (an exact upcast)
            q = None
            for params, bs, i in sampled:
                if params is None:
                    continue
                qb = self.process_logits(logits[i], params)
                q = torch.zeros(logits.shape, dtype=qb.dtype) if q is None else q
                q[i] = qb
                # only requests that use step j draw from their generator: a request's random stream never
                # depends on its batchmates (the others get dummy noise; their step-j drafts are discarded)
                noise = torch.ones(len(bs), logits.shape[-1])
                use = [i for i, b in enumerate(bs) if ks[b] > j]
                noise[use] = draw_exponentials([seqs[bs[i]].gen for i in use], logits.shape[-1])
                last[i] = sample(qb, noise)
            if q is not None:
                qs.append(q)
            drafts.append(last)
        return torch.stack(drafts, 1), (torch.stack(qs, 1) if qs else None)

    def _pick(self, seqs: list[Request], logits: torch.Tensor) -> list[int]:
        """Plain decoding's token from one row per request."""
        out = logits.argmax(-1)
        for params, bs, i in _groups(seqs, lambda s: s.params):
            if not params.is_greedy:
                probs = self.process_logits(logits[i], params)
                out[i] = sample(probs, draw_exponentials([seqs[b].gen for b in bs], probs.shape[-1]))
        return out.tolist()


def _logprobs(s: Request, logits: torch.Tensor, tokens: list[int]):
    """The request's logprob entries for ``tokens`` emitted from rows ``logits`` (None if it asks for none)."""
    if s.logprobs is None:
        return None
    return token_logprobs(logits, s.params, tokens, s.logprobs)


def _controlled(seqs: list[Request], logits: torch.Tensor, drafts: list[list[int]], first: int, rows):
    """logits [B, R, V]; row r of request b follows its emitted tokens and drafts[b][:first + r], for r < rows[b]
    (later rows are padding). Returns them with each request's controls applied (controls.py)."""
    if not any(s.controls.active for s in seqs):
        return logits
    x = logits.double() if logits.dtype == torch.float64 else logits.float()
    for b, s in enumerate(seqs):
        if rows[b] and s.controls.active:
            hist = [s.out + drafts[b][: first + r] for r in range(rows[b])]
            x[b, : rows[b]] = s.controls(x[b, : rows[b]], hist)
    return x
