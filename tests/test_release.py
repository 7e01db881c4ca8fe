"""The student release (tutorials/assignments/release.py) and the tutorials give no assignment's answer away.

* The release holds the starter files, the handouts, the public grader and its helper modules, and works on its
  own: copied anywhere, its grader fails an untouched starter file ("not implemented", no crash) and passes a
  reference solution dropped into it.
* It holds no solution code: no file of ``solutions/``, ``fixtures/`` or the hidden suite, and none of the
  solutions' *distinctive lines* (a line of a reference solution that is not in the starter file, comments and
  docstrings removed, whitespace ignored, trivial lines such as imports or ``return out`` left out) in any file.
* No tutorial contains an assignment's answer: every function of every tutorial is compared with every function
  of every reference solution (see ``answer_overlap`` for the measures and their thresholds).
"""

from __future__ import annotations

import ast
import difflib
import importlib
import importlib.util
import io
import os
import re
import shutil
import subprocess
import sys
import tokenize
import unicodedata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TDIR = ROOT / "tutorials"
ADIR = TDIR / "assignments"
RELEASE = ADIR / "release.py"
ASSIGNMENTS = sorted(p.stem for p in (ADIR / "solutions").glob("*.py"))
TUTORIALS = sorted(TDIR.glob("[0-9][0-9]_*.py"))
FAST_TO_GRADE = {"kv_rollback"}  # graded inside the release in the default run; the others under -m slow


def _build(out: Path, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(RELEASE), *flags, str(out)], capture_output=True, text=True, timeout=300, cwd=out.parent
    )


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("release") / "student"
    proc = _build(out)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out


def _released_files(out: Path) -> list[Path]:
    return sorted(p for p in out.rglob("*") if p.is_file() and "__pycache__" not in p.parts)


# ---------------------------------------------------------------------------------------------- what is released


def test_release_layout(release):
    rel = [p.relative_to(release) for p in _released_files(release)]
    names = {p.as_posix() for p in rel}
    assert "README.md" in names and "tutorials/assignments/grade.py" in names, sorted(names)
    for a in ASSIGNMENTS:
        assert f"tutorials/assignments/{a}/student.py" in names, a
        if (ROOT / "docs" / "assignments" / f"{a}.md").is_file():
            assert f"handouts/{a}.md" in names, a
    for p in rel:
        assert not {"solutions", "fixtures"} & set(p.parts), f"released {p}"
        assert not any(part.startswith("hidden") for part in p.parts), f"released the hidden suite: {p}"
        assert p.name != "release.py", p
    assert "tutorials/assignments/README.md" not in names  # the developers' README lists the fixtures
    readme = (release / "README.md").read_text(encoding="utf-8")
    assert "python tutorials/assignments/grade.py" in readme and "pip install -e ." in readme


# a markdown link or image, or code (a fenced block, an inline span: not markdown, skipped)
_MD_LINK = re.compile(r"(?P<code>```.*?```|`[^`\n]*`)|(?P<label>!?\[[^\[\]]*\])\((?P<target>[^)\s]+)\)", re.S)
DOCS_URL = "https://docs.example/minimtp"


def _links(text: str) -> list[tuple[str, str]]:
    """(label, target) of every link and image of a markdown text, outside code."""
    return [(m["label"], m["target"]) for m in _MD_LINK.finditer(text) if not m["code"]]


def _slug(heading: str) -> str:
    """Python-Markdown's toc slug (what mkdocs and the GitHub renderer give a heading, for these pages)."""
    text = unicodedata.normalize("NFKD", heading).encode("ascii", "ignore").decode()
    return re.sub(r"[-\s]+", "-", re.sub(r"[^\w\s-]", "", text).strip().lower())


def _anchors(md: Path) -> set[str]:
    """The anchors of a markdown page: its headings' slugs, explicit ``{ #id }`` ids, mkdocstrings objects."""
    found = set()
    for line in md.read_text(encoding="utf-8").splitlines():
        h = re.match(r"^#{1,6}\s+(.*?)\s*(\{\s*#([\w-]+)\s*\})?\s*$", line)
        if h:
            found.add(h.group(3) or _slug(h.group(1)))
        obj = re.match(r"^:::\s+([\w.]+)", line)
        if obj:  # mkdocstrings: the module and every public name in it
            mod = importlib.import_module(obj.group(1))
            found |= {obj.group(1)} | {f"{obj.group(1)}.{n}" for n in dir(mod) if not n.startswith("_")}
    return found


def _is_url(target: str) -> bool:
    return bool(re.match(r"^[a-z][a-z0-9+.-]*:", target))


def _check_links_resolve(out: Path) -> int:
    """Every relative link and image of every markdown file of the release ``out`` resolves to a file inside it
    (anchors included: a heading of the target page); returns the number of links checked."""
    n = 0
    for md in sorted(out.rglob("*.md")):
        for label, target in _links(md.read_text(encoding="utf-8")):
            if _is_url(target):
                continue
            path, _, anchor = target.partition("#")
            dest = (md.parent / path).resolve() if path else md.resolve()
            where = f"{md.relative_to(out)}: {label}({target})"
            assert dest.is_relative_to(out.resolve()), f"{where} points outside the release"
            assert dest.is_file(), f"{where}: no such file in the release"
            if label.startswith("!"):
                assert dest.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"{where} is not a PNG image"
            if anchor and dest.suffix == ".md":
                assert anchor in _anchors(dest), f"{where}: no heading #{anchor} in {dest.name}"
            n += 1
    return n


def test_every_link_of_the_release_resolves_inside_it(release):
    """No link of a released markdown file (handouts, README) to a page or figure the release does not hold;
    without --docs-url the docs pages are named in plain text, the figures are drawn into handouts/figures/."""
    assert _check_links_resolve(release) >= 10
    for a in ASSIGNMENTS:
        src, out = ROOT / "docs" / "assignments" / f"{a}.md", release / "handouts" / f"{a}.md"
        if not src.is_file():
            continue
        text = out.read_text(encoding="utf-8")
        assert "../concepts/" not in text and "../assets/" not in text, f"{a}: a link into the docs is left"
        n_docs = sum(1 for _, t in _links(src.read_text(encoding="utf-8")) if "../concepts/" in t)
        assert text.count("(minimtp docs: `concepts/") >= n_docs, f"{a}: the docs pages it links are not named"


def _expected_url(target: str) -> str:
    """The published page of a link of docs/assignments/*.md (mkdocs directory URLs), computed from scratch."""
    path, _, anchor = target.partition("#")
    rel = os.path.normpath(os.path.join("assignments", path)).replace(os.sep, "/")
    assert not rel.startswith(".."), target
    if rel.endswith(".md"):
        rel = rel[: -len(".md")]
        rel = "" if rel == "index" else (rel[: -len("index")] if rel.endswith("/index") else rel + "/")
    return f"{DOCS_URL}/{rel}" + (f"#{anchor}" if anchor else "")


def test_docs_url_links_every_handout_to_the_published_pages(tmp_path):
    """With --docs-url: a link to a tutorial or to another handout (in the release) stays relative, whichever
    handout is written first; an image is drawn into the release; every other link of every handout is the
    published URL of the page it names (the page exists in docs/, and so does its anchor)."""
    out = tmp_path / "with-docs-url"
    proc = _build(out, "--docs-url", DOCS_URL + "/")  # a trailing slash is the same site
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "plain text" not in proc.stderr, proc.stderr  # every docs link became a URL
    _check_links_resolve(out)
    checked = 0
    for a in ASSIGNMENTS:
        src = ROOT / "docs" / "assignments" / f"{a}.md"
        if not src.is_file():
            continue
        want, got = _links(src.read_text(encoding="utf-8")), _links((out / "handouts" / f"{a}.md").read_text("utf-8"))
        assert [lbl for lbl, _ in got] == [lbl for lbl, _ in want], f"{a}: links lost or added"
        for (label, s), (_, t) in zip(want, got):
            where = f"handouts/{a}.md: {label}({s}) -> ({t})"
            if _is_url(s) or s.startswith("#"):
                assert t == s, where
                continue
            path = s.partition("#")[0]
            in_docs = os.path.normpath(os.path.join("assignments", path)).replace(os.sep, "/")
            handout = in_docs.startswith("assignments/") and Path(in_docs).stem in ASSIGNMENTS
            tutorial = path.startswith("../tutorials/") and (ROOT / path[3:]).is_file()
            if handout or tutorial or label.startswith("!"):
                assert not _is_url(t), f"{where}: the release holds this file; the link must stay relative"
                continue
            assert t == _expected_url(s), f"{where}: expected {_expected_url(s)}"
            page = ROOT / "docs" / (in_docs if in_docs.endswith(".md") else in_docs + ".md")
            assert page.is_file(), f"{where}: no page {page.relative_to(ROOT)}"
            anchor = s.partition("#")[2]
            assert not anchor or anchor in _anchors(page), f"{where}: no #{anchor} in {page.relative_to(ROOT)}"
            checked += 1
    assert checked >= 20, checked


def test_released_grader_imports_on_its_own(release):
    """Every module the grader needs came along: --list imports it (and what it imports at the top)."""
    proc = subprocess.run(
        [sys.executable, "tutorials/assignments/grade.py", "--list"],
        cwd=release,
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for a in ASSIGNMENTS:
        assert a in proc.stdout


@pytest.mark.parametrize(
    "assignment", [a if a in FAST_TO_GRADE else pytest.param(a, marks=pytest.mark.slow) for a in ASSIGNMENTS]
)
def test_release_grades_skeleton_and_solution(release, assignment, tmp_path):
    copy = tmp_path / "copy"  # the release moved somewhere else still works
    shutil.copytree(release, copy)
    # its own minimtp (holes and all), as `pip install -e .` in the release gives: the grader needs none of the holes
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1", PYTHONPATH=str(copy))
    if assignment == "paged_attention_kernel":
        env["TRITON_INTERPRET"] = "1"

    def grade(path: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "tutorials/assignments/grade.py", assignment, path]
        return subprocess.run(cmd, cwd=copy, capture_output=True, text=True, timeout=900, env=env)

    skel = grade(f"tutorials/assignments/{assignment}/student.py")
    out = skel.stdout + skel.stderr
    assert skel.returncode == 1, out
    assert "not implemented" in out and "Traceback" not in out, out
    shutil.copy(ADIR / "solutions" / f"{assignment}.py", copy / "my_answer.py")
    sol = grade("my_answer.py")
    assert sol.returncode == 0, sol.stdout + sol.stderr


def test_instructor_release_adds_the_hidden_suite(tmp_path):
    out = tmp_path / "instructor"
    proc = _build(out, "--instructor")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    names = {p.relative_to(out).as_posix() for p in _released_files(out)}
    hidden = {p.relative_to(ROOT).as_posix() for p in ADIR.rglob("hidden*") if p.is_file() and p.suffix != ".pyc"}
    hidden = {h for h in hidden if "__pycache__" not in h}
    assert hidden <= names, hidden - names
    hidden_text = "".join((ROOT / h).read_text(encoding="utf-8", errors="replace") for h in hidden)
    for n in names:  # solutions or fixtures only where the hidden suite imports them
        if {"solutions", "fixtures"} & set(Path(n).parts):
            assert Path(n).stem in hidden_text, n
    assert "Instructor copy" in (out / "README.md").read_text(encoding="utf-8")


def test_release_refuses_a_non_empty_folder(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    proc = _build(tmp_path / "out")
    assert proc.returncode == 2 and "not empty" in proc.stderr


def _load_release():
    spec = importlib.util.spec_from_file_location("minimtp_release", RELEASE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _fake_repo(root: Path, grader_imports: str) -> None:
    files = {
        "tutorials/_tiny.py": "X = 1\n",
        "tutorials/_unused.py": "Y = 2\n",
        "tutorials/01_intro.py": "from _tiny import X\n",
        "tutorials/assignments/grade.py": grader_imports,
        "tutorials/assignments/grader/__init__.py": "from .checks import check\n",
        "tutorials/assignments/grader/checks.py": "def check():\n    from _tiny import X\n    return X\n",
        "tutorials/assignments/grader/data.json": "{}\n",
        "tutorials/assignments/grader/hidden_extra.py": "SECRET = 1\n",
        "tutorials/assignments/hidden_suite.py": "from solutions import demo\n",
        "tutorials/assignments/demo/student.py": "def f():\n    raise NotImplementedError\n",
        "tutorials/assignments/solutions/demo.py": "def f():\n    return 42\n",
        "tutorials/assignments/fixtures/demo__bug.py": "def f():\n    return 41\n",
        "docs/assignments/demo.md": "# demo\n[intro](../tutorials/01_intro.py), [concepts](../concepts/x.md#y)\n",
    }
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)


def test_release_follows_the_graders_imports(tmp_path, monkeypatch):
    """On a made-up layout: a grader split into a package, helpers in tutorials/, an optional hidden module."""
    rel = _load_release()
    repo = tmp_path / "repo"
    _fake_repo(repo, "import grader\ntry:\n    from grader import hidden_extra\nexcept ImportError:\n    pass\n")
    for name, path in [("ROOT", repo), ("TDIR", repo / "tutorials"), ("ADIR", repo / "tutorials/assignments")]:
        monkeypatch.setattr(rel, name, path)
    monkeypatch.setattr(rel, "DOCS", repo / "docs")
    got = {p.relative_to(tmp_path / "s").as_posix() for p in rel.build(tmp_path / "s")}
    assert got == {
        "tutorials/_tiny.py",
        "tutorials/01_intro.py",
        "tutorials/assignments/grade.py",
        "tutorials/assignments/grader/__init__.py",
        "tutorials/assignments/grader/checks.py",
        "tutorials/assignments/grader/data.json",
        "tutorials/assignments/demo/student.py",
        "handouts/demo.md",
        "README.md",
    }, got
    handout = (tmp_path / "s" / "handouts/demo.md").read_text()
    assert "(../tutorials/01_intro.py)" in handout  # in the release: kept
    rel.build(tmp_path / "d", docs_url="https://docs.example/minimtp")
    assert "(https://docs.example/minimtp/concepts/x/#y)" in (tmp_path / "d" / "handouts/demo.md").read_text()
    inst = {p.relative_to(tmp_path / "i").as_posix() for p in rel.build(tmp_path / "i", instructor=True)}
    assert {"tutorials/assignments/hidden_suite.py", "tutorials/assignments/grader/hidden_extra.py"} <= inst
    assert "tutorials/assignments/solutions/demo.py" in inst  # the hidden suite imports it
    assert not any("fixtures" in n for n in inst)


def test_release_refuses_a_grader_that_imports_a_solution(tmp_path, monkeypatch):
    rel = _load_release()
    repo = tmp_path / "repo"
    _fake_repo(repo, "from solutions import demo\n")
    for name, path in [("ROOT", repo), ("TDIR", repo / "tutorials"), ("ADIR", repo / "tutorials/assignments")]:
        monkeypatch.setattr(rel, name, path)
    with pytest.raises(rel.ReleaseError, match="refusing"):
        rel.build(tmp_path / "s")


# ------------------------------------------------------------------------------------ no solution code released


def _docstring_lines(tree: ast.AST) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if (
                isinstance(first, ast.Expr)
                and isinstance(first.value, ast.Constant)
                and isinstance(first.value.value, str)
            ):
                lines |= set(range(first.lineno, first.end_lineno + 1))
    return lines


def code_lines(src: str) -> list[str]:
    """The physical lines of code of a Python source, without comments and docstrings, whitespace removed."""
    skip = _docstring_lines(ast.parse(src))
    lines: dict[int, list[str]] = {}
    ignore = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER}
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type in ignore or tok.start[0] in skip:
            continue
        lines.setdefault(tok.start[0], []).append("".join(tok.string.split()))
    return ["".join(parts) for _, parts in sorted(lines.items())]


def _trivial(line: str) -> bool:
    """Lines any code may contain: imports, decorators, short statements (``return out``, ``else:``, ``m = m_new``)."""
    return len(line) < 20 or line.startswith(("import", "from", "@", "def", "class", "raise", "assert"))


def distinctive_lines(assignment: str) -> list[str]:
    """Lines of the reference solution that are not in its starter file (whitespace-free, see ``code_lines``)."""
    given = set(code_lines((ADIR / assignment / "student.py").read_text(encoding="utf-8")))
    sol = code_lines((ADIR / "solutions" / f"{assignment}.py").read_text(encoding="utf-8"))
    return list(dict.fromkeys(line for line in sol if line not in given and not _trivial(line)))


def _grader_file(rel: Path) -> bool:
    """Released grader code: a file of tutorials/assignments/ that is not an assignment's starter folder."""
    parts = rel.parts
    return parts[:2] == ("tutorials", "assignments") and (len(parts) == 3 or parts[2] not in ASSIGNMENTS)


@pytest.mark.parametrize("assignment", ASSIGNMENTS)
def test_release_contains_no_solution_lines(release, assignment):
    lines = distinctive_lines(assignment)
    assert len(lines) >= 5, f"too few distinctive lines to test {assignment}: {lines}"
    leaks: dict[str, list[str]] = {}
    for f in _released_files(release):
        try:
            text = "".join(f.read_text(encoding="utf-8").split())
        except UnicodeDecodeError:
            continue
        hits = [line for line in lines if line in text]
        if hits:
            leaks[f.relative_to(release).as_posix()] = hits
    assert not leaks, f"the release contains lines of the {assignment} solution: {leaks}"


def test_distinctive_lines_are_the_answer():
    """The measure is meaningful: the kv_rollback lines are the three methods' bodies, not the given code."""
    lines = distinctive_lines("kv_rollback")
    assert "need=-(-(n+T)//self.block_size)-len(table)" in lines
    assert "dead=max(0,self.lengths[seq]-keep)//self.block_size" in lines
    assert not any("self.free.extend" in line or "defgather" in line for line in lines)  # add/release/gather: given


# ------------------------------------------------------------------------------------ no answer in the tutorials


def _functions(src: str) -> dict[str, ast.FunctionDef]:
    out: dict[str, ast.FunctionDef] = {}
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            out.setdefault(node.name, node)
    return out


def _body(fn: ast.FunctionDef) -> list[ast.stmt]:
    body = list(fn.body)
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]  # the docstring
    return body


def body_tokens(fn: ast.FunctionDef) -> list[str]:
    """The tokens of a function's body, docstring and comments removed, as ``ast.unparse`` formats it."""
    src = "\n".join(ast.unparse(s) for s in _body(fn))
    skip = {tokenize.NEWLINE, tokenize.NL, tokenize.INDENT, tokenize.DEDENT, tokenize.COMMENT, tokenize.ENDMARKER}
    return [t.string for t in tokenize.generate_tokens(io.StringIO(src).readline) if t.type not in skip]


class _Rename(ast.NodeTransformer):
    """Alpha-renaming: arguments and local names become v0, v1, ... in order of first appearance."""

    def __init__(self, names: set[str]):
        self.names, self.map = names, {}

    def _name(self, n: str) -> str:
        return self.map.setdefault(n, f"v{len(self.map)}") if n in self.names else n

    def visit_Name(self, node):
        return ast.copy_location(ast.Name(self._name(node.id), node.ctx), node)

    def visit_arg(self, node):
        return ast.copy_location(ast.arg(self._name(node.arg), None), node)


def normalised_dump(fn: ast.FunctionDef) -> str:
    """The body's AST with docstring, comments, formatting and the names of arguments and locals abstracted away."""
    local = {a.arg for a in ast.walk(fn.args) if isinstance(a, ast.arg)}
    local |= {n.id for n in ast.walk(fn) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
    mod = ast.Module(body=[ast.parse(ast.unparse(s)).body[0] for s in _body(fn)], type_ignores=[])
    return ast.dump(_Rename(local).visit(mod), annotate_fields=False)


def _answer_mask(sol: list[str], given: list[str]) -> list[bool]:
    """True for the tokens of a solution's body that its starter file does not already contain."""
    mask = [True] * len(sol)
    for i, _, n in difflib.SequenceMatcher(None, sol, given, autojunk=False).get_matching_blocks():
        mask[i : i + n] = [False] * n
    return mask


# Thresholds, measured (tokens of ast.unparse'd bodies; runs of MIN_RUN tokens ~ one short statement):
#                                   coverage of the answer   best body ratio
#   old tutorial 07 (before #14)        0.73                    0.82       the kernel, ~verbatim
#   old tutorial 09 (before #14)        0.91                    0.94       distill_loss, verbatim but for `<`
#   tutorial 07 (decode-only kernel)    0.20                    0.63       online softmax, masked paged loads
#   tutorial 09 (first-step loss)       0.13                    0.42       the dense context, one drafter step
#   every other tutorial                <= 0.07                 <= 0.45
# MAX_COVERAGE = 0.5: a tutorial that spells out, statement by statement, half of what the student must write
# gives the answer away; MAX_RATIO = 0.75: three quarters of both bodies align token for token. Both sit in the
# gap between the old tutorials and the neighbouring variants that replace them.
MIN_RUN, MAX_COVERAGE, MAX_RATIO, MIN_ANSWER_TOKENS = 8, 0.5, 0.75, 10


def answer_overlap(tutorial_src: str, assignment: str) -> list[str]:
    """Why ``tutorial_src`` contains ``assignment``'s answer (empty: it does not). For every solution function with
    something to write (>= MIN_ANSWER_TOKENS tokens not in the starter file):

    * **AST**: a tutorial function whose normalised body (``normalised_dump``) equals the solution's;
    * **coverage**: the share of the answer tokens (the solution's body tokens not in the starter's) that the
      tutorial's functions reproduce in runs of >= MIN_RUN tokens, over all its functions together;
    * **ratio**: difflib's ratio 2M/T between the solution's body and a tutorial function's body.
    """
    sol = _functions((ADIR / "solutions" / f"{assignment}.py").read_text(encoding="utf-8"))
    given = _functions((ADIR / assignment / "student.py").read_text(encoding="utf-8"))
    tut = _functions(tutorial_src)
    tut_tokens = {name: body_tokens(fn) for name, fn in tut.items()}
    tut_dumps = {normalised_dump(fn): name for name, fn in tut.items()}
    problems = []
    for name, fn in sol.items():
        tokens = body_tokens(fn)
        mask = _answer_mask(tokens, body_tokens(given[name]) if name in given else [])
        n_answer = sum(mask)
        if n_answer < MIN_ANSWER_TOKENS:
            continue  # given in the starter file (teacher, train, the kernel's wrapper): not an answer
        dump = normalised_dump(fn)
        if dump in tut_dumps:
            problems.append(f"{tut_dumps[dump]}() has the body of solution {name}() (normalised AST)")
        covered = [False] * len(tokens)
        for tname, ttoks in tut_tokens.items():
            sm = difflib.SequenceMatcher(None, tokens, ttoks, autojunk=False)
            for i, _, n in sm.get_matching_blocks():
                if n >= MIN_RUN:
                    covered[i : i + n] = [True] * n
            if sm.ratio() > MAX_RATIO:
                problems.append(f"{tname}() matches solution {name}() token for token: ratio {sm.ratio():.2f}")
        coverage = sum(m and c for m, c in zip(mask, covered)) / n_answer
        if coverage > MAX_COVERAGE:
            problems.append(f"the tutorial reproduces {coverage:.0%} of what {name}() asks the student to write")
    return problems


@pytest.mark.parametrize("tutorial", TUTORIALS, ids=[p.stem for p in TUTORIALS])
def test_no_tutorial_contains_an_answer(tutorial):
    src = tutorial.read_text(encoding="utf-8")
    found = {a: answer_overlap(src, a) for a in ASSIGNMENTS}
    assert not any(found.values()), f"{tutorial.name} gives an assignment's answer away: {found}"


def _disguised(src: str) -> str:
    """A solution rewritten as a careless tutorial would copy it: functions renamed, arguments and locals renamed,
    comments and docstrings dropped, reformatted."""
    tree = ast.parse(src)
    for fn in [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)]:
        local = {a.arg for a in ast.walk(fn.args) if isinstance(a, ast.arg)}
        local |= {n.id for n in ast.walk(fn) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
        local -= {"self"}
        renamed = _Rename(local).visit(fn)
        renamed.name = "tutorial_" + fn.name
    return ast.unparse(tree)


def _edited(src: str) -> str:
    """A solution with its functions renamed and the first statement of every body dropped (a near copy)."""
    tree = ast.parse(src)
    for fn in [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)]:
        body = _body(fn)
        if len(body) > 2:
            fn.body = body[1:]
        fn.name = "my_" + fn.name
    return ast.unparse(tree)


@pytest.mark.parametrize("assignment", ASSIGNMENTS)
def test_the_answer_check_catches_copies(assignment):
    """The check is not vacuous: a renamed verbatim copy and an edited near copy of each solution are caught."""
    src = (ADIR / "solutions" / f"{assignment}.py").read_text(encoding="utf-8")
    assert any("normalised AST" in p for p in answer_overlap(_disguised(src), assignment)), assignment
    assert answer_overlap(_edited(src), assignment), assignment


def test_the_answer_check_catches_the_grader_style_copy():
    """A tutorial that computes the distillation loss as the solution does (as tutorial 09 did before issue 14)."""
    sol = (ADIR / "solutions" / "distil_drafter.py").read_text(encoding="utf-8")
    body = sol[sol.index("def distill_loss") : sol.index("def train")]
    signature = "def distill_loss(target, drafter, x: torch.Tensor, teach, k: int = 2) -> torch.Tensor:"
    old_style = body.replace(signature, "def distill_loss(x, teach, k=2):").replace("<= S - 1", "< S")
    assert answer_overlap(old_style, "distil_drafter")


@pytest.mark.parametrize(
    "tutorial, assignment",
    [("07_triton_paged_attention", "paged_attention_kernel"), ("09_distil_a_drafter", "distil_drafter")],
)
def test_tutorial_points_to_its_assignment(tutorial, assignment):
    """Tutorials 07 and 09 teach a neighbouring variant and say what the assignment adds."""
    src = (TDIR / f"{tutorial}.py").read_text(encoding="utf-8")
    assert f"`{assignment}` assignment asks you to extend" in " ".join(src.replace("#", " ").split())
