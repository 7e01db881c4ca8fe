"""Reference solution: assignment ``spec_sampling`` (the speculative sampling rule).

Grade it: ``python tutorials/assignments/grade.py spec_sampling tutorials/assignments/solutions/spec_sampling.py``
"""

from __future__ import annotations

import torch

from minimtp.sampling import SamplingParams, process_logits, sample


def propose(draft_logits: torch.Tensor, params: SamplingParams, mode: str, noise: torch.Tensor):
    """Draft one token per row. ``draft_logits`` [N, V] raw drafter logits, ``noise`` [N, V] Exp(1).

    "sample": x ~ q' = process_logits(draft_logits, params) (exponential race with ``noise``); returns (x, q').
    "argmax": x = argmax of the raw logits; the proposal is the point mass at x, so returns (x, None).
    """
    if mode == "argmax":
        return draft_logits.argmax(-1), None
    q = process_logits(draft_logits, params)  # the SAME q' is used to draft and, later, in the ratio
    return sample(q, noise), q


def verify_one(p: torch.Tensor, drafts: list[int], q: torch.Tensor | None, u: torch.Tensor, noise: torch.Tensor):
    """One sequence: p [n+1, V] target rows, ``drafts`` n ids, q [n, V] (or None: argmax drafts), u [n] float64,
    noise [V]. Returns the emitted tokens: the accepted drafts, then one residual/bonus token."""
    V = p.shape[-1]
    out = []
    for j, x in enumerate(drafts):
        valid = 0 <= x < V  # an invalid draft id is rejected
        if valid:
            ratio = p[j, x] if q is None else p[j, x] / q[j, x]  # float32, as minimtp computes it
        if not (valid and float(u[j]) < float(ratio)):  # accept w.p. min(1, ratio); strict: p(x) = 0 never
            # rejected: emit from the residual (p - q)^+, or p with x removed for a one-hot proposal
            resid = p[j].clone() if q is None else (p[j] - q[j]).clamp_min(0.0)
            if q is None and valid:
                resid[x] = 0.0
            if float(resid.max()) == 0.0:  # numerically empty residual (p == q): fall back to p
                resid = p[j]
            return out + [int(sample(resid[None], noise[None])[0])]
        out.append(x)
    return out + [int(sample(p[len(out)][None], noise[None])[0])]  # all accepted: the bonus token from p_n


def verify(target_probs, draft_ids, draft_probs, num_drafts, uniforms, noise):
    """The batched signature of minimtp.speculative.verify: returns out_ids [B, K+1] (-1 padded), num_emitted [B]."""
    B, K1, V = target_probs.shape
    out = torch.full((B, K1), -1, dtype=torch.int64)
    emitted = torch.zeros(B, dtype=torch.int64)
    for b in range(B):
        n = max(0, min(int(num_drafts[b]), K1 - 1))
        q = None if draft_probs is None else draft_probs[b, :n]
        toks = verify_one(target_probs[b, : n + 1], draft_ids[b, :n].tolist(), q, uniforms[b, :n], noise[b])
        out[b, : len(toks)] = torch.tensor(toks)
        emitted[b] = len(toks)
    return out, emitted
