"""Speculative verification: accept a prefix of the drafts, then emit one token from the target.

Notation (B sequences, K = max drafts, sequence b has n_b = num_drafts[b] <= K valid drafts):
  p_j = target_probs[b, j]   processed target distribution given the prefix INCLUDING drafts x_1..x_j
  q_j = draft_probs[b, j]    processed drafter distribution x_{j+1} was sampled from ("sample" mode)
  x_j = draft_ids[b, j]      the j-th draft (0-based), proposed for the row-j position

Three rules, each emitting tokens distributed exactly as sampling p one token at a time:

  greedy (T = 0)    accept while x_j == argmax p_j; then emit argmax p_n (n = #accepted).
  sample  (x ~ q)   accept x_j with probability min(1, p_j(x_j) / q_j(x_j)); on the first rejection emit
                    y ~ norm(max(p_j - q_j, 0)). Then P(emit y) = min(p(y), q(y)) + (p(y) - q(y))^+ = p(y),
                    because P(reject) = 1 - sum min(p, q) = sum (p - q)^+ (Leviathan et al. 2023, Thm 1).
  argmax  (x fixed) a one-hot proposal q = delta_x: accept x_j with probability p_j(x_j); on rejection emit
                    y ~ p_j with x_j removed, renormalised. Then P(emit x) = p(x) and, for y != x,
                    P(emit y) = (1 - p(x)) * p(y) / (1 - p(x)) = p(y). Valid for ANY x chosen independently
                    of the verification randomness - which is why "argmax drafts verified as if sampled from q"
                    (transformers' ``_speculative_sampling``; docs: concepts/speculative-decoding, "Three rules
                    that look right and are not") is wrong and this is right.
  If all n drafts are accepted the bonus token is y ~ p_n. The emitted token is a function of the (n+1)-th
  target row only, so by induction on positions the whole output sequence has the target's distribution.

Randomness is passed in: uniforms u [B, K] float64 decide acceptance (accept iff u_j < ratio_j, strict, so
p(x) = 0 is never accepted) and ONE noise row E [B, V] float32 ~ Exp(1) drives the exponential race for the
single emitted token (only the first rejection, or the bonus, samples).

Exact float ops (a Triton twin must reproduce them bit for bit):
  ratio  = p_x / q_x                float32 / float32, IEEE round-to-nearest (Triton: tl.math.div_rn);
                                    argmax mode: ratio = p_x (no division)
  accept = float64(u) < float64(ratio)
  resid  = max(p - q, 0)            float32 elementwise ("sample");  p with token x set to 0 ("argmax")
  if max(resid) == 0: resid = p     (numerically empty residual; a max, so order-independent)
  token  = argmax_i (resid_i > 0 ? resid_i / E_i : -1)   float32 IEEE division, lowest id on ties
No sums are taken anywhere, so the result does not depend on reduction order.
"""

from __future__ import annotations

import torch

from minimtp.sampling import sample

# ---------------------------------------------------------------------------------------------------------
# The rule pieces (the tests call these directly).
# ---------------------------------------------------------------------------------------------------------


def acceptance_ratio(p_x: torch.Tensor, q_x: torch.Tensor | None = None) -> torch.Tensor:
    """r = p(x) / q(x), elementwise in the inputs' dtype; q None means a one-hot proposal (q(x) = 1, r = p(x)).
    p(x) = 0 gives r = 0 (or NaN for 0/0): never accepted. q(x) = 0 < p(x) gives +inf: always accepted."""
    return p_x if q_x is None else p_x / q_x


def acceptance_probability(ratio: torch.Tensor) -> torch.Tensor:
    """P_u[u < r] = min(1, r) for u ~ U[0, 1) (r <= 0 or NaN -> 0). Used by the exact analyses, not by verify."""
    return torch.nan_to_num(ratio, nan=0.0).clamp(0.0, 1.0)


def residual_sample(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """(p - q)^+ [.., V], unnormalised. Its mass sum (p - q)^+ = 1 - sum min(p, q) = P(reject)."""
    return (p - q).clamp_min(0.0)


def residual_argmax(p: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(p - delta_x)^+ = p with token x zeroed [.., V], unnormalised; mass 1 - p(x) = P(reject).
    x [..] int64; an x outside [0, V) removes nothing."""
    ids = torch.arange(p.shape[-1], device=p.device)
    return p.masked_fill(ids == x.unsqueeze(-1), 0.0)


def residual_or_target(resid: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """resid, or p in rows where resid is all zero. In exact arithmetic an empty residual means p = q and
    rejection has probability 0; in floating point a rounding-level rejection can happen, so fall back to p."""
    return torch.where(resid.amax(-1, keepdim=True) > 0, resid, p)


# ---------------------------------------------------------------------------------------------------------
# Verification.
# ---------------------------------------------------------------------------------------------------------


def _leading_true(mask: torch.Tensor) -> torch.Tensor:
    """[B, K] bool -> [B] int64: number of leading True entries."""
    return mask.to(torch.int64).cumprod(-1).sum(-1)


def _assemble(draft_ids, n_acc, token):
    """out[b] = drafts[:n_acc] + [token] + [-1 ...]  -> ([B, K+1] int64, num_emitted [B] int64)."""
    B, K = draft_ids.shape
    pos = torch.arange(K + 1, device=draft_ids.device)
    padded = torch.cat([draft_ids, draft_ids.new_full((B, 1), -1)], dim=1)
    out = torch.where(pos < n_acc[:, None], padded, -1)
    out = torch.where(pos == n_acc[:, None], token[:, None], out)
    return out, n_acc + 1


def verify_greedy(
    target_logits: torch.Tensor, draft_ids: torch.Tensor, num_drafts: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy verification. target_logits [B, K+1, V], draft_ids [B, K], num_drafts [B].

    t_j = argmax target row j (lowest id on ties, like torch.argmax in plain greedy decoding); accept the
    longest prefix with x_j == t_j (j < num_drafts), then emit t_n: the correction on a mismatch, the bonus
    if all drafts matched. Equal to plain greedy decoding up to the numerics of the verify forward.
    Returns out_ids [B, K+1] (-1 padded) and num_emitted = accepted + 1.
    """
    B, K = draft_ids.shape
    draft_ids, num_drafts = draft_ids.to(target_logits.device), num_drafts.to(target_logits.device).clamp(0, K)
    top = target_logits.argmax(-1)  # [B, K+1]
    valid = torch.arange(K, device=draft_ids.device) < num_drafts[:, None]
    n_acc = _leading_true((draft_ids == top[:, :K]) & valid)
    return _assemble(draft_ids, n_acc, top.gather(1, n_acc[:, None])[:, 0])


def verify(
    target_probs: torch.Tensor,
    draft_ids: torch.Tensor,
    draft_probs: torch.Tensor | None,
    num_drafts: torch.Tensor,
    uniforms: torch.Tensor,
    noise: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact stochastic verification (rules "sample" and "argmax" of the module docstring).

    target_probs [B, K+1, V] float32 processed p; draft_ids [B, K] int64; draft_probs [B, K, V] float32
    processed q' the drafts were sampled from, or None for argmax drafts (one-hot q); num_drafts [B] int64;
    uniforms [B, K] float64 U[0,1); noise [B, V] float32 Exp(1).

      accept x_j  iff  u_j < p_j(x_j) / q'_j(x_j)   (argmax mode: u_j < p_j(x_j)); n = leading accepts
      n < num_drafts: emit y ~ (p_n - q'_n)^+  (argmax mode: p_n with x_n zeroed), p_n if that is empty
      n = num_drafts: emit the bonus y ~ p_n
    A draft id outside [0, V) is treated as rejected. Returns out_ids [B, K+1] int64 (-1 padded; ids are
    in [0, V) and in the support of p) and num_emitted [B] int64 = n + 1, in [1, num_drafts + 1].
    """
    B, K1, V = target_probs.shape
    K = K1 - 1
    assert draft_ids.shape == (B, K) and uniforms.shape == (B, K) and noise.shape == (B, V)
    dev = target_probs.device
    rows = torch.arange(B, device=dev)
    draft_ids, num_drafts = draft_ids.to(dev), num_drafts.to(dev).clamp(0, K)
    uniforms, noise = uniforms.to(dev), noise.to(dev)  # drawn on the CPU (sampling.draw_*)

    # 1. acceptance of every draft position at once
    valid = (torch.arange(K, device=draft_ids.device) < num_drafts[:, None]) & (draft_ids >= 0) & (draft_ids < V)
    x = torch.where(valid, draft_ids, 0)  # safe gather index
    p_x = target_probs[:, :K].gather(-1, x[..., None])[..., 0]  # [B, K]
    q_x = None if draft_probs is None else draft_probs.gather(-1, x[..., None])[..., 0]
    accepted = valid & (uniforms < acceptance_ratio(p_x, q_x).double())
    n_acc = _leading_true(accepted)  # [B], in [0, num_drafts]

    # 2. the distribution of the one emitted token: residual at the first rejection, else the bonus p
    p_n = target_probs[rows, n_acc]  # [B, V]
    dist = p_n
    if K > 0:
        j = n_acc.clamp(max=K - 1)
        if draft_probs is None:
            resid = residual_argmax(p_n, draft_ids[rows, j])
        else:
            resid = residual_sample(p_n, draft_probs[rows, j])
        rejected = (n_acc < num_drafts)[:, None]
        dist = torch.where(rejected, residual_or_target(resid, p_n), p_n)

    # 3. exponential race with the one noise row
    return _assemble(draft_ids, n_acc, sample(dist, noise))
