"""Which functions of the library are each assignment's holes: the one table the release script and the grader read.

The student release (``release.py``) ships the minimtp package itself with every function listed here replaced by
its signature, its docstring and ``raise NotImplementedError(...)``; the student fills them in place (``pip install
-e`` the release) and ``python -m minimtp.generate`` then runs on their code. ``grade.py ASSIGNMENT --library``
grades the filled file (``LIBRARY_FILE``) through the assignment's API (``grading/library.py``).

``withheld`` holes are twins of the same math elsewhere in the package (the Triton verifier): removed so that the
release does not hold the answer, never graded, not needed by the default engine. This module imports nothing but
the standard library (the release script loads it without torch).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Hole:
    path: str  # the file, relative to the repository root (kernels/ is installed as minimtp/kernels/)
    name: str  # the function, or Class.method
    what: str = ""  # one line: what the student writes (the raise's message)
    withheld: bool = False  # a twin of the answer, removed but not to be written


HOLES: dict[str, list[Hole]] = {
    "spec_sampling": [
        Hole("minimtp/speculative.py", "acceptance_ratio", "the acceptance ratio p(x) / q(x) (q None: p(x))"),
        Hole("minimtp/speculative.py", "residual_sample", "the residual (p - q)^+"),
        Hole("minimtp/speculative.py", "residual_argmax", "p with the draft token zeroed"),
        Hole("minimtp/speculative.py", "residual_or_target", "the residual, or p where it is all zero"),
        Hole("minimtp/speculative.py", "verify", "exact verification: accept a prefix, then one residual/bonus token"),
        Hole("kernels/verify.py", "_num_accepted", "the Triton twin of verify", withheld=True),
        Hole("kernels/verify.py", "_race_kernel", "the Triton twin of verify", withheld=True),
    ],
    "kv_rollback": [
        Hole("minimtp/kv_cache.py", "KVCache.reserve", "append: cover positions 0..n-1, atomically"),
        Hole("minimtp/kv_cache.py", "KVCache.truncate", "rollback: forget positions >= n, free the blocks past n"),
        Hole("minimtp/kv_cache.py", "KVCache.trim_window", "free the sliding blocks no query can see again"),
    ],
    "paged_attention_kernel": [
        Hole("kernels/paged_attention.py", "_paged_attention_kernel", "the paged-attention kernel"),
    ],
    "distil_drafter": [
        Hole("minimtp/train/distill.py", "distill_loss", "the multi-step distillation loss"),
    ],
}

# the library file each assignment's grader reads in --library mode (its path inside an installed minimtp)
LIBRARY_FILE = {
    "spec_sampling": "minimtp/speculative.py",
    "kv_rollback": "minimtp/kv_cache.py",
    "paged_attention_kernel": "minimtp/kernels/paged_attention.py",
    "distil_drafter": "minimtp/train/distill.py",
}

# the modules each library file imports at its top (the graded file may import nothing else; tests check the table
# against the source)
LIBRARY_IMPORTS = {
    "spec_sampling": {"__future__", "torch", "minimtp.sampling"},
    "kv_rollback": {"__future__", "torch", "minimtp.config", "minimtp.errors"},
    "paged_attention_kernel": {"__future__", "math", "torch", "triton", "triton.language", "minimtp.kernels.runtime"},
    "distil_drafter": {
        "__future__",
        "os",
        "sys",
        "torch",
        "minimtp.assistant",
        "minimtp.attention",
        "minimtp.model",
        "minimtp.train.checkpoints",
        "minimtp.train.configs",
        "minimtp.train.data",
        "minimtp.train.loop",
        "minimtp.train.report",
    },
}


def released_path(path: str) -> str:
    """Where a repository file lies in the release: ``kernels/x.py`` is installed as ``minimtp/kernels/x.py``."""
    return "minimtp/" + path if path.startswith("kernels/") else path


def holes_of(path: str) -> list[Hole]:
    """The holes of one file (a repository path or a released one)."""
    return [h for hs in HOLES.values() for h in hs if path in (h.path, released_path(h.path))]


def graded(assignment: str) -> list[Hole]:
    """The holes a student writes for ``assignment`` (the withheld twins left out)."""
    return [h for h in HOLES[assignment] if not h.withheld]


# ------------------------------------------------------------------------------------------------ cutting, filling


def _function_nodes(tree, names: set[str]) -> dict:
    import ast

    found = {}

    def visit(body, prefix):
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and prefix + node.name in names:
                found[prefix + node.name] = node
            elif isinstance(node, ast.ClassDef):
                visit(node.body, prefix + node.name + ".")

    visit(tree.body, "")
    return found


def _body_range(node, lines: list[str]) -> tuple[int, int]:
    """(first, last) line, 1-based, of a function's body without its docstring; comment lines just before the first
    statement count as body."""
    import ast

    body = node.body
    if isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value,
                                                                                                 str):  # fmt: skip
        return body[0].end_lineno + 1, node.end_lineno
    first = body[0].lineno
    while first - 2 >= 0 and lines[first - 2].strip().startswith("#"):
        first -= 1
    return first, node.end_lineno


def cut(source: str, holes: list[Hole], assignment_of: dict[str, str]) -> str:
    """``source`` with the body of every hole replaced by ``raise NotImplementedError(...)`` (signature and
    docstring kept). ``assignment_of``: hole name -> its assignment (named in the message)."""
    import ast

    lines = source.splitlines()
    nodes = _function_nodes(ast.parse(source), {h.name for h in holes})
    missing = {h.name for h in holes} - set(nodes)
    if missing:
        raise KeyError(f"no function {sorted(missing)} in the source: the hole table (grading/holes.py) is stale")
    by_name = {h.name: h for h in holes}
    for name, node in sorted(nodes.items(), key=lambda kv: -kv[1].lineno):
        first, last = _body_range(node, lines)
        indent = " " * (node.body[-1].col_offset if node.body else node.col_offset + 4)
        hole = by_name[name]
        a = assignment_of.get(name, "")
        if hole.withheld:
            msg = f"withheld from the student release: {hole.what} (the answer of assignment {a})"
        else:
            msg = f"assignment {a}: write {name.split('.')[-1]} ({hole.what}); handouts/{a}.md"
        lines[first - 1 : last] = [f"{indent}raise NotImplementedError({msg!r})"]
    return "\n".join(lines) + ("\n" if source.endswith("\n") else "")


def fill(source: str, donor: str, names: list[str]) -> str:
    """``source`` with the named functions replaced by the donor source's (how a student fills the holes; tests fill
    a released file with the library's own bodies)."""
    import ast

    lines = source.splitlines()
    donor_lines = donor.splitlines()
    mine = _function_nodes(ast.parse(source), set(names))
    theirs = _function_nodes(ast.parse(donor), set(names))
    for name, node in sorted(mine.items(), key=lambda kv: -kv[1].lineno):
        other = theirs[name]
        first = min([node.lineno] + [d.lineno for d in node.decorator_list])
        o_first = min([other.lineno] + [d.lineno for d in other.decorator_list])
        lines[first - 1 : node.end_lineno] = donor_lines[o_first - 1 : other.end_lineno]
    return "\n".join(lines) + ("\n" if source.endswith("\n") else "")
