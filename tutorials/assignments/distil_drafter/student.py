"""Assignment ``distil_drafter``: distil a drafter that reaches a target acceptance rate.

Read tutorials/09_distil_a_drafter.py and tutorials/03_assistant.py first. The grader builds a tiny frozen Gemma 4
target and a RANDOMLY initialised assistant (acceptance ~0.39), samples training sequences from the target, calls
your ``train`` and then measures the exact acceptance rate of sampled drafts on held-out samples, for draft steps
1 and 2. You write ``distill_loss`` (its definition is fixed, the grader compares it with its own); ``train`` is
given and you may change its hyperparameters (keep it under a minute on a laptop CPU).

Grade: ``python tutorials/assignments/grade.py distil_drafter tutorials/assignments/distil_drafter/student.py``
"""

from __future__ import annotations

import torch

from minimtp.attention import DraftDenseContext  # noqa: F401  (you will need it)


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
    # TODO: build the DraftDenseContext (queries at every position p = 0..S-1 of every sequence), the initial
    #       hidden states (the target's final hidden state at p-1; zeros at p = 0), then run k drafter steps
    #       (drafter.step(token_embeddings, hidden, positions, ctx) -> (logits, next hidden)) and average the
    #       soft cross-entropies over the valid positions of each step, then over the steps.
    raise NotImplementedError("distill_loss")


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
