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
        rows.append({"name": t.name, "points": getattr(t, "points", None), "required": getattr(t, "required", True),
                     "gate": getattr(t, "gate", False), "chi2": getattr(t, "chi2", 0)})
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


def points_table(rows: list[dict], alpha: float | None = None) -> str:
    """The markdown table for one assignment's tests (``rows``: name, points, required, gate, chi2), then the
    probability that a correct solution fails one of its χ² tests (at most their number times ``alpha``)."""
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
        kind = " (integrity: 0 points, but failing it scores 0)" if r.get("gate") else ""
        kind += "" if r["required"] else " (advisory)"
        lines.append(f"| {i} | `{name}`{kind} | {pts} |")
    total = sum(r["points"] or 0 for r in rows)
    lines.append(f"| | **autograded total** | **{total}** |")
    if provisional:
        lines.append("")
        lines.append("*The grader does not assign points per test yet; an even split of 80 is shown.*")
    n = sum(int(r.get("chi2") or 0) for r in rows)
    lines.append("")
    if n and alpha:
        lines.append(
            f"**Statistical tests.** This suite runs {n} Pearson χ² tests, each at significance α = {alpha:.0e}: a "
            f"correct solution fails a given one with probability at most α, and the suite with probability at most "
            f"{n} × α = {n * alpha:.1e}. Its seeds are fixed, so the grade of a given file is deterministic."
        )
    else:
        lines.append("**Statistical tests.** None: every check of this suite is exact, so a correct solution passes.")
    return "\n".join(lines)


def on_page_markdown(markdown, page, config, files):
    if "grader-points" not in markdown:
        return markdown
    reg = _registry(config)

    def repl(m):
        a = m.group(1)
        if a not in reg["tests"]:
            raise PluginError(f"{page.file.src_uri}: no assignment {a!r} in the grader ({sorted(reg['tests'])})")
        return points_table([dict(r) for r in reg["tests"][a]], reg.get("alpha"))

    return MARKER.sub(repl, markdown)
