"""What a submission is compared with (``similarity``): the library's own answer (the holes' bodies), the reference
solution, the tutorials; and which part of a submission is its own code.

In the repository (and an instructor copy) the library and the solutions are read from their files; the student
release holds neither, so ``release.py`` writes their fingerprints into ``reference_prints.json`` beside this file
(hashes and line numbers only, no source text), and the released grader reads them from there.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

from . import holes
from .similarity import Code, Match, fingerprint, from_json, functions, part, similarity

ADIR = Path(__file__).resolve().parent.parent  # tutorials/assignments
TDIR = ADIR.parent
ROOT = TDIR.parent
PRINTS = Path(__file__).resolve().parent / "reference_prints.json"

# the functions each starter file leaves to the student (a submission's own code is every function that is not
# given verbatim by the starter file)
STUDENT_FUNCTIONS = {
    "spec_sampling": ["propose", "verify_one"],
    "kv_rollback": ["PagedKV.append", "PagedKV.rollback", "PagedKV.trim"],
    "paged_attention_kernel": ["paged_attention_kernel"],
    "distil_drafter": ["distill_loss"],
}


def _normal(src: str) -> list[str]:
    return fingerprint(src).tokens


def own_code(assignment: str, source: str, library: bool, name: str = "submission") -> Code:
    """The part of a submission that is the student's: the holes of a library file; else every function of a
    starter-style file that the starter file does not give verbatim (helpers included)."""
    if library:
        return part(source, [h.name for h in holes.graded(assignment)], name)
    starter = ADIR / assignment / "student.py"
    given = {}
    if starter.is_file():
        given = {q: _normal(s) for q, s, _ in functions(starter.read_text(encoding="utf-8"))}
    mine = [q for q, s, _ in functions(source) if q not in given or _normal(s) != given[q]]
    return part(source, mine, name)


def _library_source(path: str) -> str | None:
    """The repository's file ``path`` if its holes hold the library's bodies (not a release's holes)."""
    f = ROOT / path
    if not f.is_file():
        return None
    text = f.read_text(encoding="utf-8")
    cut = [q for q, s, _ in functions(text, [h.name for h in holes.holes_of(path)]) if "NotImplementedError" in s]
    return None if cut else text


def library_prints(assignment: str) -> list[Code] | None:
    """The library's answer to ``assignment``: the bodies of all its holes (withheld twins too), one Code per file;
    None where the repository's library is not here (a release)."""
    codes = []
    for path in dict.fromkeys(h.path for h in holes.HOLES[assignment]):
        text = _library_source(path)
        if text is None:
            return None
        names = [h.name for h in holes.HOLES[assignment] if h.path == path]
        codes.append(part(text, names, holes.released_path(path)))
    return codes


def solution_prints(assignment: str) -> Code | None:
    f = ADIR / "solutions" / f"{assignment}.py"
    if not f.is_file():
        return None
    return own_code(assignment, f.read_text(encoding="utf-8"), False, f"the reference solution ({assignment})")


@functools.cache
def tutorial_prints() -> tuple[Code, ...]:
    return tuple(
        fingerprint(p.read_text(encoding="utf-8"), f"tutorials/{p.name}") for p in sorted(TDIR.glob("[0-9][0-9]_*.py"))
    )


def shipped_prints(assignment: str) -> list[Code]:
    """The fingerprints release.py wrote for the student release (library and solution), if any."""
    if not PRINTS.is_file():
        return []
    data = json.loads(PRINTS.read_text(encoding="utf-8"))
    return [from_json(d) for d in data.get(assignment, [])]


@functools.cache
def references(assignment: str) -> tuple[Code, ...]:
    """Everything a submission of ``assignment`` must not be a copy of: the library's answer, the reference
    solution (from their files, else the shipped fingerprints) and every tutorial."""
    if PRINTS.is_file():  # a student release: its library is the student's own (holes filled), never a reference
        refs = shipped_prints(assignment)
    else:
        refs = (library_prints(assignment) or []) + [c for c in [solution_prints(assignment)] if c is not None]
    return tuple(refs) + tutorial_prints()


def check(assignment: str, source: str, library: bool) -> tuple[Match | None, list[Match]]:
    """(the closest reference, every flagged one) for one submission."""
    mine = own_code(assignment, source, library)
    if not mine.prints:
        return None, []
    matches = [similarity(mine, r) for r in references(assignment) if r.prints]
    closest = max(matches, key=lambda m: (m.share, m.tokens), default=None)
    return closest, [m for m in matches if m.flagged]


def pairwise(codes: dict[str, Code]) -> list[Match]:
    """Every flagged pair of submissions (roster mode), each pair once, in both directions' larger share."""
    ids = sorted(codes)
    out = []
    for i, a in enumerate(ids):
        for b in ids[i + 1 :]:
            m1, m2 = similarity(codes[a], codes[b]), similarity(codes[b], codes[a])
            m = max(m1, m2, key=lambda m: m.share)
            if m.flagged:
                out.append(m)
    return out
