"""Sampling: turn logits into the distribution plain decoding samples from, and sample from it.

`process_logits` defines THE target distribution p. Plain decoding draws its next token from p, and
speculative verification (`speculative.py`) compares the drafts against exactly the same p, row by row,
so a speculative run is distributed exactly like a plain one.

Processing order (fixed, the same as transformers' warpers, `generation/utils.py:1597-1640`):

    logits --(float32; +inf rows -> their +inf tokens)--> / temperature --> top-k --> top-p --> min-p
           --> softmax (renormalise over the kept tokens)

Ties: top-k keeps every token tied with the k-th value (as transformers); top-p breaks ties at its cut-off
by token id, lowest first (transformers keeps whichever its unstable sort put first), so the result is
deterministic on every device.

Randomness is passed in, never drawn inside: `draw_uniforms` / `draw_exponentials` use one CPU
`torch.Generator` per sequence (`make_generators`: independent streams spawned by `numpy.random.SeedSequence`),
so a sequence's tokens depend only on its own seed, never on which other sequences share the batch - provided the
caller draws the same count for it whatever the batch (e.g. k = the configured number of drafts, not the batch's
current maximum). `sample` is the exponential race argmax_i p_i / E_i with E_i ~ Exp(1), which picks i with
probability p_i / sum(p) and needs no normalisation.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np
import torch

from minimtp.errors import GenerationError


@dataclass(frozen=True)
class SamplingParams:
    """Sampling settings of one request. Defaults are greedy decoding.

    temperature: 0 => greedy (argmax); otherwise logits / temperature.
    top_k:       keep the k largest logits (ties with the k-th are kept). None or 0 => off.
    top_p:       keep the smallest set of most likely tokens whose mass is >= top_p (at least one token).
                 None or 1.0 => off. Must be in (0, 1].
    min_p:       keep tokens with p >= min_p * max(p). None or 0 => off. Must be in [0, 1].
    """

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None

    def validate(self) -> SamplingParams:
        """Return self, or raise GenerationError naming the bad field, its value and the expected range."""
        t = self.temperature
        if not _is_real(t) or not (math.isfinite(t) and t >= 0):
            raise GenerationError(f"temperature={t!r} is invalid: expected a finite number >= 0 (0 = greedy)")
        k = self.top_k
        if k is not None and (isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 0):
            raise GenerationError(f"top_k={k!r} is invalid: expected an integer >= 0 (0 or None = off)")
        p = self.top_p
        if p is not None and (not _is_real(p) or not (0 < p <= 1)):
            raise GenerationError(f"top_p={p!r} is invalid: expected a number in (0, 1] (1 or None = off)")
        m = self.min_p
        if m is not None and (not _is_real(m) or not (0 <= m <= 1)):
            raise GenerationError(f"min_p={m!r} is invalid: expected a number in [0, 1] (0 or None = off)")
        return self

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0


def _is_real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


# ---------------------------------------------------------------------------------------------------------
# Processors. Each maps logits x: [N, V] -> logits with the removed tokens set to -inf.
# ---------------------------------------------------------------------------------------------------------


def apply_temperature(x: torch.Tensor, temperature: float) -> torch.Tensor:
    """x -> (x - max x) / T. Subtracting the row max first changes no probability (softmax is shift
    invariant) but keeps a tiny T from overflowing every logit to -inf."""
    return (x - x.amax(-1, keepdim=True)) / temperature


def apply_top_k(x: torch.Tensor, k: int) -> torch.Tensor:
    """Keep x_i >= (k-th largest x). Ties with the k-th value are all kept (as transformers' TopK)."""
    if k >= x.shape[-1]:
        return x
    kth = torch.topk(x, k, dim=-1).values[..., -1:]
    return x.masked_fill(x < kth, -math.inf)


def apply_top_p(x: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus: sort p = softmax(x) descending (stable: among equal p the lower token id comes first) and keep
    token i iff the mass strictly before it, sum_{j<i} p_(j), is < top_p. That is the smallest prefix with mass
    >= top_p (transformers' TopP), always >= 1 token. Cumulative mass in float64 for a sharp boundary."""
    p_sorted, order = torch.sort(torch.softmax(x, -1), dim=-1, descending=True, stable=True)
    mass_before = p_sorted.double().cumsum(-1) - p_sorted.double()  # [.., 0] is exactly 0: always kept
    drop_sorted = mass_before >= top_p
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return x.masked_fill(drop, -math.inf)


def apply_min_p(x: torch.Tensor, min_p: float) -> torch.Tensor:
    """Keep p_i >= min_p * max(p), p = softmax(x) (as transformers' MinP). The top token is always kept."""
    p = torch.softmax(x, -1)
    return x.masked_fill(p < min_p * p.amax(-1, keepdim=True), -math.inf)


def _as_float(logits: torch.Tensor) -> torch.Tensor:
    """float32 (float64 stays float64). Rows whose max is not finite: NaN, or -inf everywhere, has no distribution:
    refuse it. A row with +inf logits becomes 0 at the +inf tokens and -inf elsewhere (the limit of its softmax)."""
    x = logits.double() if logits.dtype == torch.float64 else logits.float()
    x_max = x.amax(-1, keepdim=True)  # NaN if the row has a NaN
    if bool(torch.isfinite(x_max).all()):  # the only host sync on the common path
        return x
    bad = x_max.isnan() | (x_max == -math.inf)
    if bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        nan = torch.isnan(x[row]).nonzero()
        if len(nan):
            raise GenerationError(
                f"logits row {row} has NaN at token {int(nan[0, 0])}: the model produced invalid values"
            )
        raise GenerationError(f"logits row {row} is -inf for every token: no token can be sampled")
    return torch.where(x_max == math.inf, torch.where(torch.isposinf(x), 0.0, -math.inf), x)


def _top_k_survivors(x: torch.Tensor, k: int) -> torch.Tensor:
    """[N, V] -> [N, m] ids of the tokens with x >= (k-th largest x), m = k plus the most ties in any row,
    in token-id order (rows with fewer survivors are padded with ids that top-k then masks)."""
    vals, idx = torch.topk(x, k, dim=-1)
    m = int((x >= vals[..., -1:]).sum(-1).max())
    if m > k:
        idx = torch.topk(x, m, dim=-1).indices
    return idx.sort(-1).values


def _filter(x: torch.Tensor, params: SamplingParams, *, top_p=apply_top_p) -> torch.Tensor:
    """temperature -> top-k -> top-p (``top_p``) -> min-p -> softmax, on logits [N, V'] (V, or the top-k slice)."""
    x = apply_temperature(x, params.temperature)
    if params.top_k:
        x = apply_top_k(x, params.top_k)
    if params.top_p is not None and params.top_p < 1.0:
        x = top_p(x, params.top_p)
    if params.min_p:
        x = apply_min_p(x, params.min_p)
    return torch.softmax(x, -1)


def process_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """logits [N, V] -> probs [N, V]: the distribution plain decoding samples from.

    p = softmax(min_p(top_p(top_k(logits / T)))), every step in float32 (bf16/fp16 logits are upcast;
    float64 logits stay float64, which the exact-enumeration tests use). A -inf logit gets p = 0; in a
    row with +inf logits, the +inf tokens share the mass equally (the limit of the softmax).
    Greedy (T = 0) returns the one-hot argmax (lowest token id on ties).
    With top_k set, the survivors (>= k-th largest logit) are gathered first and the whole pipeline runs on
    that [N, k(+ties)] slice: identical math (T > 0 is monotone, so top-k picks the same tokens before or
    after dividing, up to ties that the rounding of the division could create), and no sort over all V.
    Raises GenerationError on NaN logits, an all -inf row, or invalid params.
    """
    params.validate()
    x = _as_float(logits)
    if params.is_greedy:
        return torch.nn.functional.one_hot(x.argmax(-1), x.shape[-1]).to(x.dtype)
    if params.top_k and params.top_k < x.shape[-1]:
        idx = _top_k_survivors(x, params.top_k)
        return torch.zeros_like(x).scatter(-1, idx, _filter(x.gather(-1, idx), params))
    return _filter(x, params)


def token_logprobs(logits: torch.Tensor, params: SamplingParams, tokens: list[int], top: int) -> list[tuple]:
    """logits [N, V] (row i: the step that emitted tokens[i]) -> [(log p(tokens[i]), [(id, log p(id)), ...])]:
    each token's log-probability under p, the processed distribution it was drawn from, and the ``top`` most
    likely ids under p. Under speculative decoding row i is the target's row at that position, so the numbers are
    plain decoding's. Greedy's p is one-hot: the same filters at temperature 1 are reported instead. A
    probability of 0 reads as -9999.0, as OpenAI writes it (JSON has no -inf)."""
    if params.is_greedy:
        params = SamplingParams(1.0, params.top_k, params.top_p, params.min_p)
    logp = process_logits(logits, params).double().log().clamp(min=-9999.0)
    chosen = logp.gather(-1, torch.tensor(tokens, dtype=torch.long)[:, None])[:, 0].tolist()
    best = logp.topk(min(top, logp.shape[-1]), dim=-1)
    ranked = [list(zip(i, v)) for i, v in zip(best.indices.tolist(), best.values.tolist())]
    return list(zip(chosen, ranked))


# ---------------------------------------------------------------------------------------------------------
# Randomness: one generator per sequence, drawn on the CPU.
# ---------------------------------------------------------------------------------------------------------


def make_generators(seed: int | list[int] | None, n: int) -> list[torch.Generator]:
    """One CPU generator per sequence, with statistically independent streams.

    ``seed`` an int s: sequence i gets the i-th child of ``numpy.random.SeedSequence(s)``, so (s, i) and
    (s', i') give unrelated streams whenever (s, i) != (s', i') - seed s + 1 does NOT replay seed s's streams
    shifted by one. A list of n ints: sequence i gets the first child of ``SeedSequence(seed[i])``, the stream
    that sequence 0 of ``seed=seed[i]`` gets, so a prompt's tokens do not depend on the batch it is in.
    None: a fresh nondeterministic seed each. Same seed, same tokens.
    """
    if isinstance(seed, (list, tuple)):
        if len(seed) != n:
            raise GenerationError(f"seed is a list of {len(seed)} seeds for {n} prompts: expected one per prompt")
        children = [np.random.SeedSequence(_check_seed(s)).spawn(1)[0] for s in seed]
    elif seed is not None:
        children = np.random.SeedSequence(_check_seed(seed)).spawn(n)
    gens = []
    for i in range(n):
        g = torch.Generator()
        if seed is None:
            g.seed()
        else:  # 63 bits of the child's state (manual_seed takes a non-negative int64)
            g.manual_seed(int(children[i].generate_state(1, np.uint64)[0]) >> 1)
        gens.append(g)
    return gens


def _check_seed(s) -> int:
    if isinstance(s, bool) or not isinstance(s, numbers.Integral) or s < 0:
        raise GenerationError(f"seed={s!r} is invalid: expected an integer >= 0 (or a list of them, one per prompt)")
    return int(s)


def draw_uniforms(generators: list[torch.Generator], k: int) -> torch.Tensor:
    """[B, k] float64 u ~ U[0, 1), k draws from each sequence's own generator (float64: float32 rand can
    round to exactly 0 or lose resolution near p/q)."""
    if not generators:
        return torch.empty(0, k, dtype=torch.float64)
    return torch.stack([torch.rand(k, generator=g, dtype=torch.float64) for g in generators])


_F32 = torch.finfo(torch.float32)


def draw_exponentials(generators: list[torch.Generator], V: int) -> torch.Tensor:
    """[B, V] float32 E ~ Exp(1), drawn in float64 then clamped to [float32 tiny, float32 max] before the
    cast, so no entry is 0 or inf (p / E stays finite and ordered)."""
    if not generators:
        return torch.empty(0, V, dtype=torch.float32)
    e = torch.stack([torch.empty(V, dtype=torch.float64).exponential_(generator=g) for g in generators])
    return e.clamp_(_F32.tiny, _F32.max).float()


def sample(probs: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """probs [N, V] (need not be normalised), noise [N, V] Exp(1) -> token ids [N] int64.

    Exponential race: i* = argmax_i probs_i / E_i. Since E_i / probs_i ~ Exp(probs_i) independently, the
    smallest of them is i with probability probs_i / sum(probs). Tokens with probs_i = 0 score -1 and so can
    never win, even if every ratio underflows to 0. Float ops: one elementwise division, then argmax (lowest id
    on ties) - no reductions whose order could change the result.
    """
    score = torch.where(probs > 0, probs / noise.to(probs.device), -1.0)
    return score.argmax(-1)
