"""The exact enumeration of one speculative round, in float64 (tests/test_exact_enumeration.py, and with controls
tests/test_controls_exact.py).

A :class:`Rule` says how drafts are proposed, how likely each is accepted and what is emitted on a rejection;
``round_outcomes`` sums every draft, accept/reject and emitted-token branch of one round exactly (integrating
u ~ U[0,1) gives P(accept) = min(1, ratio); the exponential race picks y with probability resid(y) / sum(resid)).
The rule pieces below are minimtp's own functions, called on float64 rows: the ones ``verify`` calls.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import torch

from minimtp.sampling import SamplingParams
from minimtp.speculative import (
    acceptance_probability,
    acceptance_ratio,
    residual_argmax,
    residual_or_target,
    residual_sample,
)


@dataclass(frozen=True)
class Rule:
    # proposals(ctx, params) -> [(draft x, P(propose x), q row handed to the verifier or None)]
    proposals: Callable
    # accept(p, q, x) -> P(accept x) as a float
    accept: Callable
    # recover(p, q, x) -> [V] float64 tensor, the (unnormalised) distribution of the token emitted on rejection
    recover: Callable


def accept_ratio(p, q, x):
    return float(acceptance_probability(acceptance_ratio(p[x], q[x])))


def accept_onehot(p, q, x):
    return float(acceptance_probability(acceptance_ratio(p[x])))


def recover_sample(p, q, x):
    return residual_or_target(residual_sample(p, q)[None], p[None])[0]


def recover_argmax(p, q, x):
    return residual_or_target(residual_argmax(p, torch.tensor(x))[None], p[None])[0]


def round_outcomes(ctx: tuple, k: int, rule: Rule, params: SamplingParams, target: Callable) -> dict[tuple, float]:
    """{emitted chunk: probability} of one round (k drafts, verify, emit accepted + 1) from context ctx.
    ``target(prefix, params)``: the processed [V] target row after ``prefix``."""
    out: dict[tuple, float] = defaultdict(float)

    def emit(drafts, prob, dist):
        dist = dist / dist.sum()
        for y in range(len(dist)):
            if dist[y] > 0:
                out[drafts + (y,)] += prob * float(dist[y])

    def walk(drafts: tuple, prob: float):
        p = target(ctx + drafts, params)  # target row conditioned on the drafts so far
        if len(drafts) == k:
            emit(drafts, prob, p)  # all accepted: bonus token from p
            return
        for x, w, q in rule.proposals(ctx + drafts, params):
            a = rule.accept(p, q, x)
            if a > 0:
                walk(drafts + (x,), prob * w * a)
            if a < 1:
                emit(drafts, prob * w * (1 - a), rule.recover(p, q, x))

    walk((), 1.0)
    return out
