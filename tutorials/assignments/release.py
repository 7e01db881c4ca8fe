#!/usr/bin/env python
"""Build the student release of the assignments: the folder an instructor hands out instead of this repository.

    python tutorials/assignments/release.py OUT                  # what students get
    python tutorials/assignments/release.py --instructor OUT     # the same, plus the hidden grader suite
    python tutorials/assignments/release.py OUT --docs-url https://example.org/minimtp   # handout links absolute

``OUT`` (created; it must not exist yet, or be empty) receives, in the repository's own layout so that every
command in the handouts and starter files works unchanged from ``OUT``:

* ``README.md`` — how to install the dependency, work on an assignment and grade it, with the points per test;
* ``tutorials/assignments/<assignment>/`` — the starter file(s) (``student.py``) of every assignment;
* ``tutorials/assignments/grade.py`` and every local module or package it imports (found by following its
  ``import`` statements, e.g. a ``grader/`` package next to it), **except files whose name starts with
  ``hidden``** (the instructor-only suite);
* the helper modules of ``tutorials/`` that the grader, the starters or the tutorials import (``_tiny.py``);
* ``tutorials/NN_*.py`` — the numbered tutorials the starter files tell students to read first (tests check that
  no tutorial contains an assignment's answer: tests/test_release.py);
* ``minimtp/`` and ``pyproject.toml`` — **the minimtp package itself**, with every assignment's functions replaced
  by holes (``raise NotImplementedError``), cut from the library's source by its syntax tree following the one
  table ``grading/holes.py``: ``pip install -e .`` in ``OUT`` installs it, the student fills the holes in place, and
  ``python -m minimtp.generate`` then runs on their sampler, their rollback, their kernel. The Triton kernels
  (``kernels/``, a symlink ``minimtp/kernels`` in the repository) are copied as the folder ``minimtp/kernels/``;
  ``grading/reference_prints.json`` holds the fingerprints of the library's answers and of the reference solutions
  (hashes and line numbers, no code) so that the released grader's copy check still has them;
* ``handouts/<assignment>.md`` — the handout page ``docs/assignments/<assignment>.md``, where it exists, and
  ``handouts/figures/`` — the images it shows (the figures the docs build draws, drawn here with
  ``scripts/figures.py``). Every link of a handout resolves inside the release or points to the published docs:
  links to the tutorials and to the other handouts stay relative (they are in the release); links to other docs
  pages become absolute links into the published docs with ``--docs-url``, else plain text naming the page (the
  script lists them). tests/test_release.py checks every link.

Never copied: ``solutions/``, ``fixtures/``, ``hidden*`` files (unless ``--instructor``), this script, the
assignments' developer README (it lists the fixtures). The release refuses to build if the grader imports a module
from ``solutions/`` or ``fixtures/``. The released grader needs the ``minimtp`` package installed (its wheel holds
the library only: no tutorials, no assignments), as the README explains.

``--instructor`` ships the complete library (no holes: the instructor's grader compares with it) and also copies
the hidden suite (every ``hidden*`` file under ``tutorials/assignments/``, same
relative path, and whatever it imports, reference solutions included) so that the released grader can run it
(``grade.py <assignment> FILE --hidden SECRET``); keep that folder away from students.
"""

from __future__ import annotations

import argparse
import ast
import os
import re
import shutil
import sys
from pathlib import Path

ADIR = Path(__file__).resolve().parent  # tutorials/assignments
TDIR = ADIR.parent  # tutorials
ROOT = TDIR.parent  # the repository
DOCS = ROOT / "docs"
FORBIDDEN_DIRS = ("solutions", "fixtures")
SKIP_NAMES = {"__pycache__", ".pytest_cache", ".ipynb_checkpoints"}


class ReleaseError(RuntimeError):
    pass


def is_hidden(path: Path) -> bool:
    """A file of the instructor-only suite: its name, or a folder above it (below tutorials/), starts with hidden."""
    return any(part.startswith("hidden") for part in path.relative_to(TDIR).parts)


def is_forbidden(path: Path) -> bool:
    rel = path.resolve().relative_to(ADIR) if path.resolve().is_relative_to(ADIR) else None
    return rel is not None and len(rel.parts) > 1 and rel.parts[0] in FORBIDDEN_DIRS


def assignments() -> list[str]:
    """Every folder of tutorials/assignments/ with a starter file ``student.py``."""
    return sorted(p.parent.name for p in ADIR.glob("*/student.py") if p.parent.name not in FORBIDDEN_DIRS)


def _package_files(pkg: Path, instructor: bool) -> list[Path]:
    files = []
    for p in sorted(pkg.rglob("*")):
        if not p.is_file() or SKIP_NAMES & set(p.parts) or p.suffix == ".pyc":
            continue
        if is_hidden(p) and not instructor:
            continue
        files.append(p)
    return files


def _imported_names(path: Path) -> set[tuple[int, str]]:
    """(level, dotted name) of every import in the file, including those inside functions."""
    names: set[tuple[int, str]] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names |= {(0, a.name) for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            names.add((node.level, base))
            names |= {(node.level, f"{base}.{a.name}" if base else a.name) for a in node.names}
    return names


def _resolve(path: Path, level: int, name: str) -> Path | None:
    """The local file or package folder (under tutorials/) an import of ``path`` refers to, else None. Search
    order: relative imports from the file's package; absolute ones from the file's folder (the script's folder
    is first on sys.path), tutorials/assignments/ and tutorials/ (the grader puts it on sys.path)."""
    if level:
        base = path.parent
        for _ in range(level - 1):
            base = base.parent
        roots = [base]
    else:
        roots = list(dict.fromkeys([path.parent, ADIR, TDIR]))
    parts = [p for p in name.split(".") if p]
    if not parts:
        return path.parent if level else None
    for root in roots:
        top = root / parts[0]
        if top.is_dir() and any(top.glob("*.py")):
            return top
        if top.with_suffix(".py").is_file():
            return top.with_suffix(".py")
    return None


def closure(starts: list[Path], instructor: bool = False) -> list[Path]:
    """Every local file (under tutorials/) that ``starts`` need, by following their imports transitively."""
    seen: dict[Path, None] = {}
    todo = [p.resolve() for p in starts]
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen[p] = None
        if p.suffix != ".py":
            continue
        for level, name in sorted(_imported_names(p)):
            hit = _resolve(p, level, name)
            if hit is None:
                continue
            hit = hit.resolve()
            if not hit.is_relative_to(TDIR):
                continue
            if (is_forbidden(hit) or hit.name in FORBIDDEN_DIRS) and not (instructor and is_hidden(p)):
                raise ReleaseError(f"{p.relative_to(ROOT)} imports {name!r} from {hit.relative_to(ROOT)}: refusing")
            if is_hidden(hit) and not instructor:
                continue  # the hidden suite is optional for the public grader
            todo += _package_files(hit, instructor) if hit.is_dir() else [hit]
    return [p for p in seen if p.is_file()]


# a markdown link or image (the label holds no bracket), or code (a fenced block, an inline span) to step over
LINK = re.compile(r"(?P<code>```.*?```|`[^`\n]*`)|(?P<label>!?\[[^\[\]]*\])\((?P<target>[^)\s]+)\)", re.S)
_FIGURES: list = []  # scripts/figures.py, loaded on first use (None: it cannot be loaded here)


def _figures():
    """The docs' figure code (``scripts/figures.py``: ``FIGURES`` and ``render(name)``), or None without it (or
    without matplotlib)."""
    if not _FIGURES:
        path = ROOT / "scripts" / "figures.py"
        mod = None
        if path.is_file():
            try:
                import importlib.util

                spec = importlib.util.spec_from_file_location("minimtp_release_figures", path)
                mod = importlib.util.module_from_spec(spec)
                sys.modules[spec.name] = mod
                spec.loader.exec_module(mod)
            except Exception:  # no matplotlib: the figures are linked into the docs site, or named
                mod = None
        _FIGURES.append(mod)
    return _FIGURES[0]


def _image(rel: str) -> bytes | None:
    """The bytes of the docs image ``rel`` (a path under docs/): a committed file, or a figure the docs build draws
    (``assets/figures/<name>``, from scripts/figures.py); None if neither is available here."""
    if (DOCS / rel).is_file():
        return (DOCS / rel).read_bytes()
    prefix = "assets/figures/"
    figures = _figures() if rel.startswith(prefix) else None
    if figures is not None and rel[len(prefix) :] in getattr(figures, "FIGURES", {}):
        try:
            return figures.render(rel[len(prefix) :])
        except Exception:
            return None
    return None


def docs_page_url(docs_url: str, rel: str, anchor: str = "") -> str:
    """The published URL of ``rel``, a path under docs/ (mkdocs directory URLs: ``concepts/x.md`` ->
    ``concepts/x/``, ``index.md`` -> the folder; the tutorials, rendered as pages, likewise)."""
    if rel.endswith((".md", ".py")):  # pages, and the tutorials mkdocs-jupyter renders as pages
        rel = rel.rsplit(".", 1)[0]
        rel = "" if rel == "index" else (rel[: -len("index")] if rel.endswith("/index") else rel + "/")
    return docs_url.rstrip("/") + "/" + rel + (f"#{anchor}" if anchor else "")


def _fix_links(text: str, page: Path, out_page: Path, released: set[Path], docs_url: str | None,
               unresolved: list[str], written: list[Path]) -> str:  # fmt: skip
    """The relative links and images of a handout, so that each one resolves inside the release or points to the
    published docs:

    * a target the release holds (a tutorial, another handout: ``released``, every file the release will hold,
      whichever is written first) stays as it is;
    * an image of the docs (a committed asset, or a figure the docs build draws) is written beside the handout,
      ``handouts/figures/<name>``, and linked there (with ``docs_url`` and no way to draw it: its published URL);
    * any other page of the docs becomes an absolute link into the published docs with ``docs_url`` (mkdocs
      directory URLs), else plain text naming the page (``text (minimtp docs: `concepts/x.md#y`)``), listed in
      ``unresolved``: never a link to a file the release does not hold."""

    def fix(m: re.Match) -> str:
        if m.group("code"):  # code (fenced or inline) is not markdown: left alone
            return m.group(0)
        label, target = m.group("label"), m.group("target")
        if re.match(r"^[a-z][a-z0-9+.-]*:|^#|^/", target):
            return m.group(0)
        path, _, anchor = target.partition("#")
        if (out_page.parent / path).resolve() in released:
            return m.group(0)
        try:
            rel = (page.parent / path).resolve().relative_to(DOCS.resolve()).as_posix()
        except ValueError:
            rel = None
        if label.startswith("!") and rel is not None:
            data = _image(rel)
            if data is not None:
                dest = out_page.parent / "figures" / Path(rel).name
                dest.parent.mkdir(parents=True, exist_ok=True)
                if not dest.exists():
                    dest.write_bytes(data)
                    written.append(dest)
                return f"{label}(figures/{Path(rel).name})"
        if rel is not None and docs_url:
            return f"{label}({docs_page_url(docs_url, rel, anchor)})"
        unresolved.append(target)
        words = label[2:-1] if label.startswith("!") else label[1:-1]
        where = f"minimtp docs: `{rel}{'#' + anchor if anchor else ''}`" if rel is not None else f"`{target}`"
        return f"{'figure: ' if label.startswith('!') else ''}{words} ({where})"

    return LINK.sub(fix, text)


def _points_table(names: list[str]) -> str:
    """Points per test, read from the grader (``Test.points``); empty if the grader does not define them."""
    try:
        import importlib.util

        spec = importlib.util.spec_from_file_location("minimtp_release_grader", ADIR / "grade.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod
        spec.loader.exec_module(mod)
        tests = mod.TESTS
    except Exception:  # the grader cannot be imported here (no torch?): the README just omits the table
        return ""
    lines = []
    for a in names:
        pts = [getattr(t, "points", None) for t in tests.get(a, [])]
        if not pts or None in pts:
            return ""
        lines.append(f"| `{a}` | {len(pts)} | {sum(pts)} |")
    return (
        "| assignment | autograded tests | points |\n|---|---|---|\n" + "\n".join(lines) + "\n\n"
        "The handout of each assignment adds its written questions. "
        "`python tutorials/assignments/grade.py --points <assignment>` prints the points of every test.\n"
    )


def readme(names: list[str], handouts: list[str], instructor: bool, hidden: list[str], docs_links: bool) -> str:
    table = _load_stdlib_module("holes")
    holes = "\n".join(
        f"| `{a}` | " + ", ".join(f"`{table.released_path(h.path)}`: `{h.name}`" for h in table.graded(a)) + " |"
        for a in names
        if a in table.HOLES
    )
    rows = "\n".join(
        f"| `{a}` | `tutorials/assignments/{a}/student.py` | "
        + (f"[handouts/{a}.md](handouts/{a}.md)" if a in handouts else "—")
        + " |"
        for a in names
    )
    text = f"""# minimtp assignments

Exercises on exact speculative decoding for Gemma 4 and its MTP drafter: the sampling rule, a paged KV cache, a
Triton attention kernel, and the distillation of a drafter. Each assignment comes with a starter file to complete,
a handout (objectives, background reading, what to implement, written questions, points) and an autograder.

| assignment | starter file | handout |
|---|---|---|
{rows}

The numbered tutorials in `tutorials/` build each concept step by step; the starter files say which to read first
(`python tutorials/07_triton_paged_attention.py` runs one). They teach neighbouring variants: they never contain an
assignment's answer.

## Setup

This folder is the `minimtp` package itself (PyTorch reference, Triton kernels), with each assignment's functions
left as holes: install it in editable mode, then fill the holes in place.

```bash
pip install -e .             # from this folder: the minimtp of this release, holes and all
```

| assignment | the holes you fill (in the package) |
|---|---|
{holes}

Once an assignment's holes are filled, the real engine runs on your code: `python -m minimtp.generate --prompt
"Hello"` uses your KV cache (`kv_rollback`), `--temperature 1 --draft-mode sample` your verification
(`spec_sampling`), `--attention triton` your kernel (`paged_attention_kernel`, with `TRITON_INTERPRET=1` on a CPU),
and `python -m minimtp.train assistant ...` your distillation loss (`distil_drafter`). Until then, whatever needs a
hole raises `NotImplementedError` naming it (the engine needs the `kv_rollback` holes for everything).

No GPU is needed: the Triton kernels run on the CPU under Triton's interpreter, which the grader turns on by
itself when there is no GPU (a script of your own sets `TRITON_INTERPRET=1` before importing torch or triton).

## Grading

From this folder:

```bash
python tutorials/assignments/grade.py --list                      # the assignments
python tutorials/assignments/grade.py kv_rollback tutorials/assignments/kv_rollback/student.py
python tutorials/assignments/grade.py kv_rollback my_answer.py -x  # stop at the first failure
python tutorials/assignments/grade.py kv_rollback --library       # the holes you filled in minimtp/kv_cache.py
python tutorials/assignments/grade.py --help                      # every option
```

`--library` grades the holes of the installed package (the same tests, through the assignment's API); the starter
file `student.py` of each assignment is the same exercise in one file, graded the same way. The grader also
compares your code with the library's own answer, the tutorials and the reference solution: a submission that is
mostly a copy is flagged for your instructor.

It prints one line per test (PASS / FAIL / WARN) with a hint for each failure, and exits with status 0 iff every
required test passes. An untouched starter file fails with "not implemented yet". Work on the starter file itself
or on a copy anywhere. The tests shipped here use fixed seeds; your instructor may grade with a further set of
tests, so make the invariants hold in general rather than for the printed cases.

"""
    if docs_links:
        text += (
            "The handouts' background reading names pages of the minimtp documentation (`concepts/...`): read "
            "them on the published documentation, or build it from the minimtp repository with `mkdocs serve`."
            "\n\n"
        )
    table = _points_table(names)
    if table:
        text += "## Points\n\n" + table + "\n"
    if instructor:
        listed = "\n".join(f"* `{h}`" for h in hidden) or "* (none in this repository version)"
        text += (
            "## Instructor copy\n\nThis folder was built with `--instructor`: it also holds the hidden suite (the "
            "files whose name starts with `hidden`), tests seeded from a secret of yours, so that nobody can tune an "
            "answer to them: `python tutorials/assignments/grade.py <assignment> FILE --hidden SECRET` runs both "
            "suites (or set `MINIMTP_GRADER_SECRET`), `--json results.json` writes Gradescope's format, and "
            "`--help` lists every option. Do not hand this copy to students; build theirs without `--instructor`."
            "\n\n" + listed + "\n"
        )
    return text


LIBRARY_SKIP = {"__pycache__", ".pytest_cache", ".ipynb_checkpoints", "minimtp.egg-info"}


def _load_stdlib_module(name: str):
    """A grading module that imports only the standard library (holes, similarity), loaded by path without the
    grading package (which imports torch)."""
    import importlib.util

    here = Path(__file__).resolve().parent / "grading"  # this script's grader code (ADIR may be another tree's)
    spec = importlib.util.spec_from_file_location(f"minimtp_release_{name}", here / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def _library_files() -> list[tuple[Path, str]]:
    """(source file, path in the release) of the minimtp package: minimtp/ with its kernels link followed."""
    pkg = ROOT / "minimtp"
    out = []
    for folder, dirs, names in os.walk(pkg, followlinks=True):  # minimtp/kernels is a link to kernels/
        dirs[:] = sorted(d for d in dirs if d not in LIBRARY_SKIP)
        for name in sorted(names):
            p = Path(folder) / name
            if p.suffix != ".pyc" and p.is_file():
                out.append((p, "minimtp/" + p.relative_to(pkg).as_posix()))
    return out


def write_library(out: Path, holes: bool = True) -> tuple[list[Path], dict]:
    """Write the minimtp package into ``out`` (``minimtp/``, ``pyproject.toml``), every hole of grading/holes.py cut
    when ``holes``; returns (the written files, the fingerprints of what was cut and of the solutions). A tree
    without the package (a made-up layout) ships none."""
    if not (ROOT / "minimtp").is_dir():
        return [], {}
    table = _load_stdlib_module("holes")
    assignment_of = {h.name: a for a, hs in table.HOLES.items() for h in hs}
    written = []
    cut_paths = {table.released_path(h.path): h.path for hs in table.HOLES.values() for h in hs}
    for src, rel in _library_files():
        dest = out / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        if holes and rel in cut_paths:
            text = src.read_text(encoding="utf-8")
            dest.write_text(table.cut(text, table.holes_of(rel), assignment_of), encoding="utf-8")
        else:
            shutil.copy2(src, dest)
        written.append(dest)
    missing = set(cut_paths) - {rel for _, rel in _library_files()}
    if missing:
        raise ReleaseError(f"grading/holes.py names files the package does not have: {sorted(missing)}")
    for name in ("pyproject.toml", "LICENSE"):
        if (ROOT / name).is_file():
            shutil.copy2(ROOT / name, out / name)
            written.append(out / name)
    prints = {}
    if holes:
        sim = _load_stdlib_module("similarity")
        for a, hs in table.HOLES.items():
            refs = []
            for path in dict.fromkeys(h.path for h in hs):
                text = (ROOT / path).read_text(encoding="utf-8")
                refs.append(sim.to_json(sim.part(text, [h.name for h in hs if h.path == path],
                                                 table.released_path(path))))  # fmt: skip
            sol = ADIR / "solutions" / f"{a}.py"
            starter = ADIR / a / "student.py"
            if sol.is_file() and starter.is_file():
                given = {q: sim.fingerprint(t).tokens for q, t, _ in sim.functions(starter.read_text("utf-8"))}
                text = sol.read_text(encoding="utf-8")
                mine = [q for q, t, _ in sim.functions(text) if q not in given or sim.fingerprint(t).tokens != given[q]]
                refs.append(sim.to_json(sim.part(text, mine, f"the reference solution ({a})")))
            prints[a] = refs
    return written, prints


def build(out: Path, instructor: bool = False, docs_url: str | None = None) -> list[Path]:
    """Write the release into ``out``; returns the released files (paths inside ``out``)."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ReleaseError(f"{out} exists and is not empty")
    names = assignments()
    starters = [f for a in names for f in _package_files(ADIR / a, instructor=False)]
    tutorials = sorted(TDIR.glob("[0-9][0-9]_*.py"))
    starts = [ADIR / "grade.py", *starters, *tutorials]
    hidden = sorted(p for p in ADIR.rglob("hidden*") if p.is_file() and not SKIP_NAMES & set(p.parts))
    if instructor:
        starts += [p for p in hidden if p.suffix == ".py"]
    files = closure(starts, instructor)
    if instructor:
        files += [p for p in hidden if p not in files]
    for f in files:  # the last line of defence (an instructor copy holds what the hidden suite imports)
        if (is_forbidden(f) and not instructor) or (is_hidden(f) and not instructor) or f == Path(__file__).resolve():
            raise ReleaseError(f"refusing to release {f.relative_to(ROOT)}")
    written = []
    for f in sorted(set(files)):
        dest = out / f.relative_to(ROOT)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(f, dest)
        written.append(dest)
    lib, prints = write_library(out, holes=not instructor)
    written += lib
    if prints:
        import json

        dest = out / "tutorials" / "assignments" / "grading" / "reference_prints.json"
        dest.write_text(json.dumps(prints), encoding="utf-8")
        written.append(dest)
    handouts, unresolved = [], []
    pages = {a: DOCS / "assignments" / f"{a}.md" for a in names if (DOCS / "assignments" / f"{a}.md").is_file()}
    # what the release holds once every handout is written: a handout's link to a later one must resolve too
    released = {p.resolve() for p in written} | {(out / "handouts" / f"{a}.md").resolve() for a in pages}
    released.add((out / "README.md").resolve())
    for a in names:
        page = pages.get(a)
        if page is not None:
            dest = out / "handouts" / f"{a}.md"
            dest.parent.mkdir(parents=True, exist_ok=True)
            text = _fix_links(page.read_text(encoding="utf-8"), page, dest, released, docs_url, unresolved, written)
            # the docs build renders the points table here; in the release the grader prints it
            text = re.sub(
                r"<!--\s*grader-points:\s*([\w-]+)\s*-->",
                lambda m: f"Points per test: `python tutorials/assignments/grade.py --points {m.group(1)}`.",
                text,
            )
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_text(text, encoding="utf-8")
            written.append(dest)
            handouts.append(a)
    rel_hidden = [p.relative_to(ROOT).as_posix() for p in hidden]
    (out / "README.md").write_text(readme(names, handouts, instructor, rel_hidden, bool(unresolved)), encoding="utf-8")
    written.append(out / "README.md")
    if unresolved:
        print(
            f"release: {len(set(unresolved))} handout link(s) point to docs pages the release does not hold: written "
            "as plain text naming the page; pass --docs-url URL to link them to the published docs: "
            + ", ".join(sorted(set(unresolved))),
            file=sys.stderr,
        )
    return written


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", help="folder to create (must not exist or be empty)")
    ap.add_argument("--instructor", action="store_true", help="also copy the hidden grader suite (hidden* files)")
    ap.add_argument("--docs-url", help="published docs URL: the handouts' relative links become absolute links")
    args = ap.parse_args(argv)
    try:
        files = build(Path(args.out), args.instructor, args.docs_url)
    except ReleaseError as e:
        print(f"release: {e}", file=sys.stderr)
        return 2
    kind = "instructor" if args.instructor else "student"
    print(f"{kind} release in {args.out}: {len(files)} files")
    for f in files:
        print("  " + os.path.relpath(f, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
