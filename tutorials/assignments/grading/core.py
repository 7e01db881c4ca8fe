"""The registry (``Test``, ``test``), loading a student file, the time limit, grade() and results.json."""

from __future__ import annotations

import contextlib
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

import torch

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # tutorials/assignments/

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
    library: bool = True  # also run when grading the library's holes (False: it tests a starter-file-only API)


TESTS: dict[str, list[Test]] = {}  # the public suite of every assignment
BUG_HINTS: dict[str, str] = {}  # bug class -> the hint printed for it (else the failing test's own hint)
HIDDEN: dict[str, list[Test]] = {}  # the hidden suite, filled by hidden_suite.register(grader) when it is loaded
DESCRIPTIONS: dict[str, str] = {}


def test(assignment: str, hint: str, points: int = 0, required: bool = True, bug: str = "", gate: bool = False,
         chi2: int = 0, name: str | None = None, registry: dict | None = None, suite: str = "public",
         library: bool = True):  # fmt: skip
    """Register ``fn`` as a test of ``assignment`` (public suite unless ``registry`` / ``suite`` say otherwise)."""

    def deco(fn):
        reg = TESTS if registry is None else registry
        reg.setdefault(assignment, []).append(
            Test(name or fn.__name__, fn, hint, required, points, bug, gate, suite, chi2, library)
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
    library: bool = False  # the file is the library's (its holes graded through the assignment's API)
    tests: dict = field(default_factory=dict)  # suite -> the tests run (library mode leaves some out)
    copies: list = field(default_factory=list)  # similarity.Match of every reference the file is flagged against
    closest: object = None  # the closest reference's similarity.Match (flagged or not)
    student: str = ""  # the student id the hidden suite was drawn for (--student)

    @property
    def ok(self) -> bool:
        return not self.import_error and all(r.status != "FAIL" for r in self.results)

    @property
    def integrity_ok(self) -> bool:
        return all(r.status == "PASS" for r in self.results if r.test.gate)

    def scale(self, suite: str) -> float:
        """TOTAL over the points of the suite's tests that ran (1 unless library mode left some out)."""
        pts = sum(t.points for t in self.tests.get(suite, suite_tests(self.assignment, suite)))
        return TOTAL / pts if pts else 1.0

    def weight(self, t: Test) -> float:
        return self.scale(t.suite) / len(self.suites)

    @property
    def score(self) -> float:
        if not self.integrity_ok:
            return 0.0
        return sum(r.score * self.weight(r.test) for r in self.results)

    @property
    def max_score(self) -> float:
        return float(sum(TOTAL if suite_points(self.assignment, s) else 0 for s in self.suites) / len(self.suites))

    def suite_score(self, suite: str) -> float:
        if not self.integrity_ok:
            return 0.0
        return sum(r.score for r in self.results if r.test.suite == suite) * self.scale(suite)

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
    mod.register(sys.modules[__package__])  # the grader: the package, every name of every module
    return True


def student_secret(course_secret: str, student: str) -> str:
    """One student's hidden-suite secret: HMAC-SHA256(course secret, student id), hex. Every student gets other
    draws; the instructor regrades any of them from the course secret alone."""
    import hmac

    return hmac.new(course_secret.encode(), student.encode(), hashlib.sha256).hexdigest()


def hidden_seed(secret: str, assignment: str, name: str) -> int:
    """The seed of one hidden test: a hash of the instructor's secret, the assignment and the test."""
    return int.from_bytes(hashlib.sha256(f"{secret}\0{assignment}\0{name}".encode()).digest()[:6], "little")


def _graded_holes(assignment: str):
    from .holes import graded

    return graded(assignment)


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


def _library_tests(assignment: str, suite: str) -> list[Test]:
    """The tests of a library file: its own integrity gate, then every test of the suite that is not a starter
    file's gate and applies to the library (``Test.library``)."""
    from .library import check_library_file

    def gate(mod, seed=None):
        check_library_file(assignment, mod)

    first = Test("library_integrity", gate, "fill the holes with your own code: the file may import only what the "
                 "library file imports, and nothing inside a hole (no import, importlib, exec or eval).",
                 bug="library shortcut", gate=True, suite=suite)  # fmt: skip
    return [first] + [t for t in suite_tests(assignment, suite) if t.library and not t.gate]


def grade(assignment: str, path: str, out=None, fail_fast: bool = False, timeout: float | None = DEFAULT_TIMEOUT,
          secret: str | None = None, suite: str | None = None, json_path: str | None = None,
          library: bool | None = None, copy_check: bool = True, student: str = "") -> Report:  # fmt: skip
    """Grade the file ``path`` as ``assignment``; print the report to ``out``; return a Report (truthy iff every
    required test passed). ``suite``: "public", "hidden" or "both" (default: "both" with a ``secret``, else
    "public"). ``json_path``: also write Gradescope's results.json there ("-": standard output). ``library``: the
    file is the assignment's library file (grading/holes.py; None: decided from the file, which then defines every
    hole). ``copy_check``: compare the file's own code with the library, the reference and the tutorials
    (grading/originality.py). ``student``: the id the hidden secret was derived for (printed)."""
    out = out or sys.stdout
    suite = suite or ("both" if secret else "public")
    suites = ("public", "hidden") if suite == "both" else (suite,)
    if "hidden" in suites:
        if not load_hidden():
            raise SystemExit("the hidden suite (hidden_suite.py, instructors only) is not in this copy of the grader")
        if not secret:
            raise SystemExit(f"the hidden suite needs a secret: --hidden SECRET or {SECRET_ENV}")
    torch.set_num_threads(1)
    from .library import adapt, is_library_file

    try:
        source = open(path, encoding="utf-8").read()
    except (OSError, UnicodeDecodeError):
        source = ""
    lib = is_library_file(assignment, source) if library is None else library
    report = Report(assignment, path, suites, library=lib, student=student)
    report.tests = {s: (_library_tests(assignment, s) if lib else suite_tests(assignment, s)) for s in suites}
    _WATCH.update(out=out, report=report, json=json_path)
    t_start = time.perf_counter()
    names = {"public": "public suite", "hidden": "hidden suite"}
    what = " + ".join(names[s] for s in suites) + (f", drawn for student {student}" if student else "")
    print(f"Grading {path} as assignment '{assignment}' ({what})", file=out)
    if lib:
        left = [t.name for t in suite_tests(assignment, suites[0]) if not t.library]
        print(f"  the library's holes ({', '.join(h.name for h in _graded_holes(assignment))})"
              + (f"; {', '.join(left)} test the starter file's API only: left out, the other tests count for the "
                 f"{TOTAL} points" if left else ""), file=out)  # fmt: skip
    try:
        with deadline(timeout, "import"), contextlib.redirect_stdout(io.StringIO()):
            mod = load(path)
            if lib:
                mod = adapt(assignment, mod)
    except (Exception, TestTimeout) as e:  # a syntax error, an import that loops, etc.: report, do not crash
        what = "it did not finish" if isinstance(e, TestTimeout) else f"{type(e).__name__}: {e}"
        report.import_error = what
        print(f"  [FAIL] import: {what}", file=out)
        for s in suites:
            for t in report.tests[s]:
                report.results.append(Result(t, "FAIL", 0.0, 0.0, "import error", f"the file does not import: {what}"))
    else:
        for s in suites:
            if len(suites) > 1:
                print(f"  -- {names[s]} --", file=out)
            for t in report.tests[s]:
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
    if copy_check and source:
        from . import originality

        report.closest, report.copies = originality.check(assignment, source, lib)
        for m in report.copies:
            print(f"  [FLAG] copy check: {m.describe()}", file=out)
        if report.closest is not None and not report.copies:
            print(f"  copy check: not flagged (closest: {report.closest.share:.0%} of the fingerprints match "
                  f"{report.closest.b})", file=out)  # fmt: skip
    each = [f"{s} {report.suite_score(s):g}/{TOTAL}" for s in suites]
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
    if report.copies or report.closest is not None:
        tests.append({
            "name": "copy check",
            "score": 0.0,
            "max_score": 0.0,
            "status": "failed" if report.copies else "passed",
            "output": "\n".join(f"flagged: {m.describe(limit=20)}" for m in report.copies) or (
                f"not flagged (closest: {report.closest.share:.0%} of the fingerprints match {report.closest.b})"),
            "visibility": "hidden",
        })  # fmt: skip
    lines = [f"assignment {report.assignment}: {report.score:g}/{report.max_score:g}"]
    if report.student:
        lines.append(f"hidden suite drawn for student {report.student}")
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


def submission_problem(assignment: str, path: str | None) -> str:
    """Why ``path`` cannot be graded as ``assignment`` (one line: which file, what was expected), or "" if it can."""
    want = f"expected your {assignment} answer: a Python file whose name ends in .py (the starter file is student.py)"
    if not path:
        return f"no file to grade was given: {want}"
    if os.path.isfile(path) and path.endswith(".py"):
        return ""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        what, folder = f"{path} is a folder, not a file", os.path.abspath(path)
    elif os.path.isfile(path):
        what = f"{path} is not a Python file: its name does not end in .py"
    else:
        what = f"no such file: {path}"
    if not os.path.isdir(folder):
        return f"{what} ({want}; the folder {folder} does not exist either)"
    names = sorted(n for n in os.listdir(folder) if not n.startswith("."))
    py = [n for n in names if n.endswith(".py")]
    listed = (py or names)[:10]
    holds = (f"{folder} holds {', '.join(listed)}" + (" ..." if len(py or names) > 10 else "")
             if names else f"{folder} is empty")  # fmt: skip
    return f"{what} ({want}; {holds})"


def not_graded_json(assignment: str, why: str, suites: tuple[str, ...] = ("public",)) -> dict:
    """Gradescope's results.json for a submission that could not be graded at all (no file, a misnamed file):
    score 0, the one line ``why`` as the output, and every test of the suites failed with 0 points."""
    tests = [{
        "name": f"{t.name} [{s}]" if len(suites) > 1 else t.name,
        "score": 0.0,
        "max_score": round(t.points / len(suites), 4),
        "status": "failed",
        "output": f"not graded: {why}",
        "visibility": "visible" if s == "public" else "after_published",
    } for s in suites for t in suite_tests(assignment, s)]  # fmt: skip
    return {"score": 0.0, "execution_time": 0.0, "output": why, "tests": tests}


def write_json_data(data: dict, path: str) -> None:
    """Write a results.json dict to ``path`` ("-": standard output)."""
    text = json.dumps(data, indent=2, ensure_ascii=False)
    if path == "-":
        sys.__stdout__.write(text + "\n")
        sys.__stdout__.flush()
    else:
        with open(path, "w", encoding="utf-8") as f:
            f.write(text + "\n")


def _write_json(report: Report, path: str, extra: str = "") -> None:
    text = json.dumps(gradescope_json(report, extra), indent=2, ensure_ascii=False)
    if path == "-":
        sys.__stdout__.write(text + "\n")
        sys.__stdout__.flush()
    else:
        with open(path, "w", encoding="utf-8") as f:
            f.write(text + "\n")
