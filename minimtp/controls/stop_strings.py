"""Stop strings: end a sequence when its decoded text contains one of the strings.

The text is checked after every emitted token, in order, also inside an accepted block of drafts, so a
speculative run stops at exactly the token plain decoding would stop at (the condition is a function of the
emitted prefix). The sequence keeps the token that completed the string; its text is cut before the string
(vLLM's convention), or after it with ``include_stop_str_in_output=True`` (vLLM's name).
"""

from __future__ import annotations

from minimtp.errors import GenerationError


def check_stop_strings(stop) -> list[str]:
    """``stop``: None, a string or a list of non-empty strings -> list of strings."""
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, (list, tuple)):
        raise GenerationError(f"stop={stop!r} is invalid: expected a string or a list of strings")
    for i, s in enumerate(stops):
        if not isinstance(s, str) or not s:
            raise GenerationError(f"stop[{i}]={s!r} is invalid: expected a non-empty string")
    return list(stops)


class StopStrings:
    """Decodes a sequence's tokens with ``tokenizer`` and finds the stop strings in its text. ``prefix``: text the
    first tokens re-spell and that is not part of the continuation (token healing's removed text)."""

    def __init__(self, tokenizer, stops: list[str], include: bool = False, prefix: str = ""):
        self.tokenizer = tokenizer
        self.stops = stops
        self.include = include
        self.prefix = prefix

    def text(self, tokens: list[int]) -> str:
        """The continuation: the decoded tokens without special tokens and without the healed prefix."""
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        return text[len(self.prefix) :] if text.startswith(self.prefix) else ""

    def find(self, text: str) -> tuple[int, str] | None:
        """(index, string) of the earliest stop string in ``text``, or None."""
        hits = [(i, s) for s in self.stops if (i := text.find(s)) >= 0]
        return min(hits) if hits else None

    def cut(self, tokens: list[int]) -> str:
        """The returned text: cut before (or after, with include) the first stop string."""
        text = self.text(tokens)
        hit = self.find(text)
        if hit is None:
            return text
        return text[: hit[0] + (len(hit[1]) if self.include else 0)]


class TextStream:
    """The text a stream may show so far: the continuation cut at a stop string (``stops.cut``), less its last
    (longest stop string - 1) characters, which may still become a stop string, and nothing while it ends in a
    partial UTF-8 character. ``delta(tokens, final=True)`` returns the rest: the shown text is then exactly the
    cut text."""

    def __init__(self, stops: StopStrings):
        self.stops = stops
        self.shown = ""
        self.hold = max((len(s) for s in stops.stops), default=1) - 1

    def delta(self, tokens: list[int], final: bool = False) -> str:
        text = self.stops.cut(tokens)
        if not final:
            text = text[: len(text) - self.hold]
            if text.endswith("\ufffd") or not text.startswith(self.shown):
                return ""
        new = text[len(self.shown) :]
        self.shown = text
        return new
