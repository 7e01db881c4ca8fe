"""The student release ships minimtp itself with each assignment's functions as holes (issue 23, item 1).

* The hole table (``tutorials/assignments/grading/holes.py``) names functions that exist, and the imports the
  library-mode gate allows are the library files' own.
* The released package holds every hole as ``raise NotImplementedError`` and none of the answers: no released
  function has the normalised AST of a reference solution's or of a hole's library body, and no released file
  holds the winnowed fingerprints of one (share below the copy check's flag threshold, which the fixtures were
  measured against: docs/assignments.md, "Copy detection").
* Filled with the library's own bodies (by the syntax tree, as a student fills them), the release passes the
  grader's library mode 80/80 and ``python -m minimtp.generate`` runs on it with the default embedded model, in
  sampled-draft mode (so verify, reserve / truncate / trim_window all run); unfilled, generate stops at a hole
  naming its assignment. The tutorials run on the filled release under ``-m slow``.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ADIR = ROOT / "tutorials" / "assignments"
sys.path.insert(0, str(ADIR))
from grading import holes, similarity  # noqa: E402  (the grader's stdlib-only modules)

ASSIGNMENTS = sorted(holes.HOLES)
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")


def _run(cmd: list[str], cwd: Path, timeout: int = 600, **env) -> subprocess.CompletedProcess:
    full = dict(ENV, PYTHONPATH=str(cwd), **env)  # the release's minimtp, as `pip install -e .` there gives
    full.pop("MINIMTP_GRADER_SECRET", None)
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=full)


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("holes") / "student"
    proc = subprocess.run([sys.executable, str(ADIR / "release.py"), str(out)], capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out


@pytest.fixture(scope="module")
def filled(release, tmp_path_factory) -> Path:
    """The release with every hole filled with the library's body, by the syntax tree."""
    import shutil

    out = tmp_path_factory.mktemp("filled") / "student"
    shutil.copytree(release, out)
    for path in dict.fromkeys(h.path for hs in holes.HOLES.values() for h in hs):
        dest = out / holes.released_path(path)
        names = [h.name for h in holes.holes_of(path)]
        dest.write_text(holes.fill(dest.read_text(encoding="utf-8"), (ROOT / path).read_text(encoding="utf-8"),
                                   names), encoding="utf-8")  # fmt: skip
    return out


def _top_imports(src: str) -> set[str]:
    out = set()
    for node in ast.parse(src).body:
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            out.add("." * node.level + (node.module or ""))
    return out


def test_the_hole_table_matches_the_library():
    for a, hs in holes.HOLES.items():
        for h in hs:
            src = (ROOT / h.path).read_text(encoding="utf-8")
            assert h.name in holes._function_nodes(ast.parse(src), {h.name}), f"{a}: no {h.name} in {h.path}"
        lib = holes.LIBRARY_FILE[a]
        src_path = ROOT / (lib.replace("minimtp/kernels/", "kernels/") if "kernels/" in lib else lib)
        assert _top_imports(src_path.read_text(encoding="utf-8")) == holes.LIBRARY_IMPORTS[a], a
        assert any(holes.released_path(h.path) == lib for h in holes.graded(a)), a


def test_the_release_holds_the_package_with_holes(release):
    assert (release / "pyproject.toml").is_file() and (release / "minimtp" / "__init__.py").is_file()
    kernels = release / "minimtp" / "kernels"
    assert kernels.is_dir() and not kernels.is_symlink() and (kernels / "paged_attention.py").is_file()
    assert (release / "minimtp" / "default_model").is_dir()
    for a, hs in holes.HOLES.items():
        for h in hs:
            text = (release / holes.released_path(h.path)).read_text(encoding="utf-8")
            [(_, src, _)] = similarity.functions(text, [h.name])
            body = ast.parse(src.strip() if "\n" not in src else _dedent(src)).body[0].body
            stmts = [s for s in body if not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant))]
            assert len(stmts) == 1 and isinstance(stmts[0], ast.Raise), f"{h.path}:{h.name} is not a hole"
            assert "NotImplementedError" in ast.unparse(stmts[0]) and a in ast.unparse(stmts[0])
    readme = (release / "README.md").read_text(encoding="utf-8")
    assert "pip install -e ." in readme and "--library" in readme
    for h in holes.graded("kv_rollback"):
        assert h.name in readme


def _dedent(src: str) -> str:
    import textwrap

    return textwrap.dedent(src)


def _normalised(fn) -> str:
    """A function body's AST with the docstring dropped and every argument and local renamed in order."""
    body = [s for s in fn.body if not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant))]
    local = {a.arg for a in ast.walk(fn.args) if isinstance(a, ast.arg)}
    local |= {n.id for n in ast.walk(fn) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
    names: dict[str, str] = {}

    class Rename(ast.NodeTransformer):
        def visit_Name(self, node):
            new = names.setdefault(node.id, f"v{len(names)}") if node.id in local else node.id
            return ast.copy_location(ast.Name(new, node.ctx), node)

    mod = ast.Module(body=[Rename().visit(ast.parse(ast.unparse(s)).body[0]) for s in body], type_ignores=[])
    return ast.dump(mod, annotate_fields=False)


def _answers() -> dict[str, list[tuple[str, str, int]]]:
    """assignment -> (name, source, first line) of every answer: the holes' library bodies and the functions of
    the reference solution that its starter file does not give."""
    from grading.originality import STUDENT_FUNCTIONS

    out = {}
    for a, hs in holes.HOLES.items():
        found = []
        for path in dict.fromkeys(h.path for h in hs):
            src = (ROOT / path).read_text(encoding="utf-8")
            found += similarity.functions(src, [h.name for h in hs if h.path == path])
        sol = (ADIR / "solutions" / f"{a}.py").read_text(encoding="utf-8")
        found += similarity.functions(sol, STUDENT_FUNCTIONS[a])
        out[a] = found
    return out


def test_the_release_contains_no_answer(release):
    """Normalised AST: no released function is an answer renamed; winnowing: no released file holds an answer's
    fingerprints (share of the answer's fingerprints found in the file) at the flag threshold or above."""
    answers = _answers()
    dumps = {}
    prints = {}
    for a, fns in answers.items():
        for name, src, _first in fns:
            fn = ast.parse(_dedent(src)).body[0]
            if len(fn.body) > 2:  # one-line answers (acceptance_ratio, residual_sample) carry no distinct shape
                dumps[_normalised(fn)] = f"{a}: {name}"
            prints[f"{a}: {name}"] = similarity.fingerprint(_dedent(src), name)
    worst = (0.0, "")
    files = [p for p in release.rglob("*.py") if "__pycache__" not in p.parts]
    assert len(files) > 100, len(files)  # the package, the grader, the tutorials, the starters
    for f in files:
        text = f.read_text(encoding="utf-8")
        rel = f.relative_to(release).as_posix()
        for _, src, _ in similarity.functions(text):
            fn = ast.parse(_dedent(src)).body[0]
            assert _normalised(fn) not in dumps, f"{rel}:{fn.name} is {dumps.get(_normalised(fn))}"
        whole = similarity.fingerprint(text, rel)
        for name, code in prints.items():
            m = similarity.similarity(code, whole)
            if m.tokens >= similarity.MIN_TOKENS:
                worst = max(worst, (m.share, f"{name} in {rel}"))
            assert not m.flagged, f"{rel} holds the answer {name}: {m.describe()}"
    assert worst[0] < similarity.FLAG_SHARE, worst


def test_the_unfilled_release_stops_at_a_hole(release):
    proc = _run([sys.executable, "-m", "minimtp.generate", "--prompt", "Hi", "--max-new-tokens", "4"], release)
    assert proc.returncode != 0
    assert "NotImplementedError" in proc.stderr and "kv_rollback" in proc.stderr, proc.stderr[-2000:]


def test_the_filled_release_runs_generate(filled):
    """python -m minimtp.generate on the filled holes, the default embedded pair, drafts sampled from q'."""
    cmd = [sys.executable, "-m", "minimtp.generate", "--prompt", "def add(a, b):", "--max-new-tokens", "12",
           "--temperature", "1", "--draft-mode", "sample", "--seed", "3", "--json"]  # fmt: skip
    proc = _run(cmd, filled)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(proc.stdout)
    assert data, proc.stdout
    where = _run([sys.executable, "-c", "import minimtp.speculative as s; print(s.__file__)"], filled)
    assert Path(where.stdout.strip()).is_relative_to(filled), where.stdout  # it ran the release's package


@pytest.mark.parametrize("assignment", ASSIGNMENTS)
def test_the_filled_release_passes_the_library_grader(filled, assignment):
    """grade.py ASSIGNMENT --library: the installed (released, filled) package's holes score 80/80."""
    proc = _run([sys.executable, "tutorials/assignments/grade.py", assignment, "--library", "--no-copy-check"],
                filled, TRITON_INTERPRET="1")  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "Score: 80/80" in out, out
    assert "the library's holes" in out, out


def test_the_unfilled_release_fails_the_library_grader(release):
    proc = _run([sys.executable, "tutorials/assignments/grade.py", "kv_rollback", "--library"], release)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1 and "not implemented" in out and "Traceback" not in out, out


@pytest.mark.slow
def test_the_filled_release_runs_the_tutorials(filled):
    for tut in sorted((filled / "tutorials").glob("[0-9][0-9]_*.py")):
        proc = _run([sys.executable, str(tut.relative_to(filled))], filled, timeout=900, TRITON_INTERPRET="1",
                    MPLBACKEND="Agg")  # fmt: skip
        assert proc.returncode == 0, f"{tut.name}:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
