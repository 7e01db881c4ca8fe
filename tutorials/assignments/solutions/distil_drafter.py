"""Reference solution: assignment ``distil_drafter`` (distil an MTP drafter against a frozen target).

Grade it: ``python tutorials/assignments/grade.py distil_drafter tutorials/assignments/solutions/distil_drafter.py``
"""

from __future__ import annotations

import torch

from minimtp.attention import DraftDenseContext


@torch.no_grad()
def teacher(target, x: torch.Tensor):
    """The frozen target's view of a batch ``x`` [B, S] (given): (probs [B, S, V], where row i is the distribution
    of token i+1; final hidden states [B, S, H]; store-layer K/V {layer type: (K, V)} each [B, S, kv_heads, d])."""
    logits, hidden, kv = target.forward_with_kv(x)
    return torch.softmax(logits, -1), hidden, kv


def distill_loss(target, drafter, x: torch.Tensor, teach, k: int = 2) -> torch.Tensor:
    """Mean over draft steps j = 1..k of the mean over valid positions p of CE(p_target, q_drafter), where

    * step j at position p reads the target's (scaled) embedding of token x[p + j - 1] and a hidden state: the
      target's final hidden state at p - 1 for j = 1, the drafter's own previous ``step`` output after that;
    * it runs at position p and sees the target's K/V at positions < p (``DraftDenseContext`` with qpos = p);
    * its label is the target's distribution for token p + j, i.e. teacher row p + j - 1;
    * valid positions: p >= 1 and p + j - 1 <= S - 1.
    CE(p, q) = -sum_x p(x) log q(x) with q = softmax(drafter logits).
    """
    B, S = x.shape
    t_prob, t_hidden, kv = teach
    V, H = t_prob.shape[-1], t_hidden.shape[-1]
    pos = torch.arange(S).repeat(B)
    ctx = DraftDenseContext(drafter.config.text, kv, pos.view(B, S))
    hid = torch.cat([torch.zeros(B, 1, H), t_hidden[:, :-1]], 1).reshape(B * S, H)
    total = 0.0
    for j in range(1, k + 1):
        src = (torch.arange(S) + j - 1).clamp(max=S - 1)
        valid = ((torch.arange(S) >= 1) & (torch.arange(S) + j - 1 <= S - 1)).repeat(B)
        logits, hid = drafter.step(target.embed(x[:, src]).reshape(B * S, H), hid, pos, ctx)
        ce = -(t_prob[:, src].reshape(B * S, V) * torch.log_softmax(logits, -1)).sum(-1)
        total = total + ce[valid].mean()
    return total / k


def train(target, drafter, data: torch.Tensor, steps: int = 150, batch: int = 16, lr: float = 3e-3, k: int = 2):
    """Adam on random batches of ``data`` [N, S] (token sequences sampled from the target)."""
    g = torch.Generator().manual_seed(0)
    teach = teacher(target, data)
    opt = torch.optim.Adam(drafter.parameters(), lr=lr)
    drafter.train()
    for _ in range(steps):
        idx = torch.randint(0, data.shape[0], (batch,), generator=g)
        t_prob, t_hidden, kv = teach
        rows = (t_prob[idx], t_hidden[idx], {t: (kk[idx], vv[idx]) for t, (kk, vv) in kv.items()})
        loss = distill_loss(target, drafter, data[idx], rows, k)
        opt.zero_grad()
        loss.backward()
        opt.step()
    drafter.eval()
    return drafter
