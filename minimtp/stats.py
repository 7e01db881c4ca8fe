"""Counters of a generation call and of each sequence: tokens, rounds, drafts and acceptance, time."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Stats:
    """Counters of one run (or one sequence). ``mean_acceptance_length`` = 1 + accepted / draft rounds (as vLLM)."""

    prompt_tokens: int = 0
    generated_tokens: int = 0
    target_steps: int = 0  # target forward passes after prefill (one per round)
    prefill_steps: int = 0
    draft_rounds: int = 0  # rounds with at least one draft
    drafted: int = 0
    accepted: int = 0
    accepted_per_position: list[int] = field(default_factory=list)
    drafted_per_position: list[int] = field(default_factory=list)
    ttft_s: float = 0.0
    elapsed_s: float = 0.0
    draft_s: float = 0.0  # wall time in assistant steps (for the cost ratio c of the speedup model)
    verify_s: float = 0.0  # wall time in target forwards after prefill

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def mean_acceptance_length(self) -> float:
        return 1.0 + self.accepted / self.draft_rounds if self.draft_rounds else 1.0

    @property
    def tokens_per_second(self) -> float:
        return self.generated_tokens / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def per_position_acceptance(self) -> list[float]:
        return [a / d if d else 0.0 for a, d in zip(self.accepted_per_position, self.drafted_per_position)]

    def count_round(self, k: int, n: int, forward: bool = True) -> None:
        """One sequence's round: k drafts, n accepted; ``forward`` counts a target forward pass."""
        self.target_steps += int(forward)
        if k:
            self.draft_rounds += 1
            self.drafted += k
            self.accepted += n
            grow = [0] * (k - len(self.drafted_per_position))
            self.drafted_per_position += grow
            self.accepted_per_position += grow
            for j in range(k):
                self.drafted_per_position[j] += 1
                self.accepted_per_position[j] += int(j < n)

    def as_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items()}
        d.update(
            acceptance_rate=self.acceptance_rate,
            mean_acceptance_length=self.mean_acceptance_length,
            tokens_per_second=self.tokens_per_second,
            per_position_acceptance=self.per_position_acceptance,
        )
        return d
