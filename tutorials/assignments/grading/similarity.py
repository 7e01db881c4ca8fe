"""Copy detection: winnowed fingerprints of normalised token k-grams (MOSS; Schleimer, Wilkerson and Aiken,
"Winnowing: local algorithms for document fingerprinting", SIGMOD 2003).

A file becomes a token sequence with comments, docstrings and layout dropped and every local name replaced by
``V`` (renaming variables changes nothing), while attribute names (``.clamp_min``, ``tl.load``), keywords,
operators and builtins stay (they cannot be renamed without changing the program). Every ``K``-gram of tokens is
hashed (blake2b, stable across runs and machines), and in every window of ``W`` consecutive hashes the smallest
one is kept: a shared run of at least ``W + K - 1`` tokens is always found, a shared run shorter than ``K`` never.

``similarity(a, b)`` is the share of ``a``'s fingerprints that are also in ``b``, with the matching spans (line
ranges of both files). The grader flags a submission when that share, against one reference, reaches
``FLAG_SHARE`` over at least ``MIN_TOKENS`` matched tokens. The thresholds were measured on the fixtures
(docs/assignments.md, "Copy detection": every number there is printed by
``python tutorials/assignments/grading/similarity.py``).
"""

from __future__ import annotations

import ast
import builtins
import hashlib
import io
import keyword
import tokenize
from dataclasses import dataclass, field

K = 10  # tokens per k-gram: a shared run shorter than this is never reported
W = 6  # winnowing window: a shared run of W + K - 1 = 15 tokens or more is always reported
# Measured on the fixtures (docs/assignments.md, "Copy detection"): a submission is flagged when this share of its
# assignment code's fingerprints is found in one reference, over at least MIN_TOKENS matched tokens.
FLAG_SHARE = 0.6  # honest code measured at most 0.46 (the reference kernel against tutorial 07, which it extends)
MIN_TOKENS = 40  # a few shared lines (a signature, a common idiom) are never a copy

_STRINGS = {tokenize.STRING, getattr(tokenize, "FSTRING_START", -1)}
_FSTRING_PARTS = {getattr(tokenize, "FSTRING_MIDDLE", -2), getattr(tokenize, "FSTRING_END", -3)}
_KEEP = set(keyword.kwlist) | set(dir(builtins)) | {"self", "cls", "torch", "tl", "triton"}


@dataclass
class Code:
    """The normalised tokens of a source text (``tokens``, with the line of each in ``lines``) and its winnowed
    fingerprints (``prints``: hash -> the positions of the k-grams that have it)."""

    name: str
    tokens: list[str]
    lines: list[int]
    prints: dict[int, list[int]] = field(default_factory=dict)
    tokens_hash: dict[int, int] = field(default_factory=dict)  # position -> the hash of the k-gram starting there

    @property
    def size(self) -> int:
        return len(self.tokens)


def _docstring_lines(source: str) -> set[int]:
    """The lines of every docstring (a string expression that is a module's, class's or function's first
    statement): they are prose, copied or not."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return set()
    out: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                if isinstance(first.value.value, str):
                    out |= set(range(first.lineno, first.end_lineno + 1))
    return out


def normalise(source: str) -> tuple[list[str], list[int]]:
    """The token sequence of ``source`` and the line of each token. Local names become ``V``, numbers ``N``,
    strings ``S``; attribute names, keywords, builtins, operators stay; comments, docstrings and layout go."""
    skip = _docstring_lines(source)
    tokens: list[str] = []
    lines: list[int] = []
    prev = ""
    try:
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            kind, text, line = tok.type, tok.string, tok.start[0]
            if kind in (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT):
                continue
            if kind == tokenize.ENDMARKER or line in skip:
                continue
            if kind == tokenize.NAME:
                word = text if (text in _KEEP or prev == ".") else "V"
            elif kind == tokenize.NUMBER:
                word = "N"
            elif kind in _STRINGS:
                word = "S"
            elif kind in _FSTRING_PARTS:
                continue
            else:
                word = text
            tokens.append(word)
            lines.append(line)
            prev = text
    except (tokenize.TokenError, IndentationError, SyntaxError):
        pass  # an unfinished file: what was read so far
    return tokens, lines


def _hash(gram: tuple[str, ...]) -> int:
    return int.from_bytes(hashlib.blake2b("\x1f".join(gram).encode(), digest_size=8).digest(), "little")


def fingerprint(source: str, name: str = "", first_line: int = 1) -> Code:
    """The winnowed fingerprints of ``source`` (``first_line``: the line number of its first line, for spans)."""
    tokens, lines = normalise(source)
    lines = [line + first_line - 1 for line in lines]
    code = Code(name, tokens, lines)
    hashes = [_hash(tuple(tokens[i : i + K])) for i in range(len(tokens) - K + 1)]
    if not hashes:
        return code
    chosen: set[int] = set()
    for start in range(max(1, len(hashes) - W + 1)):
        window = hashes[start : start + W]
        low = min(window)
        chosen.add(start + max(i for i, h in enumerate(window) if h == low))  # the rightmost minimum (the paper's)
    for i in sorted(chosen):
        code.prints.setdefault(hashes[i], []).append(i)
        code.tokens_hash[i] = hashes[i]
    return code


@dataclass
class Match:
    """How much of ``a`` is found in ``b``: ``share`` of a's fingerprints, ``tokens`` of a covered by the matching
    k-grams, and ``spans``: ((first, last) line of a, (first, last) line of b) for every run of matches."""

    a: str
    b: str
    share: float
    tokens: int
    spans: list[tuple[tuple[int, int], tuple[int, int]]]

    @property
    def flagged(self) -> bool:
        return self.share >= FLAG_SHARE and self.tokens >= MIN_TOKENS

    def describe(self, limit: int = 4) -> str:
        spans = ", ".join(f"lines {a0}-{a1} ~ {self.b} lines {b0}-{b1}" for (a0, a1), (b0, b1) in self.spans[:limit])
        more = f" (+{len(self.spans) - limit} more)" if len(self.spans) > limit else ""
        return f"{self.share:.0%} of the fingerprints ({self.tokens} tokens) match {self.b}: {spans}{more}"


def similarity(a: Code, b: Code) -> Match:
    """The share of ``a``'s fingerprints found in ``b``, and the matching spans (line ranges of both)."""
    total = sum(len(v) for v in a.prints.values())
    pairs = []  # (position in a, position in b): each k-gram of a at the b position that continues the last pair
    for i in sorted(i for h, pos in a.prints.items() if h in b.prints for i in pos):
        options = b.prints[a.tokens_hash[i]] if a.tokens_hash else []
        want = pairs[-1][1] + (i - pairs[-1][0]) if pairs else None
        j = min(options, key=lambda j: abs(j - want)) if (options and want is not None) else options[0]
        pairs.append((i, j))
    covered: set[int] = set()
    for i, _ in pairs:
        covered |= set(range(i, i + K))
    runs: list[list[int]] = []  # [a_start, a_end, b_start, b_end] token positions
    for i, j in pairs:
        if runs and i <= runs[-1][1] + W and runs[-1][2] - W <= j <= runs[-1][3] + W + K:
            runs[-1][1] = i + K - 1
            runs[-1][3] = max(runs[-1][3], j + K - 1)
            runs[-1][2] = min(runs[-1][2], j)
        else:
            runs.append([i, i + K - 1, j, j + K - 1])
    spans = [
        ((a.lines[r[0]], a.lines[min(r[1], a.size - 1)]), (b.lines[r[2]], b.lines[min(r[3], b.size - 1)])) for r in runs
    ]
    share = sum(len(a.prints[h]) for h in a.prints if h in b.prints) / total if total else 0.0
    return Match(a.name, b.name, share, len(covered), spans)


def functions(source: str, names: list[str] | None = None) -> list[tuple[str, str, int]]:
    """(qualified name, source, first line) of every function (methods as ``Class.method``) of ``source``, or of
    those named in ``names``; [] for a file that does not parse."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return []
    lines = source.splitlines()
    out = []

    def visit(body, prefix):
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                qual = prefix + node.name
                if names is None or qual in names or node.name in names:
                    first = min([node.lineno] + [d.lineno for d in node.decorator_list])
                    out.append((qual, "\n".join(lines[first - 1 : node.end_lineno]), first))
            elif isinstance(node, ast.ClassDef):
                visit(node.body, prefix + node.name + ".")

    visit(tree.body, "")
    return out


def part(source: str, names: list[str], name: str) -> Code:
    """The fingerprints of the named functions of ``source`` only (a library file's holes), spans in the file's
    own line numbers."""
    codes = [fingerprint(src, name, first) for _, src, first in functions(source, names)]
    out = Code(name, [], [])
    for c in codes:  # concatenated, with an impossible token between them so no k-gram spans two functions
        shift = out.size
        out.tokens += c.tokens + ["\x00"]
        out.lines += c.lines + [c.lines[-1] if c.lines else 1]
        for h, pos in c.prints.items():
            out.prints.setdefault(h, []).extend(p + shift for p in pos)
            out.tokens_hash.update({p + shift: h for p in pos})
    return out


def best_match(sub: Code, refs: list[Code]) -> Match | None:
    """The reference ``sub`` is most similar to (the highest share), or None without references."""
    matches = [similarity(sub, r) for r in refs if r.prints]
    return max(matches, key=lambda m: (m.share, m.tokens), default=None)


def to_json(code: Code) -> dict:
    """A reference's fingerprints as JSON-able data (hashes and their lines only: no source text)."""
    return {
        "name": code.name,
        "lines": code.lines,
        "size": code.size,
        "prints": {str(h): pos for h, pos in code.prints.items()},
    }


def from_json(data: dict) -> Code:
    code = Code(data["name"], ["?"] * data["size"], list(data["lines"]))
    code.prints = {int(h): list(pos) for h, pos in data["prints"].items()}
    code.tokens_hash = {p: h for h, pos in code.prints.items() for p in pos}
    return code
