"""Everything one request can set, in one frozen dataclass, validated in one place.

`Engine.generate` takes a `GenerationSettings` (its keywords are the same fields, for convenience), and so do the
CLI (`python -m minimtp.generate`) and the server, each mapping its own flags or JSON fields onto these names.
`request.make_requests` then fills in what depends on the engine: the draft length the assistant ships with, the
model's EOS ids, the tokenizer for stop strings, grammars and token healing (docs: concepts/controls).
"""

from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass

from minimtp.controls.penalties import Penalties
from minimtp.controls.stop_strings import check_stop_strings
from minimtp.errors import GenerationError
from minimtp.sampling import SamplingParams


@dataclass(frozen=True)
class GenerationSettings:
    """The settings of a request. The defaults are greedy decoding of 64 tokens with the assistant's draft length.

    max_new_tokens            tokens to generate at most (integer >= 1)
    num_speculative_tokens    drafts per round (integer >= 1); None: the assistant's ``num_assistant_tokens``, else 6
    use_assistant             False: plain decoding, no drafts
    draft_mode                "argmax" | "sample" (docs: concepts/speculative-decoding); None: the engine's
    temperature, top_k, top_p, min_p    the sampling processors (sampling.SamplingParams)
    seed                      one int, or one per prompt; None: a fresh random seed each
    stop_token_ids            token ids that end a sequence; None: the model's EOS ids
    stop, include_stop_str_in_output    stop strings, and whether the text keeps the one that matched
    repetition_penalty, presence_penalty, frequency_penalty    the penalties (None: off)
    json_schema, regex, grammar         a constraint on the output, at most one of them
    token_healing             re-spell the prompt's last token with the first generated ones
    logprobs                  None: off; N: each token's log-probability under p and the N most likely (0..20)
    """

    max_new_tokens: int = 64
    num_speculative_tokens: int | None = None
    use_assistant: bool = True
    draft_mode: str | None = None
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    seed: int | list[int] | None = None
    stop_token_ids: list[int] | None = None
    stop: str | list[str] | None = None
    include_stop_str_in_output: bool = False
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    json_schema: dict | str | bool | None = None
    regex: str | None = None
    grammar: str | None = None
    token_healing: bool = False
    logprobs: int | None = None

    @classmethod
    def of(cls, settings: GenerationSettings | None = None, **changes) -> GenerationSettings:
        """``settings`` (default: the defaults) with ``changes`` replacing fields, validated."""
        if settings is not None and not isinstance(settings, GenerationSettings):
            raise GenerationError(f"settings={settings!r}: expected a GenerationSettings (or pass keywords)")
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = [k for k in changes if k not in names]
        if unknown:
            raise GenerationError(f"unknown setting {unknown[0]!r}: expected one of {', '.join(names)}")
        return dataclasses.replace(settings or cls(), **changes).validate()

    def validate(self) -> GenerationSettings:
        """Return self, or raise a one-line GenerationError naming the field, its value and what was expected.
        (A grammar is checked when it is compiled, in `request.make_requests`.)"""
        n = self.max_new_tokens
        if not _integer(n) or n < 1:
            raise GenerationError(f"max_new_tokens={n!r} is invalid: expected an integer >= 1")
        k = self.num_speculative_tokens
        if k is not None and (not _integer(k) or k < 1):
            raise GenerationError(f"num_speculative_tokens={k!r} is invalid: expected an integer >= 1")
        if self.draft_mode not in (None, "argmax", "sample"):
            raise GenerationError(f"draft_mode={self.draft_mode!r} is invalid: expected 'argmax' or 'sample'")
        ids = self.stop_token_ids
        if ids is not None and (not isinstance(ids, (list, tuple, set, frozenset)) or not all(map(_token_id, ids))):
            raise GenerationError(f"stop_token_ids={ids!r} is invalid: expected a list of token ids")
        top = self.logprobs
        if top is not None and (not _integer(top) or not 0 <= top <= 20):
            raise GenerationError(f"logprobs={top!r} is invalid: expected an integer in 0..20 (None = off)")
        self.sampling.validate()
        self.penalties.validate()
        check_stop_strings(self.stop)
        return self

    @property
    def sampling(self) -> SamplingParams:
        return SamplingParams(self.temperature, self.top_k, self.top_p, self.min_p)

    @property
    def penalties(self) -> Penalties:
        r = self.repetition_penalty
        a = self.presence_penalty
        f = self.frequency_penalty
        return Penalties(1.0 if r is None else r, 0.0 if a is None else a, 0.0 if f is None else f)


def _integer(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _token_id(x) -> bool:
    return _integer(x) and x >= 0
