"""mkdocs hook: render each assignment's per-test points from the grader itself, so the handouts never go stale.

A handout writes a marker on a line of its own::

    <!-- grader-points: spec_sampling -->

and this hook replaces it with a table of that assignment's public tests (name, points, required or advisory) and
the autograded total, read from ``tutorials/assignments/grade.py``'s registry (``grade.TESTS[a][i].points``). The
grader is imported in a subprocess (it chooses the Triton interpreter and imports torch, which the docs build
should not inherit), once per build. A grader that does not load fails the build.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from mkdocs.exceptions import PluginError

MARKER = re.compile(r"^<!--\s*grader-points:\s*([\w-]+)\s*-->\s*$", re.MULTILINE)
AUTOGRADED = 80  # each assignment's autograded points; the handout's written questions add 20

# Reads the registry without running any test. Tests marked hidden (an instructor-only suite) are left out.
_DUMP = r"""
import contextlib, io, json, sys
sys.path.insert(0, sys.argv[1])
with contextlib.redirect_stdout(io.StringIO()):
    import grade
out = {"alpha": getattr(grade, "ALPHA", None), "tests": {}}
for a, tests in grade.TESTS.items():
    rows = []
    for t in tests:
        suite = getattr(t, "suite", "public")
        if getattr(t, "hidden", False) or suite not in ("public", None):
            continue
        rows.append({"name": t.name, "points": getattr(t, "points", None), "required": getattr(t, "required", True)})
    out["tests"][a] = rows
print(json.dumps(out))
"""

_CACHE: dict = {}


def _registry(config) -> dict:
    if not _CACHE:
        root = Path(config.config_file_path).parent
        proc = subprocess.run(
            [sys.executable, "-c", _DUMP, str(root / "tutorials" / "assignments")],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=300,
        )
        if proc.returncode != 0:
            raise PluginError(f"could not read the grader's tests:\n{proc.stderr[-2000:]}")
        _CACHE.update(json.loads(proc.stdout.strip().splitlines()[-1]))
    return _CACHE


def points_table(rows: list[dict]) -> str:
    """The markdown table for one assignment's tests (``rows``: name, points, required)."""
    provisional = all(r["points"] is None for r in rows)
    if provisional:  # the grader does not assign points yet: show an even split of the autograded total
        req = [r for r in rows if r["required"]]
        share, extra = divmod(AUTOGRADED, max(1, len(req)))
        for i, r in enumerate(req):
            r["points"] = share + (i < extra)
    lines = ["| # | test | points |", "|---|---|---|"]
    for i, r in enumerate(rows, 1):
        pts = r["points"] or 0
        name = r["name"].replace("|", "\\|")
        kind = "" if r["required"] else " (advisory)"
        lines.append(f"| {i} | `{name}`{kind} | {pts} |")
    total = sum(r["points"] or 0 for r in rows)
    lines.append(f"| | **autograded total** | **{total}** |")
    if provisional:
        lines.append("")
        lines.append("*The grader does not assign points per test yet; an even split of 80 is shown.*")
    return "\n".join(lines)


def on_page_markdown(markdown, page, config, files):
    if "grader-points" not in markdown:
        return markdown
    reg = _registry(config)

    def repl(m):
        a = m.group(1)
        if a not in reg["tests"]:
            raise PluginError(f"{page.file.src_uri}: no assignment {a!r} in the grader ({sorted(reg['tests'])})")
        return points_table([dict(r) for r in reg["tests"][a]])

    return MARKER.sub(repl, markdown)
