"""Controls: the part of the target distribution that depends on the sequence's own history.

For a sequence with prompt P and generated tokens g (emitted tokens, then the drafts before the row), the
logits x of the next token become, in this order (docs: concepts/controls):

    x --penalties(P, g)--> x' --allowed(g): grammar, token healing--> x'' --process_logits--> p

    repetition r   x_i -> x_i / r if x_i > 0 else x_i * r,  for every i in P + g   (transformers'
                   RepetitionPenaltyLogitsProcessor, `generation/logits_process.py`; vLLM the same)
    presence a     x_i -> x_i - a * [c_i > 0]       c_i = count of i in g (the generated tokens only, as OpenAI's
    frequency f    x_i -> x_i - f * c_i             and vLLM's `apply_penalties`)
    allowed        x_i -> -inf where a constraint forbids i after g

Everything is a function of (P, g) and nothing else, which is what makes it exact under speculation: verify row j
of a round is adjusted with g = emitted + d_1..d_j, the drafter's step j with the same g, so row j's p is the p
plain decoding would use after those tokens (docs: concepts/speculative-decoding, the proof goes through row by
row). A row whose g contains a token a constraint forbade is never used: that draft had p = 0 and was rejected.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Protocol

import torch

from minimtp.errors import GenerationError


@dataclass(frozen=True)
class Penalties:
    """repetition_penalty > 0 (1 = off); presence_penalty, frequency_penalty in [-2, 2] (0 = off)."""

    repetition: float = 1.0
    presence: float = 0.0
    frequency: float = 0.0

    def validate(self) -> Penalties:
        r, a, f = self.repetition, self.presence, self.frequency
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


class Constraint(Protocol):
    """Which tokens may follow the generated tokens g. ``allowed(g)`` -> bool [V], or None for "no constraint"
    (the constraint is over, or g broke it and the row is never used)."""

    def allowed(self, generated: list[int]) -> torch.Tensor | None: ...


class Controls:
    """The controls of one sequence: its prompt, its penalties and its constraints (grammar, token healing)."""

    def __init__(self, prompt: list[int], penalties: Penalties = Penalties(), constraints=(), healed: str = ""):
        self.prompt, self.healed = torch.tensor(prompt, dtype=torch.long), healed  # healed: the re-spelled text
        self.penalties, self.constraints = penalties, [c for c in constraints if c is not None]

    @property
    def active(self) -> bool:
        return self.penalties.active or bool(self.constraints)

    def __call__(self, logits: torch.Tensor, histories: list[list[int]]) -> torch.Tensor:
        """logits [n, V] (any float dtype), histories: the n generated-token lists the rows follow -> float32
        logits [n, V] (float64 stays float64) with penalties and constraints applied row by row."""
        x = logits.double() if logits.dtype == torch.float64 else logits.float()
        if not self.active:
            return x
        rows = []
        for row, g in zip(x, histories):
            if self.penalties.active:
                row = apply_penalties(row, self.prompt, torch.tensor(g, dtype=torch.long), self.penalties)
            for c in self.constraints:
                ok = c.allowed(g)
                if ok is not None:
                    row = row.masked_fill(~ok.to(row.device), -math.inf)
            rows.append(row)
        return torch.stack(rows)


NO_CONTROLS = Controls([])


def make_controls(prompts, tokenizer, vocab_size: int, eos_ids, penalties: Penalties, source: str | None,
                  token_healing: bool):  # fmt: skip
    """Per prompt: (the prompt to run - healed if asked -, its Controls, the text healing removed).
    ``source``: an llguidance grammar (`minimtp.grammar.grammar_source`) or None."""
    from minimtp.grammar import Grammar
    from minimtp.token_healing import TokenHealing, heal_prompt, vocab_bytes

    if token_healing and source is not None:
        raise GenerationError("token_healing with a grammar: the grammar already fixes how the text starts; pick one")
    vocab = vocab_bytes(tokenizer, vocab_size) if token_healing else None
    out = []
    for prompt in prompts:
        removed = b""
        if token_healing:
            prompt, removed = heal_prompt(prompt, vocab)
        constraints = [Grammar(tokenizer, source, vocab_size, eos_ids) if source is not None else None]
        constraints.append(TokenHealing(removed, vocab) if removed else None)
        text = removed.decode("utf-8", errors="replace")
        out.append((prompt, Controls(prompt, penalties, constraints, text), text))
    return out
