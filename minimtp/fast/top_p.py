"""Twin of :func:`minimtp.sampling.process_logits` whose top-p (without top-k) does not sort all V tokens.

The reference's nucleus (:func:`minimtp.sampling.apply_top_p`, docs/concepts/speculative-decoding.md) sorts
p = softmax(x) stably by descending p (ties: lower token id first) and keeps token i iff its float64
``mass_before = cumsum(p_sorted) - p_sorted`` is < top_p. With Gemma's 262,144 tokens that sort dominates a
sampled step, while the nucleus usually holds a few hundred tokens. Here, per row:

1. take the m largest p with ``torch.topk`` (m = 1024 first); if they hold less than top_p + 2e-9, double m;
2. else C = every token with p >= the m-th largest (ties included) and p > 0. C is a prefix of the reference's sorted
   row (zeros come last there). Order C as the reference does (ids ascending, then a stable sort by descending p): the
   float64 cumsum over C, and so ``mass_before`` of every token in C, is the reference's number (the same additions
   in the same order; CPU cumsum is a sequential scan);
3. accept the row if the mass of C, S = cumsum over C, is >= top_p + 1e-9. A token outside C comes later in the
   reference's order, and a float cumsum of non-negative terms is monotone, so its mass_before there is >= S minus
   one rounding (~1e-16) > top_p: the reference drops it too. Otherwise m doubles; at m >= V (a nucleus that covers
   most of the vocabulary) the row goes to the reference's full sort.

Everything else (validation, upcast, special rows, greedy, temperature, top-k, min-p, softmax) is the reference's own
code, called, not copied. Proof: tests/test_fast_top_p.py (``torch.equal`` with the reference).
"""

from __future__ import annotations

import math

import torch

from minimtp import sampling
from minimtp.sampling import SamplingParams

FIRST_M = 1024  # candidates in the first round; the tests lower it to drive small vocabularies through the doubling
MARGIN = 1e-9  # >> the ~1e-16 a float64 `cumsum - p` can fall below the cumsum before it


def apply_top_p(x: torch.Tensor, top_p: float) -> torch.Tensor:
    """Same signature and result as :func:`minimtp.sampling.apply_top_p` (see the module docstring)."""
    V = x.shape[-1]
    flat = x.reshape(-1, V)
    p = torch.softmax(flat, -1)  # the reference's p, bit for bit (a row-wise op)
    out = torch.empty_like(flat)
    rows, m = torch.arange(flat.shape[0], device=x.device), FIRST_M
    while len(rows) and m < V:
        pr = p if len(rows) == len(p) else p[rows]
        top = torch.topk(pr, m, sorted=False).values  # the m largest p of each row, in no order
        ready = top.double().sum(-1) >= top_p + 2 * MARGIN  # C holds at least these: worth ordering
        sub = rows[ready]
        kth = top[ready].amin(-1, keepdim=True)
        rows = rows[~ready]
        m = 2 * m
        if len(sub):
            ps, ids, cum = _nucleus(pr[ready], kth)
            done = cum[:, -1] >= top_p + MARGIN
            drop = torch.ones(len(sub), V + 1, dtype=torch.bool, device=x.device)  # column V: the padding's
            drop = drop.scatter_(-1, ids, cum - ps.double() >= top_p)[:, :V]
            out[sub[done]] = flat[sub[done]].masked_fill(drop[done], -math.inf)
            rows = torch.cat([rows, sub[~done]])
    if len(rows):
        out[rows] = sampling.apply_top_p(flat[rows], top_p)
    return out.view(x.shape)


def _nucleus(p: torch.Tensor, kth: torch.Tensor):
    """C = {i : p_i >= kth, p_i > 0} (a prefix of the reference's order, where zeros come last) as [n, max |C|]
    rows in the reference's order: (p sorted, ids, float64 cumsum). Padding: p 0, id V, sorted last."""
    r, col = ((p >= kth) & (p > 0)).nonzero(as_tuple=True)  # by row, then by ascending token id
    count = torch.bincount(r, minlength=len(p))
    pos = torch.arange(len(col), device=p.device) - (count.cumsum(0) - count)[r]
    ps = p.new_zeros(len(p), int(count.max())).index_put_((r, pos), p[r, col])
    ids = torch.full_like(ps, p.shape[-1], dtype=torch.long).index_put_((r, pos), col)
    ps, order = torch.sort(ps, dim=-1, descending=True, stable=True)  # ties: lower id first, as the reference
    return ps, ids.gather(-1, order), ps.double().cumsum(-1)


def process_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Same signature and result as :func:`minimtp.sampling.process_logits`; only top-p without top-k (top-k >= V
    counts as without) runs :func:`apply_top_p` above, everything else is the reference call."""
    top_p, top_k = params.validate().top_p, params.top_k
    if params.is_greedy or top_p is None or top_p >= 1.0 or (top_k and top_k < logits.shape[-1]):
        return sampling.process_logits(logits, params)
    return sampling._filter(sampling._as_float(logits), params, top_p=apply_top_p)
