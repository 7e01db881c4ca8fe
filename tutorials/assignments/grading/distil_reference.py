"""The grader's own measure of a drafter, independent of the library (whose ``distill_loss`` is a hole in the student
release): the data sampled from the target, and every draft step's logits, teacher-forced.

``draft_logits`` walks the positions one at a time, as the engine drafts at inference (``minimtp/decode.py``: at
position p the drafter reads the target's hidden state at p - 1, the embedding of token p, and the target's K/V at
positions < p; its later steps read the next corpus token and its own previous hidden state). Tests check that the
loss built from it equals ``minimtp.train.distill.distill_loss`` (float32) and that ``sample`` reproduces the
engine's samples token for token.
"""

from __future__ import annotations

import torch

from minimtp.sampling import SamplingParams, draw_exponentials, make_generators, process_logits, sample


@torch.no_grad()
def sample_sequences(target, starts: torch.Tensor, new: int, seed: int) -> torch.Tensor:
    """Each row of ``starts`` [N, 1] continued by ``new`` tokens sampled from the target at temperature 1, the
    engine's draws (one generator per row from ``make_generators(seed, N)``, one Exp(1) row per token)."""
    x = starts
    gens = make_generators(seed, x.shape[0])
    vocab = target.config.vocab_size
    for _ in range(new):
        probs = process_logits(target.forward_with_kv(x)[0][:, -1], SamplingParams(1.0))
        x = torch.cat([x, sample(probs, draw_exponentials(gens, vocab))[:, None]], 1)
    return x


def draft_logits(target, drafter, x: torch.Tensor, k: int) -> list[torch.Tensor]:
    """Draft step j's logits at every position (j = 1..k), in the drafter's graph: a list of k tensors [B * S, V],
    row b * S + p; rows of positions a step does not reach (p = 0, or p + j - 1 > S - 1) are zero."""
    from minimtp.attention import DraftDenseContext

    B, S = x.shape
    with torch.no_grad():
        _, t_hidden, kv = target.forward_with_kv(x)
        emb = target.embed(x)
    vocab = target.config.vocab_size
    rows: list[list] = [[torch.zeros(B, vocab)] * S for _ in range(k)]
    for p in range(1, S):
        where = torch.full((B,), p)
        ctx = DraftDenseContext(drafter.config.text, kv, where.view(B, 1))
        state = t_hidden[:, p - 1]
        for j in range(k):
            if p + j > S - 1:
                break
            z, state = drafter.step(emb[:, p + j], state, where, ctx)
            rows[j][p] = z.float()
    return [torch.stack(r, 1).reshape(B * S, vocab) for r in rows]


def reached(B: int, S: int, j: int) -> torch.Tensor:
    """[B * S] bool: the positions draft step j (1-based) reaches: p >= 1 and p + j - 1 <= S - 1."""
    p = torch.arange(S)
    return ((p >= 1) & (p + j - 1 <= S - 1)).repeat(B)


def teacher_rows(target, x: torch.Tensor, j: int) -> torch.Tensor:
    """[B * S, V]: at position p, the target's distribution of token p + j (its output row p + j - 1)."""
    B, S = x.shape
    with torch.no_grad():
        probs = torch.softmax(target.forward_with_kv(x)[0].float(), -1)
    return probs[:, (torch.arange(S) + j - 1).clamp(max=S - 1)].reshape(B * S, -1)


def step_losses(target, drafter, x: torch.Tensor, k: int) -> tuple[list[torch.Tensor], list[int]]:
    """L_j, the mean cross-entropy -sum p log q of draft step j over the positions it reaches (in the drafter's
    graph), and n_j, their number, for j = 1..k; the definition's loss is the mean of the L_j."""
    B, S = x.shape
    losses, counts = [], []
    for j, z in enumerate(draft_logits(target, drafter, x, k), start=1):
        keep = reached(B, S, j)
        ce = -(teacher_rows(target, x, j) * torch.log_softmax(z, -1)).sum(-1)
        losses.append(ce[keep].mean())
        counts.append(int(keep.sum()))
    return losses, counts


def reference_loss(target, drafter, x: torch.Tensor, k: int) -> torch.Tensor:
    """The definition of the distillation loss: the mean over draft steps of ``step_losses``."""
    losses, _ = step_losses(target, drafter, x, k)
    return torch.stack(losses).mean()


@torch.no_grad()
def acceptance(target, drafter, x: torch.Tensor, steps: int = 2) -> list[float]:
    """Exact acceptance of sampled drafts at temperature 1, E[sum_x min(p, q)], of draft steps 1..steps over the
    positions each reaches."""
    B, S = x.shape
    out = []
    for j, z in enumerate(draft_logits(target, drafter, x, steps), start=1):
        keep = reached(B, S, j)
        p = teacher_rows(target, x, j)[keep]
        out.append(float(torch.minimum(p, torch.softmax(z, -1)[keep]).sum(-1).mean()))
    return out
