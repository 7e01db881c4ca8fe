"""Penalties: the logits of tokens the sequence already holds, pushed down (docs: concepts/controls).

    repetition r   x_i -> x_i / r if x_i > 0 else x_i * r,  for every i in P + g   (transformers'
                   RepetitionPenaltyLogitsProcessor, `generation/logits_process.py`; vLLM the same)
    presence a     x_i -> x_i - a * [c_i > 0]       c_i = count of i in g (the generated tokens only, as OpenAI's
    frequency f    x_i -> x_i - f * c_i             and vLLM's `apply_penalties`)

P is the prompt, g the generated tokens the row follows (emitted, then the drafts before it).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

from minimtp.errors import GenerationError


@dataclass(frozen=True)
class Penalties:
    """repetition_penalty > 0 (1 = off); presence_penalty, frequency_penalty in [-2, 2] (0 = off)."""

    repetition: float = 1.0
    presence: float = 0.0
    frequency: float = 0.0

    def validate(self) -> Penalties:
        r = self.repetition
        a = self.presence
        f = self.frequency
        if not _real(r) or not (math.isfinite(r) and r > 0):
            raise GenerationError(f"repetition_penalty={r!r} is invalid: expected a number > 0 (1 = off)")
        for name, v in (("presence_penalty", a), ("frequency_penalty", f)):
            if not _real(v) or not -2 <= v <= 2:
                raise GenerationError(f"{name}={v!r} is invalid: expected a number in [-2, 2] (0 = off)")
        return self

    @property
    def active(self) -> bool:
        return (self.repetition, self.presence, self.frequency) != (1.0, 0.0, 0.0)


def _real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def apply_penalties(x: torch.Tensor, prompt: torch.Tensor, generated: torch.Tensor, pen: Penalties) -> torch.Tensor:
    """One row: x [V] float logits, prompt / generated [n] int64 ids -> penalised logits [V] (module docstring)."""
    V = x.shape[-1]
    counts = torch.bincount(generated, minlength=V)[:V].to(x.dtype)
    seen = torch.bincount(prompt, minlength=V)[:V].bool() | (counts > 0)
    x = torch.where(seen, torch.where(x > 0, x / pen.repetition, x * pen.repetition), x)
    return x - pen.frequency * counts - pen.presence * (counts > 0).to(x.dtype)
