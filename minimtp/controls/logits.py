"""The controls of one sequence applied to its logits, row by row: penalties, then the constraints.

For a sequence with prompt P and generated tokens g (emitted tokens, then the drafts before the row), the
logits x of the next token become, in this order (docs: concepts/controls):

    x --penalties(P, g)--> x' --allowed(g): grammar, token healing--> x'' --process_logits--> p

    allowed        x_i -> -inf where a constraint forbids i after g   (penalties.py for the penalties)

Everything is a function of (P, g) and nothing else, which is what makes it exact under speculation: verify row j
of a round is adjusted with g = emitted + d_1..d_j, the drafter's step j with the same g, so row j's p is the p
plain decoding would use after those tokens (docs: concepts/speculative-decoding, the proof goes through row by
row). A row whose g contains a token a constraint forbade is never used: that draft had p = 0 and was rejected.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch

from minimtp.controls.grammar import Grammar
from minimtp.controls.penalties import Penalties, apply_penalties
from minimtp.controls.token_healing import TokenHealing, heal_prompt, vocab_bytes
from minimtp.errors import GenerationError


class Constraint(Protocol):
    """Which tokens may follow the generated tokens g. ``allowed(g)`` -> bool [V], or None for "no constraint"
    (the constraint is over, or g broke it and the row is never used)."""

    def allowed(self, generated: list[int]) -> torch.Tensor | None: ...


class Controls:
    """The controls of one sequence: its prompt, its penalties and its constraints (grammar, token healing)."""

    def __init__(self, prompt: list[int], penalties: Penalties | None = None, constraints=(), healed: str = ""):
        self.prompt = torch.tensor(prompt, dtype=torch.long)
        self.healed = healed  # the text token healing removed from the prompt, re-spelled by the first tokens
        self.penalties = penalties or Penalties()
        self.constraints = [c for c in constraints if c is not None]

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


def make_controls(
    prompts, tokenizer, vocab_size: int, eos_ids, penalties: Penalties, source: str | None, token_healing: bool
):
    """Per prompt: (the prompt to run - healed if asked -, its Controls, the text healing removed).
    ``source``: an llguidance grammar (`minimtp.controls.grammar.grammar_source`) or None."""
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
