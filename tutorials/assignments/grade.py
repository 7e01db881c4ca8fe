#!/usr/bin/env python
"""Grade an assignment with the project's property tests.

    python tutorials/assignments/grade.py <assignment> path/to/student.py        # the public suite
    python tutorials/assignments/grade.py <assignment> FILE --json results.json  # + Gradescope's results.json
    python tutorials/assignments/grade.py <assignment> FILE --hidden SECRET      # + the instructor's hidden suite
    python tutorials/assignments/grade.py --points <assignment>                  # the points of every test
    python tutorials/assignments/grade.py --list

Prints one line per test (PASS / FAIL / WARN) with its points, and for every failure the bug class (the invariant
the file breaks), the smallest evidence the grader found, and a hint; then ``Score: S/80``. Exits 0 iff every
required test passed. WARN marks an advisory test (0 points; it never fails the grade).

Points. Each assignment's autograded tests total 80 points (the handout adds 20 points of written questions).
Integrity checks (imports and the shape of the code, read from its syntax tree, never executed) are worth 0 points
but gate the score: a file that fails one scores 0 (its other tests still run, for feedback).

Suites. The public suite (this file) uses fixed seeds, so the grade of a given file is deterministic. The hidden
suite (``hidden_suite.py`` beside this file, instructors only: the student release leaves out every ``hidden*``
file) runs the same invariants on new cases (vocabulary sizes, block sizes, Hq:Hkv = 8:1, softmax scales != 1,
partly full pools, sequences much longer than the window, gradients of the distillation loss) drawn from a secret
the instructor passes (``--hidden SECRET`` or the environment variable ``MINIMTP_GRADER_SECRET``). With a secret
both suites run and the score is their mean (each test counts for half its points).

Statistics. Distribution checks are exact where the randomness can be integrated analytically (acceptance as a
function of u ~ U[0,1): the accepted set must be exactly [0, min(1, p(x)/q(x))) whatever the other random inputs
are), and otherwise Pearson χ² goodness-of-fit tests at significance α = 1e-4 each (cells with expected count < 5
pooled). A correct solution fails one χ² test with probability at most α, so it fails a suite with probability at
most (number of χ² tests) × α: ``--points`` prints both numbers (spec_sampling: 16 χ² tests in the public suite,
so ≤ 1.6e-3; 12 in the hidden suite, ≤ 1.2e-3 per secret; the other assignments run none).

Time. Every test runs under a time limit (``--timeout``, default 120 s): a SIGALRM timer interrupts the test in the
main thread (POSIX), so an infinite loop in a student's file fails that test and grading goes on; a watchdog thread
ends the grader (exit status 3, the report so far written) if a test ignores the interrupt for 30 s more.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import hashlib
import importlib.util
import io
import json
import os
import signal
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # tutorials/, for _tiny

# Without a GPU the kernel assignment runs under Triton's interpreter, which must be chosen before triton is imported
# (docs: concepts/kernels, "Running the kernels on CPU"): the grader opts in here unless the caller decided.
if not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

from minimtp.sampling import (  # noqa: E402
    SamplingParams,
    draw_exponentials,
    draw_uniforms,
    make_generators,
    process_logits,
    sample,
)

ALPHA = 1e-4  # significance of every χ² test
TOTAL = 80  # autograded points of every assignment (and of each suite)
DEFAULT_TIMEOUT = 120.0  # seconds per test
GRACE = 30.0  # seconds a timed-out test may ignore the interrupt before the watchdog ends the grader
SECRET_ENV = "MINIMTP_GRADER_SECRET"
warnings.filterwarnings("ignore", category=RuntimeWarning)  # the Triton interpreter evaluates masked-off lanes


# ------------------------------------------------------------------------------------------------ registry


@dataclass
class Test:
    name: str
    fn: Callable  # fn(mod) for the public suite, fn(mod, seed) for the hidden one; may return a line of info
    hint: str
    required: bool = True
    points: int = 0
    bug: str = ""  # the bug class a failure of this test names when the check itself does not name one
    gate: bool = False  # an integrity check: failing it scores the whole file 0
    suite: str = "public"  # "public" or "hidden"
    chi2: int = 0  # number of χ² tests it runs (for the stated false-failure probability)


TESTS: dict[str, list[Test]] = {}  # the public suite of every assignment
BUG_HINTS: dict[str, str] = {}  # bug class -> the hint printed for it (else the failing test's own hint)
HIDDEN: dict[str, list[Test]] = {}  # the hidden suite, filled by hidden_suite.register(grader) when it is loaded
DESCRIPTIONS: dict[str, str] = {}


def test(assignment: str, hint: str, points: int = 0, required: bool = True, bug: str = "", gate: bool = False,
         chi2: int = 0, name: str | None = None, registry: dict | None = None, suite: str = "public"):  # fmt: skip
    """Register ``fn`` as a test of ``assignment`` (public suite unless ``registry`` / ``suite`` say otherwise)."""

    def deco(fn):
        reg = TESTS if registry is None else registry
        reg.setdefault(assignment, []).append(
            Test(name or fn.__name__, fn, hint, required, points, bug, gate, suite, chi2)
        )
        return fn

    return deco


class Failure(AssertionError):
    """A broken invariant: ``bug`` names it (the bug class), ``evidence`` is the smallest case that shows it."""

    def __init__(self, bug: str, evidence: str):
        super().__init__(f"{bug}: {evidence}")
        self.bug, self.evidence = bug, evidence


def check(cond, bug: str, evidence) -> None:
    """Raise Failure(bug, evidence) unless ``cond``; ``evidence`` may be a callable (built only on failure)."""
    if not cond:
        raise Failure(bug, evidence() if callable(evidence) else evidence)


class TestTimeout(BaseException):
    """Raised in the main thread when a test runs past its limit. A BaseException, so that ``except Exception`` in a
    student's file does not swallow it (and the timer re-raises it every second until the test gives up)."""

    __test__ = False  # not a pytest test class


def load(path: str):
    """Import a student file as a fresh module (its own name, so several files can be graded in one process)."""
    name = "graded_" + hashlib.sha1(os.path.abspath(path).encode()).hexdigest()[:12]
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    mod.__source__ = open(path, encoding="utf-8").read()
    spec.loader.exec_module(mod)
    mod.__source__ = open(path, encoding="utf-8").read()
    return mod


_WATCH: dict = {}  # what the watchdog writes if it has to end the grader: the report so far


def _hard_stop(what: str, seconds: float) -> None:  # runs in the watchdog thread
    out = _WATCH.get("out") or sys.stdout
    msg = (f"  [FAIL] {what}: still running {GRACE:g} s after its {seconds:g} s limit and deaf to the interrupt "
           "(a loop that catches every exception, or a call that never returns): the grader stops here.")  # fmt: skip
    with contextlib.suppress(Exception):
        print(msg, file=out, flush=True)
        report = _WATCH.get("report")
        if report is not None and _WATCH.get("json"):
            _write_json(report, _WATCH["json"], extra=msg)
    os._exit(3)


@contextlib.contextmanager
def deadline(seconds: float | None, what: str):
    """Interrupt the body with TestTimeout after ``seconds`` (SIGALRM in the main thread, POSIX); a watchdog thread
    ends the process if the body ignores the interrupt for GRACE seconds more. ``seconds`` None or 0: no limit."""
    if not seconds:
        yield
        return
    use_alarm = hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()
    old = None
    if use_alarm:

        def on_alarm(signum, frame):
            raise TestTimeout(what)

        old = signal.signal(signal.SIGALRM, on_alarm)
        signal.setitimer(signal.ITIMER_REAL, seconds, 1.0)  # then every second, if the first one is swallowed
    watchdog = threading.Timer(seconds + GRACE, _hard_stop, args=(what, seconds))
    watchdog.daemon = True
    watchdog.start()
    try:
        yield
    finally:
        watchdog.cancel()
        if use_alarm:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)


# ------------------------------------------------------------------------------------------------ grading


@dataclass
class Result:
    test: Test
    status: str  # PASS, FAIL or WARN
    score: float  # points earned (before the suite weight)
    seconds: float
    bug: str = ""
    message: str = ""
    info: str = ""  # what the test reports even when it passes (e.g. the acceptance reached)
    output: str = ""  # what the student's code printed during the test


@dataclass
class Report:
    """The result of grading one file: truthy iff every required test passed."""

    assignment: str
    path: str
    suites: tuple[str, ...]
    results: list[Result] = field(default_factory=list)
    seconds: float = 0.0
    import_error: str = ""

    @property
    def ok(self) -> bool:
        return not self.import_error and all(r.status != "FAIL" for r in self.results)

    @property
    def integrity_ok(self) -> bool:
        return all(r.status == "PASS" for r in self.results if r.test.gate)

    def weight(self, t: Test) -> float:
        return 1.0 / len(self.suites)

    @property
    def score(self) -> float:
        if not self.integrity_ok:
            return 0.0
        return sum(r.score * self.weight(r.test) for r in self.results)

    @property
    def max_score(self) -> float:
        return float(sum(suite_points(self.assignment, s) for s in self.suites) / len(self.suites))

    def suite_score(self, suite: str) -> float:
        if not self.integrity_ok:
            return 0.0
        return sum(r.score for r in self.results if r.test.suite == suite)

    def __bool__(self) -> bool:
        return self.ok


def suite_points(assignment: str, suite: str = "public") -> int:
    return sum(t.points for t in suite_tests(assignment, suite))


def suite_tests(assignment: str, suite: str = "public") -> list[Test]:
    if suite == "hidden":
        load_hidden()
        return HIDDEN.get(assignment, [])
    return TESTS[assignment]


_HIDDEN_LOADED: list = []


def load_hidden(path: str | None = None) -> bool:
    """Load the instructor-only hidden suite (``hidden_suite.py`` beside this file) once; False if absent."""
    if _HIDDEN_LOADED:
        return bool(HIDDEN)
    path = path or os.path.join(HERE, "hidden_suite.py")
    _HIDDEN_LOADED.append(path)
    if not os.path.isfile(path):
        return False
    spec = importlib.util.spec_from_file_location("minimtp_hidden_suite", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    mod.register(sys.modules[__name__])
    return True


def hidden_seed(secret: str, assignment: str, name: str) -> int:
    """The seed of one hidden test: a hash of the instructor's secret, the assignment and the test."""
    return int.from_bytes(hashlib.sha256(f"{secret}\0{assignment}\0{name}".encode()).digest()[:6], "little")


def _where(e: BaseException, path: str) -> str:
    tb = traceback.extract_tb(e.__traceback__)
    return next((f"{os.path.basename(f.filename)}:{f.lineno}" for f in reversed(tb) if f.filename == path), "")


def _run_one(t: Test, mod, path: str, timeout: float | None, seed: int | None) -> Result:
    buf = io.StringIO()
    t0 = time.perf_counter()
    info = ""
    try:
        with deadline(timeout, t.name), contextlib.redirect_stdout(buf):
            info = t.fn(mod) if seed is None else t.fn(mod, seed)
        status, bug, msg = "PASS", "", ""
    except TestTimeout:
        status, bug = "FAIL", "timeout"
        msg = f"the test did not finish within {timeout:g} s (an infinite loop? --timeout S changes the limit)"
    except NotImplementedError as e:
        status, bug, msg = "FAIL", "not implemented", f"not implemented yet ({e or 'a TODO is left'})"
    except Failure as e:
        status, bug, msg = "FAIL", e.bug, e.evidence
    except AssertionError as e:
        status, bug, msg = "FAIL", t.bug, str(e) or "assertion failed"
    except Exception as e:
        where = _where(e, path)
        status, bug = "FAIL", t.bug or "runtime error"
        msg = f"{type(e).__name__}: {e}" + (f" (at {where})" if where else "")
    if status == "FAIL" and not t.required:
        status = "WARN"
    return Result(t, status, float(t.points if status == "PASS" else 0), time.perf_counter() - t0, bug, msg,
                  str(info or ""), buf.getvalue())  # fmt: skip


def hint_for(r: Result) -> str:
    """The hint of the bug class the failure names (longest known name it starts with), else the test's."""
    names = [b for b in BUG_HINTS if r.bug == b or r.bug.startswith(b + " (")]
    return BUG_HINTS[max(names, key=len)] if names else r.test.hint


def _indent(text: str, pad: str = "         ") -> str:
    return ("\n" + pad).join(text.splitlines())


def _print_result(r: Result, out) -> None:
    t = r.test
    pts = "gate" if t.gate else ("advisory" if not t.required else f"{r.score:g}/{t.points} pts")
    print(f"  [{r.status}] {t.name} ({pts}, {r.seconds:.1f}s)" + (f": {r.info}" if r.info else ""), file=out)
    if r.status != "PASS":
        print(f"         bug class: {r.bug or 'failed check'}", file=out)
        print(f"         evidence: {_indent(r.message)}", file=out)
        print(f"         hint: {_indent(hint_for(r))}", file=out)
    if r.output.strip():
        tail = r.output.strip().splitlines()[-5:]
        print("         your code printed: " + _indent("\n".join(tail)), file=out)


def grade(assignment: str, path: str, out=None, fail_fast: bool = False, timeout: float | None = DEFAULT_TIMEOUT,
          secret: str | None = None, suite: str | None = None, json_path: str | None = None) -> Report:  # fmt: skip
    """Grade the file ``path`` as ``assignment``; print the report to ``out``; return a Report (truthy iff every
    required test passed). ``suite``: "public", "hidden" or "both" (default: "both" with a ``secret``, else
    "public"). ``json_path``: also write Gradescope's results.json there ("-": standard output)."""
    out = out or sys.stdout
    suite = suite or ("both" if secret else "public")
    suites = ("public", "hidden") if suite == "both" else (suite,)
    if "hidden" in suites:
        if not load_hidden():
            raise SystemExit("the hidden suite (hidden_suite.py, instructors only) is not in this copy of the grader")
        if not secret:
            raise SystemExit(f"the hidden suite needs a secret: --hidden SECRET or {SECRET_ENV}")
    torch.set_num_threads(1)
    report = Report(assignment, path, suites)
    _WATCH.update(out=out, report=report, json=json_path)
    t_start = time.perf_counter()
    names = {"public": "public suite", "hidden": "hidden suite"}
    print(f"Grading {path} as assignment '{assignment}' ({' + '.join(names[s] for s in suites)})", file=out)
    try:
        with deadline(timeout, "import"), contextlib.redirect_stdout(io.StringIO()):
            mod = load(path)
    except (Exception, TestTimeout) as e:  # a syntax error, an import that loops, etc.: report, do not crash
        what = "it did not finish" if isinstance(e, TestTimeout) else f"{type(e).__name__}: {e}"
        report.import_error = what
        print(f"  [FAIL] import: {what}", file=out)
        for s in suites:
            for t in suite_tests(assignment, s):
                report.results.append(Result(t, "FAIL", 0.0, 0.0, "import error", f"the file does not import: {what}"))
    else:
        for s in suites:
            if len(suites) > 1:
                print(f"  -- {names[s]} --", file=out)
            for t in suite_tests(assignment, s):
                seed = hidden_seed(secret, assignment, t.name) if s == "hidden" else None
                r = _run_one(t, mod, path, timeout, seed)
                report.results.append(r)
                _print_result(r, out)
                if fail_fast and r.status == "FAIL":
                    print("  (stopped at the first failure: --fail-fast)", file=out)
                    break
            else:
                continue
            break
    report.seconds = time.perf_counter() - t_start
    passed = sum(r.status == "PASS" for r in report.results)
    failed = sum(r.status == "FAIL" for r in report.results)
    warned = sum(r.status == "WARN" for r in report.results)
    if not report.integrity_ok:
        print("  an integrity check failed: the score is 0 (the other tests ran for feedback only)", file=out)
    each = [f"{s} {report.suite_score(s):g}/{suite_points(assignment, s)}" for s in suites]
    parts = "" if len(suites) == 1 else " (" + ", ".join(each) + ", each counts half)"
    print(f"Score: {report.score:g}/{report.max_score:g}{parts}", file=out)
    print(f"{'PASSED' if report.ok else 'FAILED'}: {passed} passed, {failed} failed, {warned} advisory warnings",
          file=out)  # fmt: skip
    if json_path:
        _write_json(report, json_path)
    _WATCH.clear()
    return report


def gradescope_json(report: Report, extra: str = "") -> dict:
    """Gradescope's results.json (gradescope-autograders.readthedocs.io, "Autograder Specifications"): a top-level
    score and execution_time, and one entry per test (score, max_score, status, name, output, visibility). Hidden
    tests are shown to the student once the grades are published ("after_published")."""
    tests = []
    for r in report.results:
        w = report.weight(r.test)
        text = [f"bug class: {r.bug}", f"evidence: {r.message}", f"hint: {hint_for(r)}"] if r.status != "PASS" else []
        if r.info:
            text.insert(0, r.info)
        if r.test.gate and r.status == "FAIL":
            text.append("integrity check failed: the file scores 0")
        if not r.test.required:
            text.append("advisory test: 0 points, it does not fail the grade")
        if r.output.strip():
            text.append("your code printed:\n" + r.output.strip()[-2000:])
        tests.append({
            "name": f"{r.test.name} [{r.test.suite}]" if len(report.suites) > 1 else r.test.name,
            "score": round(r.score * w if report.integrity_ok else 0.0, 4),
            "max_score": round(r.test.points * w, 4),
            "status": "passed" if r.status == "PASS" else "failed",
            "output": "\n".join(text),
            "visibility": "visible" if r.test.suite == "public" else "after_published",
        })  # fmt: skip
    lines = [f"assignment {report.assignment}: {report.score:g}/{report.max_score:g}"]
    if report.import_error:
        lines.append(f"the file does not import: {report.import_error}")
    if not report.integrity_ok:
        lines.append("an integrity check failed: the score is 0")
    if extra:
        lines.append(extra)
    return {
        "score": round(report.score, 4),
        "execution_time": round(report.seconds, 1),
        "output": "\n".join(lines),
        "tests": tests,
    }


def _write_json(report: Report, path: str, extra: str = "") -> None:
    text = json.dumps(gradescope_json(report, extra), indent=2, ensure_ascii=False)
    if path == "-":
        sys.__stdout__.write(text + "\n")
        sys.__stdout__.flush()
    else:
        with open(path, "w", encoding="utf-8") as f:
            f.write(text + "\n")


# ------------------------------------------------------------------------------------------------ integrity (AST)


def _dotted(node) -> str | None:
    """'a.b.c' for a Name / Attribute chain, else None."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        return ".".join([node.id, *reversed(parts)])
    return None


_DYNAMIC = (
    "import_module",
    "__import__",
    "spec_from_file_location",
    "run_path",
    "run_module",
    "load_module",
    "SourceFileLoader",
    "module_from_spec",
    "exec_module",
)


class _Imports:
    """What a module imports, read from its syntax tree: ``names`` maps each bound name to the dotted path it
    stands for ('tl' -> 'triton.language', 'softmax' -> 'torch.softmax'); ``modules`` every module imported."""

    def __init__(self, tree: ast.AST):
        self.names: dict[str, str] = {}
        self.modules: list[tuple[str, int]] = []
        self.dynamic: list[tuple[str, int]] = []
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    self.modules.append((a.name, node.lineno))
                    if a.asname:
                        self.names[a.asname] = a.name
                    else:
                        root = a.name.split(".")[0]
                        self.names[root] = root
            elif isinstance(node, ast.ImportFrom):
                base = ("." * node.level) + (node.module or "")
                self.modules.append((base, node.lineno))
                for a in node.names:
                    self.modules.append((f"{base}.{a.name}", node.lineno))
                    self.names[a.asname or a.name] = f"{base}.{a.name}"
            elif isinstance(node, ast.Call):
                f = self.resolve(node.func) or ""
                bare = isinstance(node.func, ast.Name) and f in ("exec", "eval", "compile", "__import__")
                if bare or f.split(".")[-1] in _DYNAMIC:
                    self.dynamic.append((f, node.lineno))
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                if node.value.startswith("minimtp.") and node.value.replace(".", "").replace("_", "").isalnum():
                    self.modules.append((node.value, node.lineno))  # sys.modules["minimtp.x"] and the like

    def resolve(self, node) -> str | None:
        d = _dotted(node)
        if d is None:
            return None
        head, _, rest = d.partition(".")
        base = self.names.get(head, head)
        return f"{base}.{rest}" if rest else base


def _check_imports(mod, allowed_minimtp: tuple[str, ...], bug: str) -> None:
    """Every import of a ``minimtp`` module must be one of ``allowed_minimtp`` (or inside one); no dynamic imports,
    exec or eval. Also every attribute path read through ``import minimtp`` (``minimtp.speculative.verify``)."""
    tree = ast.parse(mod.__source__)
    imp = _Imports(tree)
    for f, line in imp.dynamic:
        raise Failure(bug, f"line {line}: {f}(...): dynamic imports, exec and eval are not allowed in this "
                      "assignment (the grader checks imports statically)")  # fmt: skip

    def ok(path: str) -> bool:
        return any(path == a or path.startswith(a + ".") for a in allowed_minimtp)

    for name, line in imp.modules:
        if (name == "minimtp" or name.startswith("minimtp.")) and name != "minimtp" and not ok(name):
            if not any(a.startswith(name + ".") for a in allowed_minimtp):  # "from minimtp import sampling" is fine
                raise Failure(bug, f"line {line}: imports {name} (allowed from minimtp: {', '.join(allowed_minimtp)})")
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and not isinstance(getattr(node, "ctx", None), ast.Store):
            path = imp.resolve(node) or ""
            if path.startswith("minimtp.") and not ok(path) and not any(a.startswith(path + ".")
                                                                        for a in allowed_minimtp):  # fmt: skip
                raise Failure(bug, f"line {node.lineno}: uses {path} (allowed from minimtp: "
                              f"{', '.join(allowed_minimtp)})")  # fmt: skip
        if isinstance(node, ast.Call) and (imp.resolve(node.func) or "").split(".")[-1] == "getattr":
            if node.args and (imp.resolve(node.args[0]) or "").split(".")[0] == "minimtp":
                raise Failure(bug, f"line {node.lineno}: getattr on a minimtp module")


# ------------------------------------------------------------------------------------------------ statistics


def chi2_sf(x: float, df: int) -> float:
    """P(χ²_df > x) = Q(df/2, x/2) (regularised upper incomplete gamma)."""
    if df <= 0:
        return 1.0
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), torch.tensor(x / 2.0)))


def chi2_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, float, int, list]:
    """Pearson's χ² of ``counts`` against ``probs`` with cells of expected count < 5 pooled: (statistic, p-value,
    degrees of freedom, cells [(label index or list of pooled indices, observed, expected)])."""
    counts, probs = counts.flatten().double(), probs.flatten().double()
    n = float(counts.sum())
    idx = probs.gt(0).nonzero()[:, 0]
    e_all = probs / probs[idx].sum() * n
    order = idx[torch.argsort(e_all[idx])]
    cells = [([int(i)], float(counts[i]), float(e_all[i])) for i in order]
    while len(cells) > 1 and cells[0][2] < 5:  # pool the smallest cells until each expects >= 5
        (a, ca, ea), (b, cb, eb) = cells[0], cells[1]
        cells = sorted([(a + b, ca + cb, ea + eb), *cells[2:]], key=lambda c: c[2])
    stat = sum((c - e) ** 2 / e for _, c, e in cells)
    return stat, chi2_sf(stat, len(cells) - 1), len(cells) - 1, cells


def chi2_test(counts: torch.Tensor, probs: torch.Tensor, what: str, bug: str = "output distribution is not p",
              label: Callable[[int], str] | None = None, alternatives: dict | None = None) -> None:  # fmt: skip
    """Pearson χ² goodness of fit at level ALPHA; any count in a zero-probability cell fails outright. On failure
    the evidence is the cell with the largest contribution (observed vs expected); ``alternatives`` {bug class:
    wrong distribution}: the first one the counts fit (p-value > 1e-3) names the bug class instead of ``bug``."""
    label = label or (lambda i: f"token {i}")
    counts, probs = counts.flatten().double(), probs.flatten().double()
    n = float(counts.sum())
    zero = (probs <= 0) & (counts > 0)
    if bool(zero.any()):
        i = int(zero.nonzero()[0, 0])
        bug = _best_alternative(counts, alternatives) or bug
        raise Failure(bug, f"{what}: {int(counts[zero].sum())} of {int(n)} samples are outcomes of probability 0, "
                      f"e.g. {label(i)} ({int(counts[i])} times)")  # fmt: skip
    stat, pv, df, cells = chi2_pvalue(counts, probs)
    if pv < ALPHA:
        worst = max(cells, key=lambda c: (c[1] - c[2]) ** 2 / c[2])
        names = ", ".join(label(i) for i in worst[0][:4]) + (" ..." if len(worst[0]) > 4 else "")
        bug = _best_alternative(counts, alternatives) or bug
        raise Failure(bug, f"{what}: χ² = {stat:.1f}, df {df}, p-value {pv:.1e} < α = {ALPHA:g}; largest "
                      f"contribution: {names}: observed {int(worst[1])} ({worst[1] / n:.3f}), expected "
                      f"{worst[2]:.1f} ({worst[2] / n:.3f}), of {int(n)} samples")  # fmt: skip


def _best_alternative(counts: torch.Tensor, alternatives: dict | None) -> str | None:
    for name, probs in (alternatives or {}).items():
        probs = torch.as_tensor(probs).flatten().double()
        if bool(((probs <= 0) & (counts > 0)).any()):
            continue
        if chi2_pvalue(counts, probs)[1] > 1e-3:
            return name
    return None


# =========================================================================================== spec_sampling

DESCRIPTIONS["spec_sampling"] = "the speculative sampling rule: propose() and verify()"
SP = "spec_sampling"
T1 = SamplingParams(temperature=1.0)


def _case(V, K, seed, params, agree=1.0):
    """Target rows P [K+1, V] (processed) and raw draft logits Zq [K, V] that roughly agree with them."""
    g = torch.Generator().manual_seed(seed)
    zp = 1.5 * torch.randn(K + 1, V, generator=g)
    zq = agree * zp[:K] + torch.randn(K, V, generator=g)
    return process_logits(zp, params), zq


def _round(mod, P, Zq, params, mode, N, seed):
    """N independent rounds of propose (K positions) + verify, with context-free rows: [N, K+1] ids, [N] emitted."""
    K1, V = P.shape
    K = K1 - 1
    gens = make_generators(seed, N)
    ids, qs = [], []
    for j in range(K):
        x, q = mod.propose(Zq[j].expand(N, V).clone(), params, mode, draw_exponentials(gens, V))
        ids.append(torch.as_tensor(x).long().view(N))
        qs.append(q)
    draft_ids = torch.stack(ids, 1) if K else torch.zeros(N, 0, dtype=torch.long)
    q = None if (K == 0 or qs[0] is None) else torch.stack([torch.as_tensor(t).float() for t in qs], 1)
    out, n = mod.verify(
        P.expand(N, K1, V).contiguous(),
        draft_ids,
        q,
        torch.full((N,), K, dtype=torch.long),
        draw_uniforms(gens, K),
        draw_exponentials(gens, V),
    )
    return torch.as_tensor(out), torch.as_tensor(n), draft_ids, q, gens


def _norm(p: torch.Tensor) -> torch.Tensor:
    p = p.double().clamp_min(0)
    return p / p.sum()


def _residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    r = (p.double() - q.double()).clamp_min(0)
    return _norm(r) if float(r.sum()) > 0 else _norm(p)


GEMMA_P = torch.tensor([[0.4, 0.3, 0.2, 0.1], [0.25, 0.25, 0.25, 0.25]])
GEMMA_ZQ = torch.tensor([[0.5, 0.3, 0.1, 0.1]]).log()
_P1, _P2, _P3 = SamplingParams(0.7, top_k=4), SamplingParams(1.3, top_p=0.9), SamplingParams(0.5)
CASES = {  # name: (P, Zq, params, mode, N)
    # the example of docs: concepts/speculative-decoding, "Three rules that look right and are not"
    "p=[.4,.3,.2,.1] q=[.5,.3,.1,.1], argmax draft": (GEMMA_P, GEMMA_ZQ, T1, "argmax", 4000),
    "p=[.4,.3,.2,.1] q=[.5,.3,.1,.1], sampled draft": (GEMMA_P, GEMMA_ZQ, T1, "sample", 4000),
    "V=6 k=2 T=0.7 top-k 4, sampled": (*_case(6, 2, 1, _P1), _P1, "sample", 4000),
    "V=6 k=2 T=1.3 top-p 0.9, argmax": (*_case(6, 2, 2, _P2), _P2, "argmax", 4000),
    "V=5 k=3 T=0.5, sampled": (*_case(5, 3, 3, _P3), _P3, "sample", 4000),
}

# the bug classes of this assignment (named in the failure messages, and in the fixtures' "Bug class:" lines)
SP_SHORTCUT = "library shortcut"
SP_ARGMAX_Q = "argmax draft verified as sampled"
SP_WRONG_Q = "q' is not process_logits"
SP_PROPOSE = "propose API"
SP_DRAFTS = "drafts not drawn from q'"
SP_NOT_THRESHOLD = "acceptance not a threshold on u"
SP_IGNORES_Q = "acceptance ignores q"
SP_INVERTED = "inverted ratio q/p"
SP_ZERO = "p(x) = 0 accepted"
SP_ACCEPT = "acceptance probability is not min(1, p/q)"
SP_CONTINUE = "verification continues after a rejection"
SP_WRONG_ROW = "accept test on the wrong target row"
SP_TEMP_TWICE = "temperature applied twice"
SP_TEMP_P_ONLY = "temperature on p only"
SP_GREEDY = "greedy match rule for argmax drafts"
SP_ONE_U = "one uniform reused for every draft"
SP_Q_STEP = "q from the wrong step"
SP_RESIDUAL = "residual distribution"
SP_RESIDUAL_P = "residual sampled from p (q not subtracted)"
SP_RESIDUAL_Q = "residual sampled from q"
SP_RESIDUAL_SIGN = "residual (q - p)+ (sign flipped)"
SP_RESIDUAL_ROW = "residual from the wrong row"
SP_ARGMAX_KEEPS_X = "argmax rejection keeps x"
SP_BONUS = "bonus token distribution"
SP_BONUS_ROW = "bonus from the wrong row"
SP_NUM_DRAFTS = "num_drafts ignored"
SP_LAYOUT = "output layout"
SP_INVALID = "invalid draft id accepted"
SP_P_ZERO_OUT = "emitted token with p = 0"
SP_OUTPUT = "output distribution is not p"


# fmt: off
BUG_HINTS.update({
    SP_ARGMAX_Q: "an argmax draft is a point mass at x: return (x, None) from propose, accept with probability p(x) "
    "and on rejection sample p with x removed (docs: concepts/speculative-decoding, 'Three rules that look right "
    "and are not', rule 1).",
    SP_WRONG_Q: "q' = process_logits(draft_logits, params): the SAME processing as the target's p (temperature, "
    "top-k, top-p, min-p), and that q' is both sampled from and returned.",
    SP_TEMP_TWICE: "apply the temperature once: process_logits(draft_logits, params) already divides by it.",
    SP_TEMP_P_ONLY: "the drafter's distribution needs the same temperature and filters as the target's: "
    "q' = process_logits(draft_logits, params), not softmax(draft_logits).",
    SP_DRAFTS: "sample x with sample(q', noise) from the very q' you return; drafting from another distribution than "
    "the one in the ratio biases the output (z-lab/dflash issue #74, deepseek-ai/DeepSpec issue #31).",
    SP_NOT_THRESHOLD: "acceptance must be the threshold test u < min(1, p(x)/q(x)) on the given uniform: 'accept iff "
    "x equals a token sampled from p' accepts with probability sum p*q (mlx-swift-lm PR #459).",
    SP_IGNORES_Q: "for a sampled draft the ratio is p(x)/q(x): dividing by q is what makes the output exactly p.",
    SP_INVERTED: "the ratio is p(x)/q(x) (target over draft), not q(x)/p(x).",
    SP_ZERO: "accept iff u < ratio, strictly: with u = 0 a draft of probability p(x) = 0 must still be rejected.",
    SP_WRONG_ROW: "draft j is tested against target row j (the row conditioned on the drafts before it); row j+1 is "
    "the next draft's (or the bonus').",
    SP_CONTINUE: "stop at the first rejection: emit the one residual token and return; later drafts are never used.",
    SP_GREEDY: "'accept iff x is the argmax of p' is the greedy rule (T = 0); at T > 0 accept an argmax draft with "
    "probability p(x), via u < p(x).",
    SP_ONE_U: "draft j uses its own uniform u[j]; reusing u[0] correlates the accept tests.",
    SP_Q_STEP: "draft j's ratio and residual use q_j, the distribution draft j was sampled from, not q_0.",
    SP_RESIDUAL: "on a rejection sample norm((p_j - q_j)^+) (argmax drafts: p_j with x removed; all zeros: p_j).",
    SP_RESIDUAL_P: "the residual is max(p - q, 0), not p: sampling p again double-counts the mass already accepted.",
    SP_RESIDUAL_Q: "the residual is max(p - q, 0), built from the target's p minus the draft's q.",
    SP_RESIDUAL_SIGN: "the residual is max(p - q, 0): the tokens the draft under-proposes, not max(q - p, 0).",
    SP_RESIDUAL_ROW: "the residual of draft j uses p_j and q_j, the rows of the rejected draft.",
    SP_ARGMAX_KEEPS_X: "for an argmax draft the residual is p with x set to 0: x was already offered with p(x).",
    SP_BONUS: "if all n drafts are accepted sample the bonus from p_n, the row after the last draft.",
    SP_BONUS_ROW: "the bonus comes from row n = num_drafts (the row after the last accepted draft), not row n-1.",
    SP_NUM_DRAFTS: "sequence b uses only its first num_drafts[b] drafts: at most num_drafts + 1 tokens, bonus from "
    "row num_drafts.",
    SP_LAYOUT: "out_ids [B, K+1]: accepted drafts, one more token, then -1; num_emitted = accepted + 1.",
    SP_INVALID: "a draft id outside [0, V) is rejected whatever u is: check 0 <= x < V before reading p[x] "
    "(p[-1] is a valid index in Python).",
    SP_P_ZERO_OUT: "the emitted token must have p > 0 in its row: sample the residual / bonus with "
    "sample(dist, noise).",
})
# fmt: on


@test(SP, "write the rule yourself: import nothing from minimtp but minimtp.sampling (process_logits, sample) and "
      "minimtp.errors; no dynamic imports (importlib, __import__, exec).", bug=SP_SHORTCUT, gate=True)  # fmt: skip
def no_library_shortcut(mod):
    _check_imports(mod, ("minimtp.sampling", "minimtp.errors"), SP_SHORTCUT)


def check_propose(mod, seed: int, V: int, params: SamplingParams) -> None:
    z = torch.randn(5, V, generator=torch.Generator().manual_seed(seed)) * 1.5
    noise = draw_exponentials(make_generators(seed, 5), V)
    x, q = mod.propose(z.clone(), params, "argmax", noise)
    check(q is None, SP_ARGMAX_Q, "'argmax' mode returned a q: an argmax draft is a point mass, it has no q (return "
          "None); verifying it with min(1, p/q) as if x ~ q emits [.8, 0, .2, 0] for p = [.4, .3, .2, .1]")  # fmt: skip
    check(torch.equal(torch.as_tensor(x).long().view(5), z.argmax(-1)), SP_PROPOSE,
          "'argmax' mode must return the argmax of the raw logits")  # fmt: skip
    x, q = mod.propose(z.clone(), params, "sample", noise)
    want = process_logits(z, params)
    check(q is not None and tuple(torch.as_tensor(q).shape) == (5, V), SP_PROPOSE,
          f"'sample' mode returned q of shape {getattr(q, 'shape', q)}, expected (5, {V})")  # fmt: skip
    err = (torch.as_tensor(q).float() - want).abs().amax(-1)
    T = params.temperature
    alts = [
        (SP_TEMP_TWICE, process_logits(z / T, params), f"process_logits with temperature {T * T:g}"),
        (SP_TEMP_P_ONLY, process_logits(z, dataclasses.replace(params, temperature=1.0)), "temperature 1"),
        (SP_TEMP_P_ONLY, torch.softmax(z, -1), "the raw softmax (no temperature, no top-k / top-p)"),
    ]
    for bug, alt, what in alts:
        if bool((err > 1e-6).any()) and bool(((torch.as_tensor(q).float() - alt).abs() <= 1e-6).all()):
            raise Failure(bug, f"V={V}, {params}: q' equals {what}: the drafter's q' must be processed exactly like "
                          "the target's p (one temperature, then top-k / top-p)")  # fmt: skip
    check(bool((err <= 1e-6).all()), SP_WRONG_Q, lambda: f"V={V}, {params}: row {int(err.argmax())} of q' differs "
          f"from process_logits(draft_logits, params) by {float(err.max()):.2e}")  # fmt: skip
    x = torch.as_tensor(x).long().view(5)
    check(bool((want.gather(-1, x.view(5, 1)) > 0).all()), SP_DRAFTS, "a draft outside the support of q'")


@test(SP, "propose(): 'sample' must return (x, q') with q' = process_logits(draft_logits, params) and x drawn with "
      "sample(q', noise); 'argmax' returns (argmax of the raw logits, None): a one-hot proposal has no q.",
      points=8, bug=SP_PROPOSE)  # fmt: skip
def propose_api(mod):
    check_propose(mod, 0, 8, SamplingParams(0.7, top_k=3))


def check_drafts_follow_q(mod, name: str, Zq: torch.Tensor, params: SamplingParams, N: int, seed: int) -> None:
    V = Zq.shape[-1]
    gens = make_generators(seed, N)
    x, q = mod.propose(Zq[0].expand(N, -1).clone(), params, "sample", draw_exponentials(gens, V))
    counts = torch.bincount(torch.as_tensor(x).long().view(-1), minlength=V)
    raw = torch.softmax(Zq[0].double(), -1)
    chi2_test(counts, torch.as_tensor(q)[0].double(), f"{name}: draft frequencies vs the returned q'", SP_DRAFTS,
              alternatives={f"{SP_DRAFTS} (drawn from the raw softmax: temperature / top-k ignored)": raw})  # fmt: skip


@test(SP, "the drafts must be SAMPLED FROM THE q' YOU RETURN: drafting from the raw softmax (ignoring temperature / "
      "top-k) while the ratio uses the processed q' biases the output (z-lab/dflash issue #74: temperature never "
      "reached the drafter's sampler; deepseek-ai/DeepSpec issue #31: bf16 draft, float32 ratio).",
      points=8, bug=SP_DRAFTS, chi2=2)  # fmt: skip
def drafts_follow_q(mod):
    for name in ("V=6 k=2 T=0.7 top-k 4, sampled", "V=5 k=3 T=0.5, sampled"):
        P, Zq, params, mode, N = CASES[name]
        check_drafts_follow_q(mod, name, Zq, params, N, 11)


def check_acceptance(mod, g: torch.Generator, V: int, trials: int = 6) -> None:
    """Integrate over u analytically: for every noise row the accepted set must be [0, r), r = min(1, ratio).
    Probes just below / above r, p(x) and q(x)/p(x) tell the classic wrong rules apart."""
    found = []  # (priority, bug, evidence)
    for mode in ("sample", "argmax"):
        for trial in range(trials):
            p = process_logits(1.5 * torch.randn(2, V, generator=g), T1)
            q = process_logits(1.5 * torch.randn(1, V, generator=g), T1)
            x = int(torch.randint(0, V, (1,), generator=g))
            if trial == 0:
                p[0, x] = 0.0  # p(x) = 0: never accepted
                p[0] /= p[0].sum()
            px, qx = float(p[0, x]), float(q[0, x])
            r = float(p[0, x] if mode == "argmax" else p[0, x] / q[0, x])
            r1 = float(p[1, x] if mode == "argmax" else p[1, x] / q[0, x])  # the ratio with the next target row
            marks = [r, px, r1] + ([qx / px] if px > 0 else [])
            probes = {0.0, 0.5, 1 - 1e-12}
            for m in marks:
                probes |= {0.999999 * m, 1.0000001 * m}
            probes = sorted(u for u in probes if 0 <= u < 1)
            R = 5  # noise rows per probe
            noise = draw_exponentials(make_generators(trial, R), V)
            u = torch.tensor([[pr] for pr in probes for _ in range(R)], dtype=torch.float64)
            B = len(u)
            out, n = mod.verify(
                p.expand(B, 2, V).contiguous(),
                torch.full((B, 1), x, dtype=torch.long),
                None if mode == "argmax" else q.expand(B, 1, V).contiguous(),
                torch.ones(B, dtype=torch.long),
                u,
                noise.repeat(len(probes), 1),
            )
            out, n = torch.as_tensor(out), torch.as_tensor(n).view(-1)
            wrong_first = (n == 2) & (out[:, 0] != x)
            if bool(wrong_first.any()):
                i = int(wrong_first.nonzero()[0, 0])
                found.append((0, SP_CONTINUE, f"{mode} draft x={x}, u={float(u[i, 0]):.6f}: emitted "
                              f"{out[i].tolist()} (num_emitted 2): the first token is not the draft, so it was "
                              "rejected, yet the round went on; stop at the first rejection"))  # fmt: skip
                continue
            acc = (n.view(len(probes), R) == 2).tolist()
            want = [pr < r for pr in probes]
            if all(all(a == w for a in row) for row, w in zip(acc, want)):
                continue
            what = f"{mode} draft x={x} with p(x)={px:.4f}" + ("" if mode == "argmax" else f", q(x)={qx:.4f}")
            i = next(i for i, (row, w) in enumerate(zip(acc, want)) if any(a != w for a in row))
            ev = (f"{what}: at u={probes[i]:.6f} the draft was {'accepted' if acc[i][0] else 'rejected'}"
                  f"{' for some noise rows and not others' if len(set(acc[i])) > 1 else ''}; the accepted set must "
                  f"be [0, {min(r, 1):.6f})")  # fmt: skip
            rows = [row[0] for row in acc]
            if any(len(set(row)) > 1 for row in acc):
                found.append((0, SP_NOT_THRESHOLD, ev + " (it depends on the noise, not only on u)"))
            elif px > 0 and rows == [pr < r1 for pr in probes] and abs(r1 - r) > 1e-6:
                found.append(
                    (
                        2,
                        SP_WRONG_ROW,
                        ev + f": the accepted set is [0, {min(r1, 1):.6f}), the ratio with "
                        "target row j + 1; draft j is tested against row j (the row conditioned on drafts < j)",
                    )
                )
            elif mode == "argmax" and len(set(rows)) == 1 and rows[0] == (x == int(p[0].argmax())):
                found.append((1, SP_GREEDY, ev + ": accepted iff x is the argmax of p, whatever u; an argmax draft "
                              "is accepted with probability p(x)"))  # fmt: skip
            elif px == 0 and rows[0]:
                found.append((3, SP_ZERO, ev + ": accept iff u < ratio, strictly"))
            elif mode == "sample" and rows == [pr < px for pr in probes]:
                found.append((2, SP_IGNORES_Q, ev + ": the accepted set is [0, p(x)), q was not divided out"))
            elif mode == "sample" and px > 0 and rows == [pr < min(1.0, qx / px) for pr in probes]:
                found.append((2, SP_INVERTED, ev + ": the accepted set is [0, q(x)/p(x))"))
            elif not all(rows[i] >= rows[i + 1] for i in range(len(rows) - 1)):  # not a prefix [0, c)
                found.append((0, SP_NOT_THRESHOLD, ev))
            else:
                found.append((4, SP_ACCEPT, ev))
    if found:
        _, bug, ev = min(found, key=lambda f: f[0])
        raise Failure(bug, ev)


@test(SP, "accept x iff u < p(x)/q(x) (sampled drafts) or u < p(x) (argmax drafts, q None): P_u(accept) must be "
      "min(1, ratio) for every noise row. 'Accept iff x equals a token sampled from p' accepts with the wrong "
      "probability, sum p*q (the bug of mlx-swift-lm PR #459).", points=14, bug=SP_ACCEPT)  # fmt: skip
def acceptance_exact_in_u(mod):
    check_acceptance(mod, torch.Generator().manual_seed(5), 6)


def _rows(g, n, V, params=T1, scale=1.5):
    return process_logits(scale * torch.randn(n, V, generator=g), params)


def check_residual(mod, g: torch.Generator, V: int, N: int, seed: int) -> None:
    """Rejections forced by u: sampled drafts (draft 1 surely accepted, draft 2 surely rejected) must emit from
    norm((p_1 - q_1)^+); an argmax draft surely rejected must emit from p_0 with x removed."""
    while True:
        p, q = _rows(g, 3, V), _rows(g, 2, V)
        x1, x2 = int((p[0] / q[0]).argmax()), int((p[1] / q[1]).argmin())
        if float(p[1, x2] / q[1, x2]) < 0.999 and float(p[0, x1] / q[0, x1]) >= 1:
            break
    gens = make_generators(seed, N)
    out, n = mod.verify(p.expand(N, 3, V).contiguous(), torch.tensor([[x1, x2]]).expand(N, 2).contiguous(),
                        q.expand(N, 2, V).contiguous(), torch.full((N,), 2, dtype=torch.long),
                        torch.tensor([[0.0, 1 - 1e-9]], dtype=torch.float64).expand(N, 2).contiguous(),
                        draw_exponentials(gens, V))  # fmt: skip
    out, n = torch.as_tensor(out), torch.as_tensor(n)
    bug = SP_ACCEPT
    if bool((n == 3).all()):  # draft 2 accepted although u = 1 - 1e-9 > its ratio
        bug = SP_Q_STEP if float(p[1, x2] / q[0, x2]) >= 1 - 1e-9 else SP_ONE_U
    check(bool((n == 2).all()) and bool((out[:, 0] == x1).all()), bug,
          lambda: f"V={V}: draft 1 (ratio {float(p[0, x1] / q[0, x1]):.3f} >= 1, u = 0) must be accepted and draft 2 "
          f"(ratio {float(p[1, x2] / q[1, x2]):.3f}, u = 1 - 1e-9) rejected: num_emitted = 2; got "
          f"{torch.as_tensor(n)[:4].tolist()}...")  # fmt: skip
    alts = {SP_RESIDUAL_P: _norm(p[1]), SP_RESIDUAL_ROW: _residual(p[0], q[0]), SP_RESIDUAL_Q: _norm(q[1]),
            SP_RESIDUAL_SIGN: _residual(q[1], p[1]), f"{SP_RESIDUAL_ROW} (p_2)": _norm(p[2]),
            SP_Q_STEP: _residual(p[1], q[0])}  # fmt: skip
    chi2_test(
        torch.bincount(out[:, 1].clamp(0), minlength=V),
        _residual(p[1], q[1]),
        f"V={V}, sampled drafts, draft 2 rejected: the token emitted instead",
        SP_RESIDUAL,
        alternatives=alts,
    )
    # argmax draft, surely rejected: p with x removed
    x = int(torch.randint(0, V, (1,), generator=g))
    p0 = p[:2].clone()
    out, n = mod.verify(p0.expand(N, 2, V).contiguous(), torch.full((N, 1), x, dtype=torch.long), None,
                        torch.ones(N, dtype=torch.long), torch.full((N, 1), 1 - 1e-9, dtype=torch.float64),
                        draw_exponentials(gens, V))  # fmt: skip
    out = torch.as_tensor(out)
    want = p0[0].double().clone()
    want[x] = 0
    chi2_test(
        torch.bincount(out[:, 0].clamp(0), minlength=V),
        _norm(want),
        f"V={V}, argmax draft x={x} rejected (u = 1 - 1e-9 > p(x) = {float(p0[0, x]):.3f}): the token emitted instead",
        SP_RESIDUAL,
        alternatives={SP_ARGMAX_KEEPS_X: _norm(p0[0]), SP_RESIDUAL_ROW: _norm(p0[1])},
    )


@test(SP, "at the first rejection emit ONE token from norm((p_j - q_j)^+) for a sampled draft (row j: the rejected "
      "draft's), from p_j with x removed for an argmax draft; never from p itself (that double-counts the accepted "
      "mass).", points=5, bug=SP_RESIDUAL, chi2=2)  # fmt: skip
def residual_after_rejection(mod):
    check_residual(mod, torch.Generator().manual_seed(21), 6, 4000, 21)


def check_bonus(mod, g: torch.Generator, V: int, N: int, seed: int) -> None:
    """Drafts whose ratio is >= 1 are surely accepted; the bonus token must come from row num_drafts."""
    p, q = _rows(g, 3, V), _rows(g, 2, V)
    x = torch.stack([(p[j] / q[j]).argmax() for j in range(2)])
    gens = make_generators(seed, N)
    nd = torch.full((N,), 2, dtype=torch.long)
    nd[N // 2 :] = 1  # the second half uses only its first draft: the bonus then comes from row 1
    out, n = mod.verify(p.expand(N, 3, V).contiguous(), x.expand(N, 2).contiguous(), q.expand(N, 2, V).contiguous(),
                        nd, draw_uniforms(gens, 2), draw_exponentials(gens, V))  # fmt: skip
    out, n = torch.as_tensor(out), torch.as_tensor(n)
    check(
        torch.equal(n, nd + 1),
        SP_ACCEPT if bool((n <= nd + 1).all()) else SP_NUM_DRAFTS,
        lambda: (
            f"V={V}: every draft has ratio >= 1 (always accepted): num_emitted must be num_drafts + 1; rows "
            f"with num_drafts {int(nd[(n != nd + 1).nonzero()[0, 0]])} emitted {int(n[(n != nd + 1).nonzero()[0, 0]])}"
        ),
    )
    h = N // 2
    chi2_test(torch.bincount(out[:h, 2].clamp(0), minlength=V), _norm(p[2]),
              f"V={V}, both drafts accepted: the bonus token", SP_BONUS,
              alternatives={f"{SP_BONUS_ROW} (p_1)": _norm(p[1]), f"{SP_BONUS_ROW} (p_0)": _norm(p[0])})  # fmt: skip
    chi2_test(torch.bincount(out[h:, 1].clamp(0), minlength=V), _norm(p[1]),
              f"V={V}, num_drafts 1 of K=2, its draft accepted: the bonus token (row 1)", SP_BONUS,
              alternatives={SP_NUM_DRAFTS: _norm(p[2]), f"{SP_BONUS_ROW} (p_0)": _norm(p[0])})  # fmt: skip


@test(SP, "if all n = num_drafts drafts are accepted emit a bonus token from p_n, the row after the last draft "
      "(num_drafts may be smaller than K: then row num_drafts, not row K).", points=5, bug=SP_BONUS,
      chi2=2)  # fmt: skip
def bonus_after_acceptance(mod):
    check_bonus(mod, torch.Generator().manual_seed(22), 6, 4000, 22)


def check_invariants(mod, g: torch.Generator, trials: int = 20, max_v: int = 9) -> None:
    V = 5  # out-of-range ids, negative ones included, are rejected even at u = 0 (p is uniform: p(id mod V) > 0)
    for q in (None, torch.full((2, 1, V), 1.0 / V)):
        out, n = mod.verify(
            torch.full((2, 2, V), 1.0 / V),
            torch.tensor([[-1], [V]]),
            q,
            torch.ones(2, dtype=torch.long),
            torch.zeros(2, 1, dtype=torch.float64),
            draw_exponentials(make_generators(0, 2), V),
        )
        n = torch.as_tensor(n).view(-1)
        check(
            bool((n == 1).all()),
            SP_INVALID,
            f"{'argmax' if q is None else 'sampled'} drafts with ids -1 and {V} "
            f"(outside [0, {V})), u = 0: num_emitted {n.tolist()}, expected [1, 1] (an invalid id is rejected)",
        )
    for trial in range(trials):
        B, K, V = 3, int(torch.randint(0, 4, (1,), generator=g)), int(torch.randint(2, max_v, (1,), generator=g))
        mode = "sample" if trial % 2 else "argmax"
        params = SamplingParams(1.0, top_k=max(1, V // 2))
        p = process_logits(torch.randn(B * (K + 1), V, generator=g), params).view(B, K + 1, V)
        gens = make_generators(trial, B)
        q = process_logits(torch.randn(B * max(K, 1), V, generator=g), T1).view(B, max(K, 1), V)[:, :K]
        if mode == "sample" and K:
            draft = sample(q.reshape(-1, V), draw_exponentials(gens * K, V)).view(B, K)
        else:
            draft = torch.randint(0, V, (B, K), generator=g)
            if K:
                draft[0, 0] = V + 3 if trial % 4 == 0 else -1  # invalid ids: must be rejected
        nd = torch.randint(0, K + 1, (B,), generator=g)
        out, n = mod.verify(
            p, draft, q if mode == "sample" else None, nd, draw_uniforms(gens, K), draw_exponentials(gens, V)
        )
        out, n = torch.as_tensor(out), torch.as_tensor(n)
        case = f"{mode} drafts, K={K}, V={V}"
        check(
            tuple(out.shape) == (B, K + 1) and tuple(n.shape) == (B,),
            SP_LAYOUT,
            f"{case}: out_ids {tuple(out.shape)}, num_emitted {tuple(n.shape)}; expected ({B}, {K + 1}), ({B},)",
        )
        for b in range(B):
            m = int(n[b])
            check(1 <= m, SP_LAYOUT, f"{case}: num_emitted {m}: a round always emits at least one token")
            check(m <= int(nd[b]) + 1, SP_NUM_DRAFTS, f"{case}: num_emitted {m} with num_drafts {int(nd[b])}")
            if mode == "argmax" and K and b == 0 and int(nd[0]) > 0:
                check(m == 1, SP_INVALID, f"{case}: the draft id {int(draft[0, 0])} (outside [0, {V})) was accepted")
            check(out[b, : m - 1].tolist() == draft[b, : m - 1].tolist(), SP_LAYOUT,
                  f"{case}: row {out[b].tolist()}: the tokens before the last emitted one must be the drafts "
                  f"{draft[b, : m - 1].tolist()}")  # fmt: skip
            check(
                bool((out[b, m:] == -1).all()),
                SP_LAYOUT,
                f"{case}: row {out[b].tolist()} with num_emitted {m}: pad with -1 after the emitted tokens",
            )
            y = int(out[b, m - 1])
            check(
                0 <= y < V and float(p[b, m - 1, y]) > 0,
                SP_P_ZERO_OUT,
                f"{case}: emitted token {y} has p = 0 in row {m - 1} (or is out of range)",
            )


@test(SP, "out_ids [B, K+1]: the accepted drafts, then exactly one more token, then -1; num_emitted = accepted + 1 "
      "<= num_drafts + 1 (num_drafts may be 0, and smaller than K); an id outside [0, V) is never accepted; the "
      "emitted token must have p > 0 in its row.", points=10, bug=SP_LAYOUT)  # fmt: skip
def invariants(mod):
    check_invariants(mod, torch.Generator().manual_seed(7))


def check_distribution(mod, name: str, P, Zq, params, mode, N, seed) -> None:
    out, n, *_ = _round(mod, P, Zq, params, mode, N, seed=seed)
    V = P.shape[1]
    check(tuple(out.shape) == (N, P.shape[0]) and tuple(n.shape) == (N,), SP_LAYOUT,
          f"verify returned shapes {tuple(out.shape)}, {tuple(n.shape)}")  # fmt: skip
    chi2_test(torch.bincount(out[:, 0].clamp(0), minlength=V), P[0].double(), f"{name}: first emitted token",
              SP_OUTPUT)  # fmt: skip
    if P.shape[0] >= 2:  # the second token: emitted by the round, or sampled from p_1 by a plain step
        extra = sample(P[1].expand(N, V), draw_exponentials(make_generators(99, N), V))
        y2 = torch.where(n >= 2, out[:, 1], extra)
        joint = torch.bincount(out[:, 0].clamp(0) * V + y2.clamp(0), minlength=V * V)
        chi2_test(joint, torch.outer(P[0].double(), P[1].double()), f"{name}: first two tokens", SP_OUTPUT,
                  label=lambda i: f"tokens ({i // V}, {i % V})")  # fmt: skip


def _dist_test(name):
    def fn(mod):
        check_distribution(mod, name, *CASES[name], seed=1234)

    fn.__name__ = "distribution: " + name
    return fn


_HINTS = {
    "argmax": "argmax drafts are a point mass: accept with p(x) and on rejection sample p with x removed. Returning "
    "the drafter softmax as q for an argmax draft and using min(1, p/q) gives [.8, 0, .2, 0] instead of "
    "[.4, .3, .2, .1] (what transformers' _speculative_sampling does with the assistant's argmax drafts; docs: "
    "concepts/speculative-decoding, 'Three rules that look right and are not', rule 1).",
    "sample": "accept with min(1, p/q'); on the first rejection sample norm((p - q')^+) with the noise row; if all "
    "drafts are accepted sample the bonus from the NEXT row p_n. Row j of p is conditioned on drafts 1..j.",
}
for _name, (_P, _Z, _params, _mode, _N) in CASES.items():
    TESTS[SP].append(Test("distribution: " + _name, _dist_test(_name), _HINTS[_mode], points=6, bug=SP_OUTPUT, chi2=2))


@test(SP, "advisory: minimtp (and its Triton twin) fix the float ops so results are reproducible bit for bit: ratio "
      "p_x / q_x in float32, accept iff float64(u) < float64(ratio), residual max(p - q, 0) (or p with x zeroed), "
      "p if the residual is all 0, token = sample(dist, noise).", required=False, bug="not bit-for-bit")  # fmt: skip
def matches_minimtp_bit_for_bit(mod):
    from minimtp.speculative import verify as ref

    g = torch.Generator().manual_seed(3)
    for trial in range(30):
        B, K, V = 3, int(torch.randint(0, 4, (1,), generator=g)), int(torch.randint(2, 9, (1,), generator=g))
        p = process_logits(torch.randn(B * (K + 1), V, generator=g) * 2, T1).view(B, K + 1, V)
        q = process_logits(torch.randn(B * max(K, 1), V, generator=g) * 2, T1).view(B, max(K, 1), V)[:, :K]
        gens = make_generators(trial, B)
        draft = sample(q.reshape(-1, V), draw_exponentials(gens * K, V)).view(B, K) if K else torch.zeros(B, 0).long()
        nd = torch.randint(0, K + 1, (B,), generator=g)
        u, e = draw_uniforms(gens, K), draw_exponentials(gens, V)
        qq = q if trial % 2 else None
        want = ref(p, draft, qq, nd, u, e)
        got = mod.verify(p, draft, qq, nd, u, e)
        assert torch.equal(torch.as_tensor(got[0]), want[0]) and torch.equal(torch.as_tensor(got[1]), want[1]), (
            f"differs from minimtp.speculative.verify on a random case ({'sample' if qq is not None else 'argmax'} "
            f"mode): got {torch.as_tensor(got[0]).tolist()}, minimtp {want[0].tolist()}"
        )


# =========================================================================================== kv_rollback

DESCRIPTIONS["kv_rollback"] = "append, rollback and window trimming on a paged KV cache (class PagedKV)"
KV = "kv_rollback"

KV_SHORTCUT = "library shortcut"
KV_APPEND = "append writes the wrong slot"
KV_APPEND_BLOCKS = "append takes the wrong number of blocks"
KV_ATOMIC = "append not atomic on a full pool"
KV_NO_FULL = "no CacheFullError on a full pool"
KV_FALSE_FULL = "CacheFullError although the pool suffices"
KV_STALE = "stale K/V after rollback"
KV_ROLLBACK_LEAK = "rollback leaks blocks"
KV_ROLLBACK_LIVE = "rollback frees a live block"
KV_TRIM_WINDOW = "trim frees a block in the window"
KV_TRIM_DEAD = "trim keeps dead blocks"
KV_TRIM_SHIFT = "trim shifts the table"
KV_CONSERVE = "blocks leaked or double-freed"
KV_FREED_IN_TABLE = "freed blocks left in the block table"
KV_RANDOM = "wrong K/V after a random sequence of operations"


# fmt: off
BUG_HINTS.update({
    KV_APPEND: "position i of the sequence is slot i % block_size of block table[i // block_size]: write row j of "
    "the append at position length + j, after the blocks it needs were taken.",
    KV_APPEND_BLOCKS: "take exactly ceil((length + T) / block_size) - len(table) new blocks: the last block may "
    "have free slots, fill them first.",
    KV_ATOMIC: "check that the pool covers the append BEFORE taking a block, writing a slot or changing the length: "
    "a failed append must leave tables, lengths, free list and contents as they were.",
    KV_NO_FULL: "raise minimtp.errors.CacheFullError when more blocks are needed than the free list holds (and "
    "nothing else, e.g. IndexError from pop()).",
    KV_FALSE_FULL: "the append fails only if needed > len(free): an append that takes exactly the last free blocks "
    "fits.",
    KV_STALE: "rollback(seq, n) sets length = n exactly (not the end of n's block, not n + 1), so the next append "
    "overwrites the rejected drafts' slots.",
    KV_ROLLBACK_LEAK: "after rollback(seq, n) the table holds ceil(n / block_size) blocks: pop the ones past it "
    "back into the free list.",
    KV_ROLLBACK_LIVE: "keep ceil(n / block_size) blocks: the block holding position n - 1 is still in use.",
    KV_TRIM_WINDOW: "trim frees only the blocks whose positions are ALL < length - keep: the first "
    "(length - keep) // block_size entries, counted from the length, not from the table's capacity.",
    KV_TRIM_DEAD: "free every block whose positions are all < length - keep (entry -> None, id -> free list).",
    KV_TRIM_SHIFT: "mark a trimmed entry None; do not delete it (the table is indexed by position // block_size).",
    KV_CONSERVE: "every block id is in exactly one place: one table entry or the free list (never both, never twice, "
    "never lost); skip None entries when freeing.",
    KV_FREED_IN_TABLE: "a freed block must leave its table (rollback pops it, trim sets the entry to None) before "
    "it goes back to the free list.",
})
# fmt: on


@test(KV, "write the cache yourself: import nothing from minimtp but minimtp.errors (CacheFullError); no dynamic "
      "imports.", bug=KV_SHORTCUT, gate=True)  # fmt: skip
def no_library_cache(mod):
    _check_imports(mod, ("minimtp.errors",), KV_SHORTCUT)


def _conserved(cache, num_blocks: int, what: str = "") -> None:
    used = [b for t in cache.tables.values() for b in t if b is not None]
    pre = f"{what}: " if what else ""
    check(
        all(isinstance(b, int) for b in cache.free),
        KV_CONSERVE,
        lambda: (
            f"{pre}the free list holds "
            f"{[b for b in cache.free if not isinstance(b, int)][:3]}: a freed (None) table entry was freed again"
        ),
    )
    check(len(used) == len(set(used)), KV_CONSERVE, lambda: f"{pre}a block id is in two tables (or twice in one): "
          f"{dict(cache.tables)}")  # fmt: skip
    both = sorted(set(used) & set(cache.free))
    check(not both, KV_FREED_IN_TABLE, lambda: f"{pre}block(s) {both} are both in a table and in the free list: a "
          "freed block must leave the table (rollback pops it, trim sets the entry to None)")  # fmt: skip
    check(sorted(used + list(cache.free)) == list(range(num_blocks)), KV_CONSERVE,
          lambda: f"{pre}blocks leaked or duplicated: in tables {sorted(used)}, free {sorted(cache.free)}, pool of "
          f"{num_blocks} (missing {sorted(set(range(num_blocks)) - set(used) - set(cache.free))})")  # fmt: skip


def _kv_rows(T: int, dim: int, g: torch.Generator):
    return torch.randn(T, dim, generator=g), torch.randn(T, dim, generator=g)


def _read(cache, seq: int, start: int):
    """K, V of positions start .. length-1, read by the grader through the block table from the given storage
    ``cache.k`` / ``cache.v`` [num_blocks, block_size, dim] (the file's own gather() only if that is missing)."""
    if not (torch.is_tensor(getattr(cache, "k", None)) and torch.is_tensor(getattr(cache, "v", None))):
        return cache.gather(seq, start)
    bs, table = cache.block_size, cache.tables[seq]
    ks, vs = [], []
    for i in range(start, cache.lengths[seq]):
        j = i // bs
        b = table[j] if j < len(table) else "missing"
        if b is None or b == "missing":
            return i, b
        ks.append(cache.k[b, i % bs])
        vs.append(cache.v[b, i % bs])
    dim = cache.k.shape[-1]
    return (torch.stack(ks) if ks else torch.zeros(0, dim)), (torch.stack(vs) if vs else torch.zeros(0, dim))


def _check_gather(cache, seq: int, dense: list, start: int = 0, what: str = "", bug: str = KV_APPEND) -> None:
    n = cache.lengths[seq]
    check(n == len(dense), bug, f"{what}: length {n}, expected {len(dense)}")
    got = _read(cache, seq, start)
    if isinstance(got[0], int):
        i, b = got
        raise Failure(bug, f"{what}: position {i} is in table entry {i // cache.block_size}, which is "
                      f"{'freed (None)' if b is None else 'missing'}: table {cache.tables[seq]}")  # fmt: skip
    k, v = got
    check(k.shape[0] == n - start, bug, f"{what}: read {k.shape[0]} positions, expected {n - start}")
    for i in range(start, n):
        if not (torch.equal(k[i - start], dense[i][0]) and torch.equal(v[i - start], dense[i][1])):
            wrong = [j for j in range(start, n) if not torch.equal(k[j - start], dense[j][0])]
            raise Failure(bug, f"{what}: first wrong position {i} (of {start}..{n - 1}; wrong K at "
                          f"{wrong[:6]}{' ...' if len(wrong) > 6 else ''}); block table {cache.tables[seq]}, "
                          f"block size {cache.block_size}")  # fmt: skip


def _blocks(n: int, bs: int) -> int:
    return -(-n // bs)


def check_append(mod, g: torch.Generator, nb: int, bs: int, dim: int, ops: list[tuple[int, int]]) -> None:
    cache = mod.PagedKV(nb, bs, dim)
    dense: dict[int, list] = {}
    for s, _ in ops:
        if s not in dense:
            cache.add(s)
            dense[s] = []
    for s, T in ops:
        k, v = _kv_rows(T, dim, g)
        try:
            cache.append(s, k, v)
        except IndexError as e:
            raise Failure(
                KV_APPEND_BLOCKS,
                f"block size {bs}: appending {T} to sequence {s} (length {len(dense[s])}, "
                f"{len(cache.tables[s])} blocks) raised IndexError ({e}): a position past the blocks the "
                "table holds (take ceil((length + T) / block_size) - len(table) blocks)",
            ) from None
        dense[s] += list(zip(k, v))
        what = f"block size {bs}: after appending {T} to sequence {s} (length {len(dense[s])})"
        held, need = len(cache.tables[s]), _blocks(len(dense[s]), bs)
        check(held == need, KV_APPEND_BLOCKS, f"{what}: {held} blocks held, need ceil({len(dense[s])}/{bs}) = {need}")
        _check_gather(cache, s, dense[s], what=what)
        _conserved(cache, nb, what)


@test(KV, "append: grow the table by ceil((length+T)/block_size) - len(table) blocks taken from the pool, write row j "
      "at position length+j (block table[pos // block_size], slot pos % block_size), then length += T.",
      points=12, bug=KV_APPEND)  # fmt: skip
def append_and_gather(mod):
    check_append(mod, torch.Generator().manual_seed(0), 16, 4, 3, [(0, 3), (1, 5), (0, 1), (1, 7), (0, 4), (0, 0),
                                                                    (1, 4)])  # fmt: skip


def _snapshot(cache):
    st = {"tables": {s: list(t) for s, t in cache.tables.items()}, "lengths": dict(cache.lengths),
          "free": sorted(cache.free)}  # fmt: skip
    for name in ("k", "v"):
        if torch.is_tensor(getattr(cache, name, None)):
            st[name] = getattr(cache, name).clone()
    return st


def _changed(before: dict, after: dict) -> str:
    for key in ("tables", "lengths", "free"):
        if before[key] != after[key]:
            return f"{key} changed from {before[key]} to {after[key]}"
    for key in ("k", "v"):
        if key in before and not torch.equal(before[key], after.get(key, before[key])):
            b, s = (before[key] != after[key]).any(-1).nonzero()[0].tolist()
            return f"the contents changed: {key}[block {b}, slot {s}] was written"
    return ""


def check_pool_full(mod, g: torch.Generator, bs: int, dim: int, lens: tuple[int, int], spare: int) -> None:
    """A partly full pool: sequence 0 ends inside a block, sequence 1 holds some blocks, ``spare`` blocks are free.
    An append needing spare + 1 blocks must raise CacheFullError and change nothing (tables, lengths, free list,
    contents); appends that fit exactly must not raise."""
    from minimtp.errors import CacheFullError

    n0, n1 = lens
    nb = _blocks(n0, bs) + _blocks(n1, bs) + spare
    cache = mod.PagedKV(nb, bs, dim)
    cache.add(0)
    cache.add(1)
    dense = {0: [], 1: []}
    for s, n in ((0, n0), (1, n1)):
        k, v = _kv_rows(n, dim, g)
        cache.append(s, k, v)
        dense[s] += list(zip(k, v))
    room = _blocks(n0, bs) * bs - n0  # free slots in sequence 0's last block
    T = room + (spare + 1) * bs - (bs - 1)  # needs exactly spare + 1 new blocks
    before = _snapshot(cache)
    what = (f"pool of {nb} blocks of {bs}, {spare} free, sequence 0 at length {n0} ({room} free slots in its last "
            f"block): appending {T} positions (needs {spare + 1} new blocks)")  # fmt: skip
    try:
        cache.append(0, *_kv_rows(T, dim, g))
    except CacheFullError:
        pass
    except Exception as e:
        raise Failure(KV_NO_FULL, f"{what} raised {type(e).__name__} ({e}) instead of CacheFullError") from None
    else:
        raise Failure(KV_NO_FULL, f"{what} did not raise CacheFullError")
    diff = _changed(before, _snapshot(cache))
    check(not diff, KV_ATOMIC, lambda: f"{what}: the failed append changed the cache: {diff} (check the pool BEFORE "
          "taking any block or writing any slot)")  # fmt: skip
    _check_gather(cache, 0, dense[0], what=what + ", then reading sequence 0", bug=KV_ATOMIC)
    fit = room + spare * bs  # fills the pool exactly
    k, v = _kv_rows(fit, dim, g)
    try:
        cache.append(0, k, v)
    except CacheFullError:
        raise Failure(
            KV_FALSE_FULL,
            f"pool of {nb} blocks of {bs}, {spare} free, sequence 0 at length {n0}: "
            f"appending {fit} positions fits exactly ({spare} new blocks) but raised CacheFullError",
        ) from None
    dense[0] += list(zip(k, v))
    _check_gather(cache, 0, dense[0], what=f"after an append that fills the pool exactly ({fit} positions)")
    _conserved(cache, nb, "a full pool")
    before = _snapshot(cache)
    try:
        cache.append(1, *_kv_rows(_blocks(n1, bs) * bs - n1 + 1, dim, g))
    except CacheFullError:
        pass
    except Exception as e:
        raise Failure(
            KV_NO_FULL,
            f"appending to sequence 1 with no free block raised {type(e).__name__} ({e}) instead of CacheFullError",
        ) from None
    else:
        raise Failure(KV_NO_FULL, f"appending to sequence 1 (length {n1}) one position more than its last block "
                      "holds, with no free block, did not raise CacheFullError")  # fmt: skip
    diff = _changed(before, _snapshot(cache))
    check(not diff, KV_ATOMIC, lambda: f"a failed append on an empty pool changed the cache: {diff}")


@test(KV, "when the pool cannot cover an append, raise minimtp.errors.CacheFullError BEFORE changing anything "
      "(tables, lengths, free list, block contents); an append that fits exactly must succeed.", points=12,
      bug=KV_ATOMIC)  # fmt: skip
def pool_full(mod):
    check_pool_full(mod, torch.Generator().manual_seed(4), 4, 2, (10, 5), 1)


def check_rollback(mod, g: torch.Generator, bs: int, dim: int, total: int, keeps: list[int], extra: int) -> None:
    nb = _blocks(total + extra, bs) + 1
    for n_keep in keeps:
        cache = mod.PagedKV(nb, bs, dim)
        cache.add(0)
        k, v = _kv_rows(total, dim, g)
        cache.append(0, k, v)
        cache.rollback(0, n_keep)
        dense = list(zip(k, v))[:n_keep]
        held = len(cache.tables[0])
        check(held >= _blocks(n_keep, bs), KV_ROLLBACK_LIVE, f"block size {bs}: {total} positions rolled back to "
              f"{n_keep}: {held} blocks held, need ceil({n_keep}/{bs}) = {_blocks(n_keep, bs)} (a block still holding "
              "positions < n was freed)")  # fmt: skip
        _check_gather(cache, 0, dense, what=f"block size {bs}: {total} positions rolled back to {n_keep}", bug=KV_STALE)
        k2, v2 = _kv_rows(extra, dim, g)
        cache.append(0, k2, v2)
        dense += list(zip(k2, v2))
        _check_gather(cache, 0, dense, what=f"block size {bs}: {total} positions, rolled back to {n_keep}, then "
                      f"{extra} appended (they must sit at positions {n_keep}..{n_keep + extra - 1})",
                      bug=KV_STALE)  # fmt: skip
        _conserved(cache, nb, f"after rollback to {n_keep} and append")


@test(KV, "rollback(seq, n) must forget EVERY position >= n: set length = n (not the end of n's block) and free the "
      "blocks entirely past n. Otherwise the next verify step attends to the rejected drafts' stale K/V.",
      points=14, bug=KV_STALE)  # fmt: skip
def rollback_then_append(mod):
    check_rollback(mod, torch.Generator().manual_seed(1), 4, 2, 10, [7, 8, 0, 10, 1], 3)


def check_rollback_frees(mod, g: torch.Generator, nb: int, bs: int, grow: int, keep: int, rounds: int) -> None:
    cache = mod.PagedKV(nb, bs, 2)
    cache.add(0)
    cache.add(1)
    cache.append(1, *_kv_rows(bs + 1, 2, g))
    for r in range(rounds):  # many verify rounds: +grow then keep `keep` of them
        n = cache.lengths[0]
        if _blocks(n + grow, bs) - len(cache.tables[0]) > len(cache.free):
            break
        cache.append(0, *_kv_rows(grow, 2, g))
        cache.rollback(0, n + keep)
        held, want = len(cache.tables[0]), _blocks(n + keep, bs)
        what = (f"block size {bs}, round {r}: length {n} + {grow} appended, rolled back to {n + keep}: {held} "
                f"blocks held, need ceil({n + keep}/{bs}) = {want}")  # fmt: skip
        check(held <= want, KV_ROLLBACK_LEAK, what + " (the blocks past n must go back to the pool)")
        check(held >= want, KV_ROLLBACK_LIVE, what + " (a block still holding positions < n was freed)")
        _conserved(cache, nb, f"round {r}")


@test(KV, "after rollback(seq, n) the table holds exactly ceil(n / block_size) blocks; the others are back in the "
      "free pool (a verify step that is mostly rejected must not leak blocks).", points=10,
      bug=KV_ROLLBACK_LEAK)  # fmt: skip
def rollback_frees_blocks(mod):
    check_rollback_frees(mod, torch.Generator().manual_seed(2), 10, 4, 5, 2, 20)


def check_trim(mod, g: torch.Generator, bs: int, dim: int, nb: int, chunks: list[int], keep: int) -> None:
    cache = mod.PagedKV(nb, bs, dim)
    cache.add(0)
    dense = []
    for c in chunks:
        k, v = _kv_rows(c, dim, g)
        cache.append(0, k, v)
        dense += list(zip(k, v))
        before = list(cache.tables[0])
        cache.trim(0, keep)
        t, L = cache.tables[0], len(dense)
        dead = max(0, L - keep) // bs  # blocks whose positions are all < L - keep
        what = f"block size {bs}, length {L}, trim(keep={keep}): table {before} -> {t}"
        check(len(t) == len(before), KV_TRIM_SHIFT, f"{what}: trim must mark freed entries None, not remove them "
              "(the table is indexed by position // block_size)")  # fmt: skip
        live = [j for j in range(dead, len(t)) if t[j] is None and before[j] is not None]
        if live:
            raise Failure(KV_TRIM_WINDOW, f"{what}: block entry {live[0]} holds positions {live[0] * bs}.."
                          f"{live[0] * bs + bs - 1}, not all < {L - keep}: it is still in the window")  # fmt: skip
        kept = [j for j in range(dead) if t[j] is not None]
        if kept:
            raise Failure(KV_TRIM_DEAD, f"{what}: block entry {kept[0]} (positions {kept[0] * bs}.."
                          f"{kept[0] * bs + bs - 1}, all < {L - keep}) is dead and must be freed")  # fmt: skip
        _conserved(cache, nb, what)
        _check_gather(cache, 0, dense, start=dead * bs, what=what, bug=KV_TRIM_WINDOW)


@test(KV, "trim(seq, keep): free the blocks whose positions are ALL < length - keep (table entry -> None, id -> pool);"
      " never a block holding a position >= length - keep.", points=14, bug=KV_TRIM_WINDOW)  # fmt: skip
def trim_window(mod):
    check_trim(mod, torch.Generator().manual_seed(3), 4, 2, 12, [20, 6, 3], 5)
    check_trim(mod, torch.Generator().manual_seed(6), 4, 2, 8, [13, 2], 4)  # the last block partly full


def check_random(mod, g: torch.Generator, nb: int, bs: int, dim: int, steps: int, keep: int) -> None:
    rnd = lambda n: int(torch.randint(0, n, (1,), generator=g))
    cache = mod.PagedKV(nb, bs, dim)
    dense: dict[int, list] = {}
    next_id = 0
    log = []
    for step in range(steps):
        op = rnd(10)
        if op == 0 or not dense:
            cache.add(next_id)
            dense[next_id] = []
            log.append(f"add({next_id})")
            next_id += 1
            continue
        s = list(dense)[rnd(len(dense))]
        start = sum(1 for b in cache.tables[s] if b is None) * bs
        if op <= 4:
            T = rnd(2 * bs)
            if _blocks(len(dense[s]) + T, bs) - len(cache.tables[s]) > len(cache.free):
                continue
            k, v = _kv_rows(T, dim, g)
            cache.append(s, k, v)
            dense[s] += list(zip(k, v))
            log.append(f"append({s}, {T})")
        elif op <= 7:
            n = max(start, len(dense[s]) - rnd(2 * bs))
            cache.rollback(s, n)
            dense[s] = dense[s][:n]
            log.append(f"rollback({s}, {n})")
        elif op == 8:
            before = list(cache.tables[s])
            cache.trim(s, keep)
            log.append(f"trim({s}, {keep})")
            new = [j for j, (a, b) in enumerate(zip(before, cache.tables[s])) if a is not None and b is None]
            check(all(bs * (j + 1) <= len(dense[s]) - keep for j in new), KV_TRIM_WINDOW,
                  f"step {step} ({'; '.join(log[-4:])}): trim freed a block in the window")  # fmt: skip
        else:
            cache.release(s)
            del dense[s]
            log.append(f"release({s})")
            _conserved(cache, nb, f"step {step}")
            continue
        start = sum(1 for b in cache.tables[s] if b is None) * bs
        _check_gather(cache, s, dense[s], start=start, what=f"block size {bs}, step {step} (last operations: "
                      f"{'; '.join(log[-4:])})", bug=KV_RANDOM)  # fmt: skip
        _conserved(cache, nb, f"step {step} (last operations: {'; '.join(log[-4:])})")


@test(KV, "random append / rollback / trim / release sequences over 3 sequences must always read back what a plain "
      "list would hold, and conserve the pool.", points=18, bug=KV_RANDOM)  # fmt: skip
def random_operations(mod):
    check_random(mod, torch.Generator().manual_seed(5), 40, 3, 2, 250, 4)


# =========================================================================================== paged_attention_kernel

DESCRIPTIONS["paged_attention_kernel"] = "a Triton paged-attention kernel (run by the interpreter on CPU)"
PA = "paged_attention_kernel"

PA_NOT_TRITON = "not a Triton kernel"
PA_DRESSED = "PyTorch dressed up as Triton"
PA_SHORTCUT = "library shortcut"
PA_SCALE = "softmax scale"
PA_CAUSAL = "off-by-one causal mask"
PA_NO_CAUSAL = "no causal mask"
PA_QPOS = "query position"
PA_GQA = "GQA head mapping"
PA_WINDOW = "sliding-window bound"
PA_WINDOW_IGNORED = "window ignored"
PA_TABLE = "block-table lookup"
PA_NAN = "reads freed blocks"
PA_ONLINE = "online softmax across tiles"
PA_LAYOUT = "output layout"
PA_OUTPUT = "attention output differs"
PA_NORM = "output not normalised by l"
PA_PRECISION = "low-precision accumulation"
PA_HEAD_DIM = "head-dim padding not masked"
PA_MAX_INIT = "running max initialised to 0"
PA_STRIDES = "strides assumed contiguous"

# torch functions / tensor methods that compute attention (or its pieces): forbidden outside @triton.jit code
_TORCH_MATH = {"softmax", "log_softmax", "softmin", "matmul", "mm", "bmm", "baddbmm", "addbmm", "addmm", "addmv",
               "mv", "einsum", "tensordot", "dot", "vdot", "inner", "outer", "ger", "kron", "chain_matmul",
               "scaled_dot_product_attention", "multi_head_attention_forward", "linear", "bilinear", "exp", "exp_",
               "exp2", "expm1", "logsumexp", "sigmoid", "__matmul__", "__rmatmul__", "_scaled_dot_product_attention",
               "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
               "_safe_softmax", "_softmax"}  # fmt: skip


def _jit_functions(tree, imp: _Imports) -> dict[str, ast.FunctionDef]:
    jit = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for d in node.decorator_list:
                path = imp.resolve(d.func if isinstance(d, ast.Call) else d) or ""
                if path.split(".")[0] == "triton" and path.split(".")[-1] == "jit":
                    jit[node.name] = node
    return jit


def check_triton_integrity(mod) -> None:
    """From the syntax tree: a @triton.jit kernel exists and ``paged_attention`` launches it (``kernel[grid](...)``,
    directly or through a helper it calls); no torch attention math outside the kernel (softmax, matmul / @, einsum,
    bmm, exp, scaled_dot_product_attention, torch.nn.functional ...); no torch inside the kernel."""
    _check_imports(mod, ("minimtp.errors",), PA_SHORTCUT)
    tree = ast.parse(mod.__source__)
    imp = _Imports(tree)
    for name, line in imp.modules:
        if name.split(".")[0] in ("kernels",) or name.startswith("minimtp.kernels"):
            raise Failure(PA_SHORTCUT, f"line {line}: imports {name}, the project's own kernel")
    jit = _jit_functions(tree, imp)
    check(jit, PA_NOT_TRITON, "no @triton.jit function in the file")
    funcs = {n.name: n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    check("paged_attention" in funcs, PA_NOT_TRITON, "no function paged_attention (the wrapper) in the file")
    torch_roots = {k for k, v in imp.names.items() if v.split(".")[0] in ("torch", "numpy")} | {"torch", "numpy"}

    def launches(fn, seen=()) -> bool:
        for node in ast.walk(fn):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Subscript):
                target = node.func.value
                if isinstance(target, ast.Name) and target.id in jit:
                    return True
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in funcs:
                callee = node.func.id
                if callee not in seen and callee not in jit and launches(funcs[callee], (*seen, callee)):
                    return True
        return False

    check(
        launches(funcs["paged_attention"], ("paged_attention",)),
        PA_NOT_TRITON,
        f"paged_attention never launches a @triton.jit kernel (kernel[grid](...)); kernels: {sorted(jit)}",
    )
    for fname, fn in jit.items():  # the kernel body: triton.language only
        for node in ast.walk(fn):
            if isinstance(node, ast.Name) and node.id in torch_roots:
                raise Failure(
                    PA_DRESSED,
                    f"line {node.lineno}: the @triton.jit function {fname} uses {node.id}: a "
                    "kernel is compiled for the GPU, where torch does not exist (use triton.language)",
                )
    jit_nodes = {id(n) for f in jit.values() for n in ast.walk(f)}
    for node in ast.walk(tree):  # everything outside the kernels: no attention math with torch
        if id(node) in jit_nodes:
            continue
        bad = ""
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.MatMult):
            bad = "the @ operator (a matrix product)"
        elif isinstance(node, ast.Attribute):
            path = imp.resolve(node) or ""
            root = path.split(".")[0]
            if root in ("torch", "numpy") and (
                node.attr in _TORCH_MATH
                or ".functional" in "." + path
                or path.startswith("torch.special")
                or path.startswith("torch._C")
            ):
                bad = path  # fmt: skip
            elif root not in ("torch", "numpy", "triton", "math", "tl") and node.attr in _TORCH_MATH:
                bad = f".{node.attr}() on a tensor"
        elif isinstance(node, ast.Name):
            path = imp.names.get(node.id, "")
            if path.split(".")[0] in ("torch", "numpy") and (path.split(".")[-1] in _TORCH_MATH
                                                             or ".functional" in path):  # fmt: skip
                bad = path
        if bad:
            raise Failure(PA_DRESSED, f"line {node.lineno}: {bad} outside the @triton.jit kernel: the attention "
                          "(scores, softmax, weighted sum) must be computed by the kernel; the wrapper only "
                          "allocates the output, computes the launch arguments and launches it")  # fmt: skip


# fmt: off
BUG_HINTS.update({
    PA_DRESSED: "compute the scores, the online softmax and the weighted sum of V inside the @triton.jit kernel; the "
    "wrapper only allocates, computes launch arguments and launches.",
    PA_NOT_TRITON: "define a @triton.jit kernel and launch it from paged_attention with kernel[grid](...).",
    PA_SCALE: "scores are (k . q) * scale with the `scale` argument (not 1, not 1/sqrt(head_dim) unless that is "
    "what was passed, and only once).",
    PA_CAUSAL: "query r of a sequence sits at position seq_len - q_len + r and sees keys j <= that position: an "
    "off-by-one passes decode and fails verify / prefill.",
    PA_NO_CAUSAL: "mask on absolute positions: query at position pos sees keys j <= pos only (in a verify step the "
    "drafts after it are already in the cache).",
    PA_QPOS: "the absolute position of query r is seq_len - q_len + r (the cached prefix comes first).",
    PA_GQA: "query head h reads KV head h // (Hq / Hkv): consecutive query heads share a KV head.",
    PA_WINDOW: "sliding window W: query at pos sees keys pos - W < j <= pos, i.e. W keys, from max(pos - W + 1, 0).",
    PA_WINDOW_IGNORED: "apply the window to every tile (mask j > pos - window), not only to where the loop starts.",
    PA_TABLE: "every key needs its own block: block = table[kpos // BLOCK_SIZE], slot kpos % BLOCK_SIZE.",
    PA_NAN: "mask every K/V load with the visible-key mask (other=0): masked-off lanes must not read freed blocks or "
    "block 0 through a masked table load.",
    PA_ONLINE: "online softmax across tiles: m_new = max(m, max(s)); acc and l are rescaled by exp(m - m_new) before "
    "adding the new tile.",
    PA_NORM: "the output is acc / l: divide by the softmax denominator at the end.",
    PA_PRECISION: "load q, K, V as fp32 (.to(tl.float32)) and keep m, l and acc in fp32.",
    PA_HEAD_DIM: "a head dim D that is not a power of two is padded to D_PAD: mask d < HEAD_D on every q / K / V load "
    "and on the store.",
    PA_MAX_INIT: "start the running max m at -inf: with m = 0, exp(s - m) underflows when every score is very "
    "negative and l ends at 0.",
    PA_STRIDES: "address q, out and the pools with the strides the wrapper passes (stride_kh, not HEAD_D): a view "
    "of a fused buffer is not contiguous.",
})
# fmt: on


@test(PA, "write the kernel in Triton: a @triton.jit function that paged_attention launches with kernel[grid](...); "
      "the wrapper only allocates (torch.empty...), computes the launch arguments (strides, triton.cdiv, "
      "repeat_interleave ...) and launches; all the attention math lives in the kernel.", bug=PA_DRESSED,
      gate=True)  # fmt: skip
def is_a_triton_kernel(mod):
    check_triton_integrity(mod)


def _attn_case(q_lens, seq_lens, Hq, Hkv, D, bs, seed, nan_below=None, negative=False, strided=False):
    """Random q / pool / shuffled tables. Blocks 0 and the last hold NaN and no table entry points at them (a load
    that is not masked reads block 0 through a masked table load's ``other=0``). ``nan_below[b] = p``: every table
    entry of sequence b whose block lies entirely below position p points at the last block (a block a sliding-window
    cache has freed). ``negative``: every score is very negative (q . k < -100: the running max must start at -inf).
    ``strided``: q and the pools are non-contiguous views (the wrapper must pass the real strides)."""
    g = torch.Generator().manual_seed(seed)
    B = len(seq_lens)
    nb = max(-(-L // bs) for L in seq_lens) + 1
    num_blocks = B * nb + 2
    tables = (torch.randperm(num_blocks - 2, generator=g)[: B * nb] + 1).view(B, nb).to(torch.int32)
    k = torch.randn(num_blocks, bs, Hkv, D, generator=g)
    v = torch.randn(num_blocks, bs, Hkv, D, generator=g)
    q = torch.randn(sum(q_lens), Hq, D, generator=g)
    if negative:
        q, k = 40 * q.abs(), -k.abs()
    if strided:  # the same values as views into [.., 2 * D] buffers: not the contiguous strides
        q, k, v = (torch.cat([t, torch.zeros_like(t)], -1)[..., :D] for t in (q, k, v))  # head stride 2 * D
    for t in (k, v):
        t[0], t[-1] = float("nan"), float("nan")
    if nan_below is not None:
        for b, p in enumerate(nan_below):
            tables[b, : p // bs] = num_blocks - 1
    cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    return q, k, v, tables, torch.tensor(seq_lens, dtype=torch.int32), cu


def _attn_dense(q, k_cache, v_cache, tables, seq_lens, cu_q_lens, window, scale, shift=0, causal=True,
                head_map="group", win_shift=0, use_table=True, pos_from_zero=False,
                normalise=True, tile_table=0) -> torch.Tensor:  # fmt: skip
    """Attention in float64, straight from the definition, with switches that reproduce the classic mistakes."""
    T, Hq, D = q.shape
    bs, Hkv = k_cache.shape[1], k_cache.shape[2]
    out = torch.zeros(T, Hq, D, dtype=torch.float64)
    heads = torch.arange(Hq)
    kh = {"group": heads // (Hq // Hkv), "mod": heads % Hkv, "zero": heads * 0, "last": heads * 0 + Hkv - 1}[head_map]
    cu = cu_q_lens.tolist()
    for b, L in enumerate(seq_lens.tolist()):
        ql = cu[b + 1] - cu[b]
        kpos = torch.arange(L)
        blocks = tables[b].long()[kpos // bs] if use_table else kpos // bs
        if tile_table:  # every key of a tile read through the table entry of the tile's first key
            blocks = tables[b].long()[(kpos // tile_table * tile_table) // bs]
        K = k_cache[blocks, kpos % bs].double()[:, kh]  # [L, Hq, D]
        V = v_cache[blocks, kpos % bs].double()[:, kh]
        for r in range(ql):
            pos = (r if pos_from_zero else L - ql + r) + shift
            vis = kpos <= pos if causal else torch.ones(L, dtype=torch.bool)
            if window > 0:
                vis = vis & (kpos > pos - window - win_shift)
            if not bool(vis.any()):
                out[cu[b] + r] = float("nan")
                continue
            s = torch.einsum("nhd,hd->hn", K[vis], q[cu[b] + r].double()) * scale
            w = torch.softmax(s, -1) if normalise else torch.exp(s - s.amax(-1, keepdim=True))
            out[cu[b] + r] = torch.einsum("hn,nhd->hd", w, V[vis])
    return out


def _attn_diagnose(got, args, window, scale, q_lens, seq_lens, Hq, Hkv, want, nan_window) -> tuple[str, str]:
    """Name the bug class: the first classic mistake whose output the kernel reproduces, else a heuristic."""
    D = args[0].shape[-1]
    if bool(torch.isnan(got).any()):
        r = int(torch.isnan(got).any(-1).any(-1).nonzero()[0, 0])
        for bug, why, kw in [
            (PA_WINDOW, f"the output (NaN included) is attention with a window of {window + 1} keys instead of "
             f"{window}: the extra key lies in a freed block", dict(win_shift=1)),
            (PA_WINDOW_IGNORED, "the output (NaN included) is full causal attention: the window was ignored and "
             "freed blocks were read", dict(window=0)),
        ]:  # fmt: skip
            if not window:
                continue
            alt = _attn_dense(*args, kw.get("window", window), scale, win_shift=kw.get("win_shift", 0))
            same_nan = bool((torch.isnan(got) == torch.isnan(alt)).all())
            if same_nan and float((got.double() - alt).nan_to_num(0.0).abs().max()) <= 1e-3:
                return bug, why
        if not nan_window and D & (D - 1):
            return PA_HEAD_DIM, (f"NaN in the output from query row {r}, with head dim {D} (padded to a power of two) "
                                 "and no freed block in this case: the loads read past the head dim (mask d < HEAD_D "
                                 "on every load and store)")  # fmt: skip
        return PA_NAN, (f"NaN in the output from query row {r}: the kernel loaded K/V outside the visible keys "
                        "(freed blocks of a sliding window hold garbage: mask every load)")  # fmt: skip
    variants = []
    if scale != 1.0:
        variants.append((PA_SCALE, "the output is attention with scale 1: the scores were not multiplied by `scale`",
                         dict(scale=1.0)))  # fmt: skip
    if abs(scale - D**-0.5) > 1e-9:
        variants.append((PA_SCALE, f"the output is attention with scale 1/sqrt(head_dim) = {D**-0.5:.4f} instead of "
                         f"the `scale` argument {scale:g}", dict(scale=D**-0.5)))  # fmt: skip
    variants += [
        (PA_SCALE, f"the output is attention with scale {scale:g}^2: the scale was applied twice",
         dict(scale=scale * scale)),
        (PA_CAUSAL, "the output is attention where each query also sees the key right after it (pos + 1)",
         dict(shift=1)),
        (PA_CAUSAL, "the output is attention where each query misses its own key (pos - 1)", dict(shift=-1)),
        (PA_NO_CAUSAL, "the output is attention without a causal mask: queries see the keys of later drafts",
         dict(causal=False)),
        (PA_QPOS, "the output is attention with the query at position r (its index in the sequence's queries) "
         "instead of seq_len - q_len + r", dict(pos_from_zero=True)),
        (PA_GQA, f"the output is attention with kv_head = h % {Hkv} instead of h // {Hq // Hkv}",
         dict(head_map="mod")),
        (PA_GQA, "the output is attention where every query head reads KV head 0", dict(head_map="zero")),
        (PA_GQA, f"the output is attention where every query head reads KV head {Hkv - 1}", dict(head_map="last")),
        (PA_WINDOW, f"the output is attention with a window of {window + 1} keys instead of {window}",
         dict(win_shift=1)),
        (PA_WINDOW, f"the output is attention with a window of {window - 1} keys instead of {window}",
         dict(win_shift=-1)),
        (PA_WINDOW_IGNORED, "the output is full causal attention: the window was ignored", dict(window=0)),
        (PA_TABLE, "the output is attention over physical block j = logical block j: the block table was not read",
         dict(use_table=False)),
        (PA_TABLE, "the output is attention where each tile of 16 keys reads all its keys through the table entry of "
         "its first key: every key needs its own lookup table[kpos // block_size]", dict(tile_table=16)),
        (PA_NORM, "the output is the softmax numerator: acc was not divided by the denominator l",
         dict(normalise=False)),
    ]  # fmt: skip
    for bug, why, kw in variants:
        if (
            kw.get("win_shift")
            and not window
            or (kw.get("head_map") and Hq == Hkv)
            or kw.get("window") == 0
            and (not window)
        ):
            continue
        a = dict(window=window, scale=scale)
        a.update({k: kw[k] for k in ("window", "scale") if k in kw})
        alt = _attn_dense(*args, a["window"], a["scale"], **{k: v for k, v in kw.items() if k not in a})
        if bool(torch.isnan(alt).any()) != bool(torch.isnan(got).any()):
            continue
        diff = (got.double() - alt).nan_to_num(0.0).abs().max()
        if float(diff) <= 1e-3 and not bool((torch.isnan(got) != torch.isnan(alt)).any()):
            return bug, why
    if bool(torch.isnan(got).any()):
        r = int(torch.isnan(got).any(-1).any(-1).nonzero()[0, 0])
        return PA_NAN, (f"NaN in the output from query row {r}: the kernel loaded K/V outside the visible keys "
                        "(freed blocks of a sliding window hold garbage: mask every load)")  # fmt: skip
    err = (got.double() - want.double()).abs().amax(-1)  # [T, Hq]
    nkeys = []
    cu = [0, *torch.tensor(q_lens).cumsum(0).tolist()]
    for b, L in enumerate(seq_lens):
        for r in range(q_lens[b]):
            pos = L - q_lens[b] + r
            nkeys.append(pos + 1 - (max(0, pos - window + 1) if window > 0 else 0))
    bad_rows = [i for i in range(len(nkeys)) if float(err[i].max()) > 1e-4]
    near_start = [i for i in range(len(nkeys)) if window > 0 and nkeys[i] < window]  # pos - window + 1 < 0
    if bad_rows and set(bad_rows) <= set(near_start):
        return PA_WINDOW, (f"only queries closer than the window ({window}) to the start of their sequence are wrong "
                           f"(rows {bad_rows}): clamp the window start at 0, max(pos - window + 1, 0)")  # fmt: skip
    good_rows = [i for i in range(len(nkeys)) if i not in bad_rows]
    if bad_rows and good_rows and min(nkeys[i] for i in bad_rows) > max(nkeys[i] for i in good_rows):
        return PA_ONLINE, (f"rows that see <= {max(nkeys[i] for i in good_rows)} keys are right, every row that "
                           f"sees more ({min(nkeys[i] for i in bad_rows)}+) is wrong: the running max / denominator "
                           "across tiles (rescale acc and l by exp(m_old - m_new))")  # fmt: skip
    wrong_heads = [h for h in range(Hq) if float(err[:, h].max()) > 1e-4]
    if Hq != Hkv and 0 < len(wrong_heads) < Hq:
        return PA_GQA, f"query heads {wrong_heads} are wrong and the others right: check kv_head = h // (Hq / Hkv)"
    del cu
    if D & (D - 1):
        return PA_HEAD_DIM, (f"wrong rows with head dim {D}, which is padded to a power of two: the padding lanes "
                             "must be masked on every load and store (d < HEAD_D)")  # fmt: skip
    if float(err.max()) < 0.05:
        return PA_PRECISION, (f"every row is close but not within 1e-4 (max error {float(err.max()):.1e}): load K/V "
                              "and q as fp32 and keep m, l and acc in fp32")  # fmt: skip
    return PA_OUTPUT, "no classic mistake reproduces it"


class _TorchCalls(torch.overrides.TorchFunctionMode):
    """Records the torch functions called while it is active (the runtime half of the integrity check)."""

    def __init__(self):
        super().__init__()
        self.names: set[str] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.names.add(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))


def _attn_ok(mod, args, window, scale, want) -> bool:
    got = torch.as_tensor(mod.paged_attention(*args, window=window, scale=scale))
    return tuple(got.shape) == tuple(want.shape) and bool(((got - want).abs() <= 1e-4).all())


def check_attention(mod, name, q_lens, seq_lens, Hq, Hkv, D, bs, window, scale, nan_window=False, seed=None,
                    negative=False, strided=False) -> None:  # fmt: skip
    from minimtp.attention import paged_attention as reference

    nan_below = None
    if nan_window:  # positions below the first query's window start are never visible to anyone
        nan_below = [max(0, L - ql - window + 1) for L, ql in zip(seq_lens, q_lens)]
    args = _attn_case(q_lens, seq_lens, Hq, Hkv, D, bs, seed=len(name) if seed is None else seed, nan_below=nan_below,
                      negative=negative, strided=strided)  # fmt: skip
    want = reference(*args, window=window, scale=scale)
    calls = _TorchCalls()
    with calls:
        got = mod.paged_attention(*(args if strided else [a.clone() for a in args]), window=window, scale=scale)
    math_ops = sorted(calls.names & _TORCH_MATH)
    check(not math_ops, PA_DRESSED, f"paged_attention called torch {math_ops} at run time: the attention must be "
          "computed by the Triton kernel")  # fmt: skip
    got = torch.as_tensor(got)
    case = (f"q_lens {q_lens}, seq_lens {seq_lens}, Hq:Hkv {Hq}:{Hkv}, head dim {D}, block size {bs}, window "
            f"{window}, scale {scale:g}" + (", every score < -100" if negative else "")
            + (", non-contiguous q / K / V" if strided else ""))  # fmt: skip
    check(tuple(got.shape) == tuple(want.shape), PA_LAYOUT,
          f"{case}: output shape {tuple(got.shape)}, expected {tuple(want.shape)}")  # fmt: skip
    bad = torch.isnan(got) | ((got - want).abs() > 1e-4)
    if not bool(bad.any()):
        return
    if negative and not bool(torch.isfinite(got).all()):  # the same case with ordinary scores passed just before
        bug, why = PA_MAX_INIT, ("only the case where every score is very negative fails: exp(s - m) underflows to 0 "
                                 "when the running max m starts at 0; start it at -inf")  # fmt: skip
    elif strided and _attn_ok(mod, [a.contiguous() for a in args], window, scale, want):
        bug, why = PA_STRIDES, ("only the case with non-contiguous q / K / V fails: pass q.stride(), k_cache.stride() "
                                "... to the kernel instead of assuming a contiguous layout")  # fmt: skip
    else:
        bug, why = _attn_diagnose(got, args, window, scale, q_lens, seq_lens, Hq, Hkv, want, nan_window)
    err = (got.double() - want.double()).abs().nan_to_num(float("inf")).amax(dim=(0, 2))
    group = Hq // Hkv
    heads = ", ".join(f"h{h}->kv{h // group}: {float(e):.1e}" for h, e in enumerate(err))
    row = int(bad.any(-1).any(-1).nonzero()[0, 0])
    cu = [0, *torch.tensor(q_lens).cumsum(0).tolist()]
    b = max(i for i in range(len(q_lens)) if cu[i] <= row)
    r = row - cu[b]
    raise Failure(bug, f"{case}: {why}.\nmax error per query head (head -> its KV head): {heads}\nfirst wrong query: "
                  f"row {row} = sequence {b}, query {r} of {q_lens[b]}, absolute position "
                  f"{seq_lens[b] - q_lens[b] + r} (seq_len {seq_lens[b]})")  # fmt: skip


def _attn_test(name, q_lens, seq_lens, Hq, Hkv, D, bs, window, scale, nan_window=False, hint="", points=0,
               extra=()):  # fmt: skip
    def fn(mod):
        check_attention(mod, name, q_lens, seq_lens, Hq, Hkv, D, bs, window, scale, nan_window)
        for kw in extra:  # more cases of the same invariant
            check_attention(mod, name + str(sorted(kw)), **{**dict(q_lens=q_lens, seq_lens=seq_lens, Hq=Hq, Hkv=Hkv,
                            D=D, bs=bs, window=window, scale=scale, nan_window=nan_window), **kw})  # fmt: skip

    fn.__name__ = "kernel: " + name
    TESTS.setdefault(PA, []).append(Test(fn.__name__, fn, hint, points=points, bug=PA_OUTPUT))


_MASK = ("query r of a sequence with seq_len keys and q_len queries sits at position seq_len - q_len + r and sees "
         "keys j <= that position (and j > position - window). An off-by-one here passes decode (q_len = 1) and "
         "fails verify/prefill, where queries must not see the keys of the drafts after them; the scores are "
         "(k . q) * scale.")  # fmt: skip
_attn_test("decode (q_len 1), GQA 4:2", [1, 1], [5, 19], 4, 2, 8, 4, 0, 1.0, points=12,
           extra=[dict(negative=True), dict(strided=True)],
           hint="decode: one query per sequence at position seq_len - 1 sees every key; check the online softmax "
           "(running max m, denominator l, rescale by exp(m_old - m_new)), the block-table lookup and the KV head "
           "h // (Hq / Hkv).")  # fmt: skip
_attn_test("verify (q_len 3), scale 0.5", [3, 3], [7, 12], 4, 2, 8, 4, 0, 0.5, hint=_MASK, points=14)
_attn_test("prefill + decode + short prompt", [6, 1, 2], [6, 9, 2], 4, 1, 16, 4, 0, 1.0, hint=_MASK, points=14)
_WINDOW = (
    "sliding window W: query i sees keys i-W < j <= i. Never load K/V outside that range (mask the loads or start "
    "the loop at the window): a sliding cache frees old blocks, their table entries are garbage."
)
_attn_test("sliding window 4, freed blocks hold NaN", [3, 1], [14, 11], 4, 2, 8, 4, 4, 1.0, True, _WINDOW, points=14)
_attn_test("GQA 8:1, head dim 12, scale 0.3, 40 keys (several tiles)", [2, 1], [40, 23], 8, 1, 12, 4, 0, 0.3,
           hint="query head h reads KV head h // (Hq / Hkv); a head dim that is not a power of two is padded to "
           "D_PAD: mask the padding on every load and store; scores are (k . q) * scale; the online softmax "
           "must rescale across tiles.", points=14)  # fmt: skip
_attn_test("block size 8, window 5, 61 keys, freed blocks hold NaN", [2, 3, 3], [61, 30, 3], 4, 2, 8, 8, 5, 0.7, True,
           _WINDOW, points=12)  # fmt: skip


# =========================================================================================== distil_drafter

DESCRIPTIONS["distil_drafter"] = "distil a drafter that reaches a target acceptance rate"
DD = "distil_drafter"
MIN_ALPHA1, MIN_ALPHA2 = 0.6, 0.58  # untrained drafter: 0.39 / 0.39; reference solution: 0.67 / 0.66

DD_SHORTCUT = "library shortcut"
DD_LOSS = "loss does not match the definition"
DD_REVERSE_KL = "reverse KL"
DD_FORWARD_KL = "KL instead of cross-entropy"
DD_LABEL = "label off by one"
DD_LABEL_BACK = "label off by one (one row early)"
DD_HARD = "hard labels"
DD_TOKEN = "input token not advanced"
DD_TOKEN_SHIFT = "input token off by one"
DD_HIDDEN = "teacher hidden state at later steps"
DD_SUM = "steps summed, not averaged"
DD_POSITIONS = "invalid positions averaged"
DD_GRAD = "gradient differs from the reference"
DD_CONTEXT = "drafter sees K/V at its own position"
DD_HIDDEN0 = "wrong hidden state for step 1"
DD_VOCAB = "mean over the vocabulary"
DD_DETACHED = "detached graph"
DD_FROZEN = "target not frozen"
DD_ACCEPT = "acceptance too low"
DD_TRAIN = "train() worse than the given loop"


# fmt: off
BUG_HINTS.update({
    DD_REVERSE_KL: "the loss is the cross-entropy with the TARGET's probabilities, -sum_x p(x) log q(x) (forward, "
    "mass-covering); KL(q || p) is mode-seeking and trains a drafter that p accepts less often.",
    DD_FORWARD_KL: "use the cross-entropy -sum p log q (it differs from KL(p || q) by the target's entropy).",
    DD_LABEL: "step j at position p is scored against teacher row p + j - 1 (the distribution of token p + j).",
    DD_LABEL_BACK: "step j at position p is scored against teacher row p + j - 1.",
    DD_HARD: "the labels are the target's full distributions (teacher rows), not the sampled tokens.",
    DD_TOKEN: "step j at position p reads the embedding of token x[p + j - 1]: the input advances with j.",
    DD_TOKEN_SHIFT: "step j at position p reads token x[p + j - 1] (step 1 reads x[p]).",
    DD_HIDDEN: "step j > 1 reads the drafter's own previous hidden output, as at inference.",
    DD_SUM: "average the per-step losses over j = 1..k.",
    DD_POSITIONS: "average over the valid positions only: p >= 1 and p + j - 1 <= S - 1.",
    DD_CONTEXT: "the drafter at position p sees the target's K/V at positions < p (DraftDenseContext with qpos = p).",
    DD_HIDDEN0: "step 1 at position p reads the target's final hidden state at p - 1 (zeros at p = 0).",
    DD_VOCAB: "the cross-entropy SUMS over the vocabulary: -sum_x p(x) log q(x).",
    DD_DETACHED: "keep the graph: no .detach(), .item(), torch.no_grad() or re-wrapped hidden state between steps "
    "(the target's outputs may be detached, the drafter's may not).",
    DD_TRAIN: "train() may change the hyper-parameters but must train as well as the given loop: zero the "
    "gradients every step (opt.zero_grad()), train every draft step (k >= 2), step the optimizer.",
    DD_FROZEN: "compute the target's outputs under torch.no_grad() (teacher() does) and never pass its parameters to "
    "the optimizer.",
})
# fmt: on


@test(DD, "write the loss yourself: import nothing from minimtp but minimtp.attention (DraftDenseContext), "
      "minimtp.sampling and minimtp.errors (minimtp.train is the answer); no dynamic imports.", bug=DD_SHORTCUT,
      gate=True)  # fmt: skip
def no_library_loss(mod):
    _check_imports(mod, ("minimtp.attention", "minimtp.sampling", "minimtp.errors"), DD_SHORTCUT)


_SETUP: dict = {}


def _distil_setup():
    """The frozen target (tutorial 09's), the data sampled from it (train: 48 sequences, held out: 16; S = 16)."""
    if not _SETUP:
        from _tiny import tiny_target

        import minimtp

        target = tiny_target(seed=0, mix=0.5).requires_grad_(False)
        engine = minimtp.Engine(target)
        g = torch.Generator().manual_seed(0)

        def batch(n, seed):
            starts = [[int(t)] for t in torch.randint(2, target.config.vocab_size, (n,), generator=g)]
            res = engine.generate(starts, max_new_tokens=15, temperature=1.0, seed=seed, stop_token_ids=[])
            return torch.tensor([a + b for a, b in zip(starts, res.tokens)])

        _SETUP.update(target=target, engine=engine, batch=batch, train=batch(48, 1), heldout=batch(16, 2))
    return _SETUP


def _fresh_drafter(seed=3):
    from _tiny import tiny_assistant

    return tiny_assistant(_distil_setup()["target"], seed=seed, correlate=False)


def _reference_loss(target, drafter, x, k) -> torch.Tensor:
    """The definition of distill_loss, from the library (minimtp.train.distill, in float32)."""
    from minimtp.train.distill import distill_loss

    return distill_loss(target, drafter, x, k, dtype="fp32")[0]


# The classic mistakes: name -> what the loss then is. The hidden suite computes each one (LOSS_VARIANT, set when it
# is loaded); the public suite's fixed inputs (train[:4], drafter seed 3, k = 1, 2, 3) have their values stored here.
_LOSS_MISTAKES = {
    DD_REVERSE_KL: "the loss equals KL(q || p) (reverse KL: mode-seeking, the wrong direction)",
    DD_FORWARD_KL: "the loss equals KL(p || q) = CE - H(p): same gradient, but the definition is the CE",
    DD_LABEL: "the loss equals the one with labels one row late (teacher row p + j instead of p + j - 1)",
    DD_LABEL_BACK: "the loss equals the one with labels one row early (teacher row p + j - 2)",
    DD_HARD: "the loss equals the CE with the sampled next token x[p + j] (hard labels) instead of the target's "
    "distribution",
    DD_TOKEN: "the loss equals the one where every step reads token x[p] (the input does not advance with j)",
    DD_TOKEN_SHIFT: "the loss equals the one where step j reads token x[p + j] instead of x[p + j - 1]",
    DD_HIDDEN: "the loss equals the one where later steps read the TARGET's hidden state, not the drafter's own "
    "previous output (that is not what the drafter sees at inference)",
    DD_SUM: "the loss equals the SUM over draft steps (the definition averages them)",
    DD_POSITIONS: "the loss equals the mean over ALL positions (p = 0 and positions past the end included)",
    DD_CONTEXT: "the loss equals the one where the drafter at position p also sees the target's K/V at p (it must "
    "see positions < p only: at inference the target has not run at p yet)",
    DD_HIDDEN0: "the loss equals the one where step 1 at position p reads the target's hidden state at p instead of "
    "p - 1",
    DD_VOCAB: "the loss equals the cross-entropy averaged over the vocabulary instead of summed",
}
PUBLIC_LOSS_KS = (1, 2, 3)
PUBLIC_LOSS_TABLE = {  # the mistakes' losses on the public inputs (torch 2.13, float32; matched within 1e-4 rel)
    DD_REVERSE_KL: (1.524647, 1.526862, 1.530615),
    DD_FORWARD_KL: (1.338099, 1.348701, 1.349168),
    DD_LABEL: (4.313548, 4.294853, 4.298161),
    DD_LABEL_BACK: (4.261546, 4.268362, 4.266983),
    DD_HARD: (4.338929, 4.368632, 4.392801),
    DD_TOKEN: (4.300202, 4.287729, 4.301416),
    DD_TOKEN_SHIFT: (4.261456, 4.265841, 4.272676),
    DD_HIDDEN: (4.300202, 4.317044, 4.315216),
    DD_SUM: (4.300202, 8.641115, 12.96666),
    DD_POSITIONS: (4.305463, 4.326161, 4.324031),
    DD_CONTEXT: (4.275165, 4.285819, 4.304586),
    DD_HIDDEN0: (4.27932, 4.308156, 4.315799),
    DD_VOCAB: (0.067191, 0.067509, 0.067535),
}
LOSS_VARIANT: Callable | None = None  # fn(target, drafter, x, k, mistake name) -> that mistake's loss (hidden suite)


def _public_loss_inputs():
    return _distil_setup()["train"][:4], 3


def _mistake(losses: dict[int, float], x, drafter_seed: int) -> tuple[str, str]:
    """The classic mistake whose loss equals the file's for every k, else (DD_LOSS, ...)."""
    close = lambda a, b: abs(a - b) <= 1e-4 * abs(b)
    px, pseed = _public_loss_inputs()
    public = drafter_seed == pseed and x.shape == px.shape and torch.equal(x, px)
    for name, text in _LOSS_MISTAKES.items():
        if public and set(losses) <= set(PUBLIC_LOSS_KS):
            vals = dict(zip(PUBLIC_LOSS_KS, PUBLIC_LOSS_TABLE[name]))
        elif LOSS_VARIANT is not None:
            drafter = _fresh_drafter(drafter_seed)
            with torch.no_grad():
                vals = {k: float(LOSS_VARIANT(_distil_setup()["target"], drafter, x, k, name)) for k in losses}
        else:
            break
        if all(close(losses[k], vals[k]) for k in losses):
            return name, text
    return DD_LOSS, "no classic mistake reproduces it"


def check_loss_value(mod, x: torch.Tensor, ks: tuple[int, ...], drafter_seed: int) -> None:
    st = _distil_setup()
    target = st["target"]
    drafter = _fresh_drafter(drafter_seed)
    got = {}
    with torch.no_grad():
        for k in ks:
            loss = mod.distill_loss(target, drafter, x, mod.teacher(target, x), k)
            check(torch.is_tensor(loss) and loss.dim() == 0, DD_LOSS, "distill_loss must return a scalar tensor")
            got[k] = float(loss)
    for k in ks:
        with torch.no_grad():
            w = float(_reference_loss(target, drafter, x, k))
        if abs(got[k] - w) <= 1e-4 * abs(w):
            continue
        bug, why = _mistake(got, x, drafter_seed)
        raise Failure(bug, f"batch of {x.shape[0]} sequences of {x.shape[1]} tokens, k = {k}: loss {got[k]:.6f}, "
                      f"the definition gives {w:.6f}: {why}")  # fmt: skip


@test(DD, "distill_loss: step j at position p reads token x[p+j-1] (step 1 with the target's hidden state at p-1, "
      "later steps with the previous step's hidden output), runs at position p (K/V < p) and is scored with the "
      "cross-entropy -sum p log q against the target's distribution of token p+j = teacher row p+j-1; average over "
      "p >= 1 with p+j-1 <= S-1, then over j.", points=20, bug=DD_LOSS)  # fmt: skip
def loss_matches_definition(mod):
    x, seed = _public_loss_inputs()
    check_loss_value(mod, x, PUBLIC_LOSS_KS, seed)


def check_loss_gradient(mod, x: torch.Tensor, k: int, drafter_seed: int) -> None:
    """The gradient of the loss w.r.t. every drafter parameter must be the reference's (relative error <= 1e-3)."""
    import copy

    st = _distil_setup()
    target = st["target"]
    d_ref = _fresh_drafter(drafter_seed).train()
    d_got = copy.deepcopy(d_ref)
    loss = mod.distill_loss(target, d_got, x, mod.teacher(target, x), k)
    check(
        torch.is_tensor(loss) and loss.requires_grad,
        DD_DETACHED,
        "the loss does not depend on the drafter's parameters (no grad_fn): do not detach, do not use no_grad",
    )
    loss.backward()
    _reference_loss(target, d_ref, x, k).backward()
    check(all(p.grad is None for p in target.parameters()), DD_FROZEN, "the target received gradients: keep it frozen")
    worst = (0.0, "")
    for (name, p_ref), p_got in zip(d_ref.named_parameters(), d_got.parameters()):
        if p_ref.grad is None:
            continue
        ref_norm = float(p_ref.grad.norm())
        if p_got.grad is None:
            worst = max(worst, (float("inf"), name))
            continue
        rel = float((p_got.grad - p_ref.grad).norm()) / max(ref_norm, 1e-12)
        worst = max(worst, (rel, name))
    if worst[0] <= 1e-3:
        return
    with torch.no_grad():
        g, w = float(loss.detach()), float(_reference_loss(target, d_ref, x, k))
    bug, why = (
        (
            DD_DETACHED,
            "the loss value is right, so part of the graph was cut (a .detach(), .item(), no_grad or "
            "a hidden state re-wrapped between steps)",
        )
        if abs(g - w) <= 1e-4 * abs(w)
        else (DD_GRAD, "")
    )
    if bug == DD_GRAD:  # the value differs too: name the mistake on the loss test's inputs
        px, pseed = _public_loss_inputs()
        with torch.no_grad():
            d = _fresh_drafter(pseed)
            losses = {kk: float(mod.distill_loss(target, d, px, mod.teacher(target, px), kk)) for kk in PUBLIC_LOSS_KS}
        bug, why = _mistake(losses, px, pseed)
        bug, why = (DD_GRAD, "") if bug == DD_LOSS else (bug, why)
    grad_state = "no gradient" if worst[0] == float("inf") else f"relative error {worst[0]:.2e}"
    raise Failure(bug, f"k = {k}: the gradient of {worst[1]} differs from the reference's ({grad_state})"
                  + (f": {why}" if why else ""))  # fmt: skip


@test(DD, "the gradient of your loss w.r.t. the drafter's parameters must be the reference loss's: the same "
      "divergence (CE with the target's probabilities, not KL(q || p)), nothing detached between steps, the target "
      "frozen.", points=15, bug=DD_GRAD)  # fmt: skip
def loss_gradient_matches_reference(mod):
    check_loss_gradient(mod, _distil_setup()["train"][4:8], 2, 5)


@test(DD, "the loss must be differentiable w.r.t. the drafter's parameters (do not detach the drafter's logits or "
      "hidden states; DO keep the target frozen).", points=5, bug=DD_DETACHED)  # fmt: skip
def loss_has_gradients(mod):
    st = _distil_setup()
    target, x = st["target"], st["train"][:4]
    drafter = _fresh_drafter()
    drafter.train()
    loss = mod.distill_loss(target, drafter, x, mod.teacher(target, x), 2)
    check(torch.is_tensor(loss) and loss.requires_grad, DD_DETACHED, "the loss has no grad_fn")
    loss.backward()
    g1 = drafter.pre_projection.weight.grad
    check(g1 is not None and bool(torch.isfinite(g1).all()) and float(g1.abs().sum()) > 0, DD_DETACHED,
          "no gradient reached the drafter's pre-projection W_pre")  # fmt: skip
    check(all(p.grad is None for p in target.parameters()), DD_FROZEN, "the target received gradients: keep it frozen")


class _StepRecorder:
    """Stands for the drafter in the library's distill_loss and records the logits of every draft step."""

    def __init__(self, drafter):
        self.drafter, self.config, self.logits = drafter, drafter.config, []

    def step(self, *args):
        z, h = self.drafter.step(*args)
        self.logits.append(z)
        return z, h


@torch.no_grad()
def _alphas(target, drafter, x) -> tuple[float, float]:
    """Exact acceptance of sampled drafts at temperature 1, E[sum_x min(p, q)], for draft steps 1 and 2
    (teacher-forced, as in the library's distill_loss: step 2 reads the true next token and step 1's hidden state),
    over all valid positions (p >= 1, p + j - 1 <= S - 1)."""
    from minimtp.train.distill import distill_loss

    B, S = x.shape
    rec = _StepRecorder(drafter)
    distill_loss(target, rec, x, 2, dtype="fp32")
    p_all = torch.softmax(target.forward_with_kv(x)[0].float(), -1)  # row i: the distribution of token i + 1
    out = []
    for j, z in enumerate(rec.logits, start=1):
        rows = torch.arange(S) + j - 1
        keep = ((torch.arange(S) >= 1) & (rows <= S - 1)).repeat(B)
        p = p_all[:, rows.clamp(max=S - 1)].reshape(B * S, -1)[keep]
        out.append(float(torch.minimum(p, torch.softmax(z.float(), -1)[keep]).sum(-1).mean()))
    return out[0], out[1]


def check_acceptance_after_training(mod, heldout: torch.Tensor, drafter_seed: int = 3) -> str:
    st = _distil_setup()
    target = st["target"]
    drafter = _fresh_drafter(drafter_seed)
    before = _alphas(target, drafter, heldout)
    t0 = time.perf_counter()
    trained = mod.train(target, drafter, st["train"].clone())
    drafter = trained if trained is not None else drafter
    dt = time.perf_counter() - t0
    a1, a2 = _alphas(target, drafter.eval(), heldout)
    vars(mod).setdefault("__grader_trained__", {})[id(heldout)] = (a1, a2)
    info = f"alpha_1 {before[0]:.3f} -> {a1:.3f}, alpha_2 {before[1]:.3f} -> {a2:.3f}, training {dt:.1f}s"
    check(a1 >= MIN_ALPHA1 and a2 >= MIN_ALPHA2, DD_ACCEPT,
          f"{info}: need alpha_1 >= {MIN_ALPHA1} and alpha_2 >= {MIN_ALPHA2}")  # fmt: skip
    return info


@test(DD, f"after train(), exact acceptance (sampled drafts, T = 1) on held-out target samples must reach "
      f"alpha_1 >= {MIN_ALPHA1} (draft step 1) and alpha_2 >= {MIN_ALPHA2} (step 2). Check the loss first; then "
      "steps, learning rate and batch size.", points=30, bug=DD_ACCEPT)  # fmt: skip
def acceptance_after_training(mod):
    return check_acceptance_after_training(mod, _distil_setup()["heldout"])


TRAIN_SLACK = 0.01  # the acceptance train() may lose against the given loop


def _given_train(mod, target, drafter, data, steps=150, batch=16, lr=3e-3, k=2):
    """The skeleton's train() (given to every student), run with the file's own teacher() and distill_loss()."""
    g = torch.Generator().manual_seed(0)
    teach = mod.teacher(target, data)
    opt = torch.optim.Adam(drafter.parameters(), lr=lr)
    drafter.train()
    for _ in range(steps):
        idx = torch.randint(0, data.shape[0], (batch,), generator=g)
        t_prob, t_hidden, kv = teach
        rows = (t_prob[idx], t_hidden[idx], {t: (kk[idx], vv[idx]) for t, (kk, vv) in kv.items()})
        loss = mod.distill_loss(target, drafter, data[idx], rows, k)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return drafter.eval()


def check_train_vs_given(mod, heldout: torch.Tensor, drafter_seed: int = 3) -> str:
    """train() may change the hyper-parameters, but must do at least as well as the given loop with the same loss:
    a training loop that never zeroes the gradients, or trains draft step 1 only, falls short."""
    st = _distil_setup()
    target = st["target"]
    trained = vars(mod).get("__grader_trained__", {})  # what the acceptance test measured on this held-out set
    if id(heldout) not in trained:
        with contextlib.suppress(Failure):
            check_acceptance_after_training(mod, heldout, drafter_seed)
    a1, a2 = vars(mod)["__grader_trained__"][id(heldout)]
    g1, g2 = _alphas(target, _given_train(mod, target, _fresh_drafter(drafter_seed), st["train"].clone()), heldout)
    info = f"your train(): alpha_1 {a1:.3f}, alpha_2 {a2:.3f}; the given loop with your loss: {g1:.3f}, {g2:.3f}"
    check(a1 >= g1 - TRAIN_SLACK and a2 >= g2 - TRAIN_SLACK, DD_TRAIN,
          f"{info}: train() must reach at least the given loop's acceptance (minus {TRAIN_SLACK}) on every draft "
          "step")  # fmt: skip
    return info


@test(DD, "train() may change the steps, learning rate or batch size, but must train every draft step as well as "
      "the given loop does with your loss (zero the gradients every step, call distill_loss with k >= 2, step the "
      "optimizer).", points=10, bug=DD_TRAIN)  # fmt: skip
def train_as_good_as_the_given_loop(mod):
    return check_train_vs_given(mod, _distil_setup()["heldout"])


# ------------------------------------------------------------------------------------------------ main


def points_table(assignment: str) -> str:
    lines = [f"{assignment}: {DESCRIPTIONS.get(assignment, '')}"]
    for suite in ("public", "hidden"):
        if suite == "hidden" and not load_hidden():
            lines.append("  hidden suite: not in this copy (instructors only)")
            continue
        tests = suite_tests(assignment, suite)
        lines.append(f"  {suite} suite:")
        for t in tests:
            pts = "gate (a failure scores the file 0)" if t.gate else (
                f"{t.points:3d}" + ("  (advisory)" if not t.required else ""))  # fmt: skip
            lines.append(f"    {t.name:64s} {pts}")
        n = sum(t.chi2 for t in tests)
        lines.append(f"    {'total':64s} {sum(t.points for t in tests):3d}")
        if n:
            lines.append(f"    {n} χ² tests at α = {ALPHA:g}: a correct solution fails this suite with probability "
                         f"at most {n} × {ALPHA:g} = {n * ALPHA:.1e}")  # fmt: skip
    lines.append("  with --hidden the score is the mean of the two suites (each test counts half its points)")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Grade an assignment with the project's property tests.")
    ap.add_argument("assignment", nargs="?", help="assignment name (--list shows them)")
    ap.add_argument("file", nargs="?", help="the student file to grade")
    ap.add_argument("--list", action="store_true", help="list the assignments")
    ap.add_argument("--points", metavar="ASSIGNMENT", nargs="?", const="", help="print the points of every test")
    ap.add_argument("-x", "--fail-fast", action="store_true", help="stop at the first failing test")
    ap.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, metavar="S",
                    help=f"time limit of each test in seconds (default {DEFAULT_TIMEOUT:g}; 0: none)")  # fmt: skip
    ap.add_argument("--json", metavar="FILE", help="also write Gradescope's results.json to FILE ('-': stdout, "
                    "the report then goes to stderr)")  # fmt: skip
    ap.add_argument("--hidden", metavar="SECRET", help=f"run the hidden suite too, seeded from SECRET (default: "
                    f"${SECRET_ENV}; instructors only)")  # fmt: skip
    ap.add_argument("--suite", choices=("public", "hidden", "both"), help="which suites to run (default: public, "
                    "or both with a secret)")  # fmt: skip
    args = ap.parse_args(argv)
    if args.points is not None:
        names = [args.points or args.assignment] if (args.points or args.assignment) else list(TESTS)
        for name in names:
            if name not in TESTS:
                print(f"unknown assignment {name!r}; expected one of {sorted(TESTS)}", file=sys.stderr)
                return 2
            print(points_table(name))
        return 0
    if args.list or not args.assignment:
        for name, tests in TESTS.items():
            print(f"{name:24s} {DESCRIPTIONS.get(name, '')} ({len(tests)} tests, {sum(t.points for t in tests)} pts)")
        return 0
    if args.assignment not in TESTS:
        print(f"unknown assignment {args.assignment!r}; expected one of {sorted(TESTS)}", file=sys.stderr)
        return 2
    if not args.file or not os.path.isfile(args.file):
        print(f"no such file: {args.file!r}", file=sys.stderr)
        return 2
    secret = args.hidden or (os.environ.get(SECRET_ENV) if args.suite in (None, "hidden", "both") else None)
    if args.suite == "public":
        secret = None
    out = sys.stderr if args.json == "-" else sys.stdout
    report = grade(args.assignment, os.path.abspath(args.file), out=out, fail_fast=args.fail_fast,
                   timeout=args.timeout or None, secret=secret, suite=args.suite, json_path=args.json)  # fmt: skip
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
