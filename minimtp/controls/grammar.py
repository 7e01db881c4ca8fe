"""Constrained decoding: JSON Schema, regular expressions and Lark / GBNF grammars, matched by llguidance.

llguidance (the grammar engine of llama.cpp and mistral.rs; docs: concepts/controls, "Why llguidance") turns a
grammar and the tokenizer into a matcher: given the tokens so far it returns the set of tokens that keep the text a
prefix of some string of the grammar (the end-of-sequence tokens once the text is complete), and it rolls back.

`Grammar.allowed(g)` is a pure function of the generated tokens g. The matcher is only a cache of it: it is moved to
g by rolling back to the longest common prefix and consuming the rest, and the masks of the last positions are kept,
so a round's drafts and then its verify rows (g = emitted + d_1..d_j) cost one mask per position.
"""

from __future__ import annotations

import json
import os

import llguidance
import torch
from llguidance.gbnf_to_lark import any_to_lark

from minimtp.errors import GenerationError

# JSON Schema keywords (draft 2020-12 and draft 7) and the annotations llguidance reads; any other key is a typo
SCHEMA_KEYS = set(
    "$schema $id $ref $defs definitions $comment $anchor $dynamicRef $dynamicAnchor $vocabulary title description "
    "default examples deprecated readOnly writeOnly type enum const multipleOf maximum exclusiveMaximum minimum "
    "exclusiveMinimum maxLength minLength pattern format maxItems minItems uniqueItems maxContains minContains "
    "maxProperties minProperties required dependentRequired dependencies properties patternProperties "
    "additionalProperties propertyNames items prefixItems additionalItems contains unevaluatedItems "
    "unevaluatedProperties allOf anyOf oneOf not if then else dependentSchemas contentEncoding contentMediaType "
    "contentSchema x-guidance".split()
)
_SUBSCHEMA = {"items", "additionalProperties", "propertyNames", "contains", "additionalItems", "not", "if", "then"}
_SUBSCHEMA |= {"else", "unevaluatedItems", "unevaluatedProperties", "contentSchema"}
_SCHEMA_LIST = {"allOf", "anyOf", "oneOf", "prefixItems"}
_SCHEMA_MAP = {"properties", "patternProperties", "$defs", "definitions", "dependentSchemas"}


def check_schema_keys(schema, where: str = "#") -> None:
    """Raise GenerationError naming the first key of a (sub)schema that is not a JSON Schema keyword."""
    if isinstance(schema, bool):
        return
    if not isinstance(schema, dict):
        raise GenerationError(f"json_schema at {where}: expected an object or a boolean, got {type(schema).__name__}")
    for key, value in schema.items():
        if key not in SCHEMA_KEYS:
            raise GenerationError(f"json_schema at {where}: unknown key {key!r} (not a JSON Schema keyword)")
        if key in _SUBSCHEMA:
            check_schema_keys(value, f"{where}/{key}")
        elif key in _SCHEMA_LIST and isinstance(value, list):
            for i, s in enumerate(value):
                check_schema_keys(s, f"{where}/{key}/{i}")
        elif key in _SCHEMA_MAP and isinstance(value, dict):
            for name, s in value.items():
                check_schema_keys(s, f"{where}/{key}/{name}")


def grammar_source(json_schema=None, regex: str | None = None, grammar: str | None = None) -> str | None:
    """The llguidance grammar for at most one of: a JSON Schema (dict, or JSON text), a regex, a Lark or GBNF
    grammar (text). None if none is given. Raises GenerationError for two at once or a malformed schema."""
    given = [n for n, v in (("json_schema", json_schema), ("regex", regex), ("grammar", grammar)) if v is not None]
    if len(given) > 1:
        raise GenerationError(f"{' and '.join(given)} given: pass at most one of json_schema, regex, grammar")
    if json_schema is not None:
        if isinstance(json_schema, str):
            try:
                json_schema = json.loads(json_schema)
            except ValueError as e:
                raise GenerationError(f"json_schema is not valid JSON ({e})") from None
        check_schema_keys(json_schema)
        if json_schema is False:  # the boolean schemas: false matches nothing, true anything (the options need a dict)
            raise GenerationError("json_schema is false: no JSON value matches it")
        json_schema = {} if json_schema is True else json_schema
        # one layout, json.dumps's (", " and ": ", no other whitespace): a model cannot wander off into blank lines;
        # a schema's "x-guidance" object overrides it (llguidance's JSON options)
        return llguidance.LLMatcher.grammar_from_json_schema(json_schema, defaults=JSON_LAYOUT)
    if regex is not None:
        if not isinstance(regex, str) or not regex:
            raise GenerationError(f"regex={regex!r} is invalid: expected a non-empty string")
        return llguidance.LLMatcher.grammar_from_regex(regex)
    if grammar is not None:
        if not isinstance(grammar, str) or not grammar.strip():
            raise GenerationError("grammar is empty: expected a Lark or GBNF grammar")
        try:
            return llguidance.LLMatcher.grammar_from_lark(any_to_lark(grammar))
        except Exception as e:  # the GBNF converter raises plain exceptions with a position
            raise GenerationError(f"grammar: {str(e).splitlines()[0]}") from None
    return None


JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
_TOKENIZERS: dict = {}


def llg_tokenizer(tokenizer, vocab_size: int, eos_ids):
    """llguidance's view of a Hugging Face fast tokenizer (about a second at 262k tokens, so cached)."""
    import llguidance.hf  # imports transformers: only when a grammar or token healing needs it

    key = (id(tokenizer), vocab_size, tuple(eos_ids))
    if key not in _TOKENIZERS:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        try:
            _TOKENIZERS[key] = (tokenizer, llguidance.hf.from_tokenizer(tokenizer, vocab_size, list(eos_ids)))
        except ValueError as e:
            raise GenerationError(f"grammars need a fast (tokenizer.json) tokenizer: {e}") from None
    return _TOKENIZERS[key][1]


def _unpack(mask: bytes, V: int) -> torch.Tensor:
    """llguidance's bitmask (bit t % 8 of byte t // 8 = token t allowed) -> bool [V]."""
    u8 = torch.frombuffer(bytearray(mask), dtype=torch.uint8)
    return ((u8[:, None] >> torch.arange(8, dtype=torch.uint8)) & 1).flatten()[:V].bool()


class Grammar:
    """The grammar constraint of one sequence (`minimtp.controls.logits.Constraint`)."""

    KEEP = 64  # masks kept (positions); older ones are recomputed on request

    def __init__(self, tokenizer, source: str, vocab_size: int, eos_ids):
        llt = llg_tokenizer(tokenizer, vocab_size, eos_ids)
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(source, llt)
        if is_error:
            raise GenerationError(f"invalid grammar: {_first_line(messages[0])}")
        self.matcher = llguidance.LLMatcher(llt, source, log_level=0)
        self.V = vocab_size
        self.eos = set(eos_ids)
        self.tokens: list[int] = []  # what the matcher has consumed
        self.masks: dict[int, bytes] = {}  # position -> mask after tokens[:position]

    def allowed(self, generated: list[int]) -> torch.Tensor | None:
        """Tokens that may follow ``generated`` under the grammar; None past an end token or a forbidden token."""
        n = _common_prefix(self.tokens, generated)
        if n == len(generated) and n in self.masks:  # a row before the matcher's position: seen already
            return _unpack(self.masks[n], self.V)
        if n < len(self.tokens):  # roll the matcher back to the common prefix
            self.matcher.rollback(len(self.tokens) - n)
            del self.tokens[n:]
            self.masks = {i: m for i, m in self.masks.items() if i <= n}
        for t in generated[n:]:
            if t in self.eos or not self._mask()[t // 8] >> (t % 8) & 1:
                return None  # the text is over, or broke the grammar: this row is never used (controls.py)
            if not self.matcher.consume_token(t):
                raise GenerationError(f"grammar matcher failed: {_first_line(self.matcher.get_error())}")
            self.tokens.append(t)
        return _unpack(self._mask(), self.V)

    def _mask(self) -> bytes:
        n = len(self.tokens)
        if n not in self.masks:
            self.masks[n] = self.matcher.compute_bitmask()
            self.masks.pop(n - self.KEEP, None)
        return self.masks[n]


def _common_prefix(a: list[int], b: list[int]) -> int:
    if b[: len(a)] == a:
        return len(a)
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _first_line(msg: str) -> str:
    """llguidance's message on one line: its first line, plus the "error: ..." line of a regex error."""
    lines = [s.strip() for s in msg.splitlines() if s.strip()]
    detail = [s for s in lines[1:] if s.startswith("error:")]
    return " ".join(lines[:1] + detail[:1]) if lines else "unknown error"
