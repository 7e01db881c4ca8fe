"""Lines of each part of minimtp as ``ruff format`` lays them out: total, and code (no blank, comment or docstring
lines). The design is checked by tests/test_layout.py; sizes are reported here, not capped.

    python scripts/line_counts.py            # one row per folder of the package, then the reference modules
"""

from __future__ import annotations

import ast
import io
import tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def code_lines(path: Path) -> int:
    """Lines holding code: not blank, not only a comment, not inside a docstring."""
    src = path.read_text(encoding="utf-8")
    docstrings = set()
    for node in ast.walk(ast.parse(src)):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr):
            value = body[0].value
            if isinstance(value, ast.Constant) and isinstance(value.value, str):
                docstrings |= set(range(body[0].lineno, body[0].end_lineno + 1))
    lines = set()
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type not in (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT):
            lines |= set(range(tok.start[0], tok.end[0] + 1))
    return len(lines - docstrings)


def row(name: str, paths: list[Path]) -> str:
    total = sum(len(p.read_text(encoding="utf-8").splitlines()) for p in paths)
    return f"| {name} | {len(paths)} | {total} | {sum(map(code_lines, paths))} |"


def main() -> None:
    package = ROOT / "minimtp"
    print("| part | files | lines | code lines |\n|---|---|---|---|")
    print(row("minimtp/ (top level)", sorted(package.glob("*.py"))))
    for folder in sorted(p for p in package.iterdir() if p.is_dir() and any(p.glob("*.py"))):
        print(row(f"minimtp/{folder.name}/", sorted(folder.glob("*.py"))))
    print()
    print("| module | lines | code lines |\n|---|---|---|")
    for path in sorted(package.glob("*.py")):
        print(
            f"| {path.relative_to(ROOT)} | {len(path.read_text(encoding='utf-8').splitlines())} | {code_lines(path)} |"
        )


if __name__ == "__main__":
    main()
