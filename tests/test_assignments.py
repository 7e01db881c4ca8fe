"""The assignment grader (tutorials/assignments/grade.py and its hidden suite) must grade correctly:

* every reference solution in ``tutorials/assignments/solutions/`` scores 80/80, in the public suite and in the
  hidden suite (with a fixed test secret);
* every wrong answer in ``tutorials/assignments/fixtures/<assignment>__<bug>.py`` FAILS, and the report names the
  bug class its docstring declares (``Bug class: <name>``);
* every untouched student skeleton ``tutorials/assignments/<assignment>/student.py`` FAILS without crashing;
* points total 80 per suite, ``--json`` writes a valid Gradescope results.json, the per-test timeout fires, and the
  integrity checks (read from the syntax tree) accept honest files and reject shortcuts.

The grader runs in-process (one import of torch for all of it), except for the kernel assignment: kernels are graded
in a fresh process, as a student runs the grader (its environment decides interpreted or compiled before triton is
imported; docs: concepts/kernels, "Running the kernels on CPU"), and a wrong kernel that reads out of bounds may
crash that process, not pytest. Fixtures are graded with ``fail_fast``: the grader orders its tests from the most
specific to the most generic, so the first failure names the bug class.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import re
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ADIR = ROOT / "tutorials" / "assignments"
SECRET = "minimtp-ci-secret"  # the hidden suite's seed in these tests (an instructor picks their own)


def _load_grader():
    spec = importlib.util.spec_from_file_location("minimtp_assignment_grader", ADIR / "grade.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


grader = _load_grader()
ASSIGNMENTS = sorted(grader.TESTS)
FIXTURES = sorted((ADIR / "fixtures").glob("*__*.py"))
IN_SUBPROCESS = {"paged_attention_kernel"}


def _bug_class(path: Path) -> str:
    m = re.search(r'^"""Bug class:\s*(.+)$', path.read_text(encoding="utf-8"), re.M)
    assert m, f"{path.name}: the module docstring must begin with 'Bug class: <name>'"
    return m.group(1).strip()


def _grade(assignment: str, path: Path, fail_fast: bool = False, secret: str | None = None,
           suite: str | None = None, tmp: Path | None = None) -> tuple[bool, str, dict]:  # fmt: skip
    """(passed, the printed report, the results.json dict)."""
    if assignment in IN_SUBPROCESS:
        out = (tmp or Path(os.environ.get("TMPDIR", "/tmp"))) / f"results-{os.getpid()}-{time.time_ns()}.json"
        cmd = [sys.executable, str(ADIR / "grade.py"), assignment, str(path), "--json", str(out)]
        cmd += (["--fail-fast"] if fail_fast else []) + (["--hidden", secret] if secret else [])
        cmd += ["--suite", suite] if suite else []
        env = dict(os.environ, OMP_NUM_THREADS="1", TRITON_INTERPRET="1")
        env.pop(grader.SECRET_ENV, None)
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
        report = proc.stdout + proc.stderr
        if proc.returncode < 0:  # killed by a signal: a kernel that read out of bounds crashed the interpreter
            return False, report + f"\n[FAIL] crashed (signal {-proc.returncode})", {}
        assert proc.returncode in (0, 1), f"the grader crashed ({proc.returncode}):\n{report}"
        data = json.loads(out.read_text()) if out.exists() else {}
        out.unlink(missing_ok=True)
        return proc.returncode == 0, report, data
    buf = io.StringIO()
    rep = grader.grade(assignment, str(path), out=buf, fail_fast=fail_fast, secret=secret, suite=suite)
    return rep.ok, buf.getvalue(), grader.gradescope_json(rep)


def _check_results_json(data: dict, total: float = 80.0) -> None:
    """Gradescope's results.json: top-level score / execution_time / output / tests; each test has name, score,
    max_score, status (passed|failed), output, visibility; the scores add up to the total."""
    assert set(data) == {"score", "execution_time", "output", "tests"}, sorted(data)
    assert isinstance(data["score"], (int, float)) and isinstance(data["execution_time"], (int, float))
    assert isinstance(data["output"], str) and isinstance(data["tests"], list) and data["tests"]
    for t in data["tests"]:
        assert set(t) == {"name", "score", "max_score", "status", "output", "visibility"}, sorted(t)
        assert isinstance(t["name"], str) and isinstance(t["output"], str)
        assert isinstance(t["score"], (int, float)) and isinstance(t["max_score"], (int, float))
        assert 0 <= t["score"] <= t["max_score"] + 1e-9, t
        assert t["status"] in ("passed", "failed") and t["visibility"] in ("visible", "after_published", "hidden")
    assert abs(sum(t["max_score"] for t in data["tests"]) - total) < 1e-6
    assert abs(sum(t["score"] for t in data["tests"]) - data["score"]) < 1e-3 or data["score"] == 0
    json.dumps(data)


def test_every_assignment_has_solution_skeleton_and_fixtures():
    assert len(ASSIGNMENTS) >= 4
    fixture_names = [p.name.split("__")[0] for p in FIXTURES]
    for a in ASSIGNMENTS:
        assert (ADIR / "solutions" / f"{a}.py").is_file(), a
        assert (ADIR / a / "student.py").is_file(), a
        assert a in fixture_names, f"no fixture for {a}"
    assert set(fixture_names) <= set(ASSIGNMENTS), set(fixture_names) - set(ASSIGNMENTS)
    for p in FIXTURES:
        _bug_class(p)


@pytest.mark.parametrize("assignment", ASSIGNMENTS)
def test_points_total_80_in_both_suites(assignment):
    assert grader.load_hidden(), "tutorials/assignments/hidden_suite.py is missing"
    for suite in ("public", "hidden"):
        tests = grader.suite_tests(assignment, suite)
        assert sum(t.points for t in tests) == grader.TOTAL == 80, (suite, [(t.name, t.points) for t in tests])
        assert all(t.points == 0 for t in tests if t.gate or not t.required)
        assert all(t.points > 0 for t in tests if t.required and not t.gate)
        assert any(t.gate for t in tests), "every suite starts with an integrity check"
        assert len({t.name for t in tests}) == len(tests)


def test_points_command_line():
    res = subprocess.run([sys.executable, str(ADIR / "grade.py"), "--points", "kv_rollback"], capture_output=True,
                         text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert "public suite" in res.stdout and "hidden suite" in res.stdout
    assert len(re.findall(r"^\s+total\s+80$", res.stdout, re.M)) == 2, res.stdout
    assert "pool_full" in res.stdout and "gate" in res.stdout
    spec = subprocess.run([sys.executable, str(ADIR / "grade.py"), "--points", "spec_sampling"], capture_output=True,
                          text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))  # fmt: skip
    n = sum(t.chi2 for t in grader.TESTS["spec_sampling"])
    assert f"{n} χ² tests" in spec.stdout and f"{n * 1e-4:.1e}" in spec.stdout, spec.stdout


@pytest.mark.parametrize("assignment", ASSIGNMENTS)
def test_reference_solution_scores_80(assignment, tmp_path):
    ok, report, data = _grade(assignment, ADIR / "solutions" / f"{assignment}.py", tmp=tmp_path)
    assert ok, report
    assert "[FAIL]" not in report and "[WARN]" not in report, report
    assert "Score: 80/80" in report, report
    _check_results_json(data)
    graded = [t for t in data["tests"] if t["name"] != "copy check"]  # the copy check: 0 points, instructors only
    assert data["score"] == 80 and all(t["visibility"] == "visible" for t in graded)


@pytest.mark.parametrize("assignment", ASSIGNMENTS)
def test_reference_solution_scores_80_in_the_hidden_suite(assignment, tmp_path):
    ok, report, data = _grade(assignment, ADIR / "solutions" / f"{assignment}.py", secret=SECRET, suite="hidden",
                              tmp=tmp_path)  # fmt: skip
    assert ok, report
    assert "[FAIL]" not in report and "Score: 80/80" in report, report
    _check_results_json(data)
    assert all(t["visibility"] == "after_published" for t in data["tests"] if t["name"] != "copy check")


# the kernel fixtures run in a subprocess each (slow, under -m slow) but these, which the default run grades too
KERNEL_FIXTURES_BY_DEFAULT = {
    "paged_attention_kernel__off_by_one_causal_mask.py",
    "paged_attention_kernel__loop_stops_before_pos.py",  # NaN made by the kernel (0 / 0), not read from a block
}


def _fixture_param(p: Path):
    slow = p.name.split("__")[0] in IN_SUBPROCESS and p.name not in KERNEL_FIXTURES_BY_DEFAULT
    return pytest.param(p, id=p.stem, marks=[pytest.mark.slow] if slow else [])


@pytest.mark.parametrize("fixture", [_fixture_param(p) for p in FIXTURES])
def test_wrong_answer_fails_naming_its_bug_class(fixture, tmp_path):
    assignment = fixture.name.split("__")[0]
    bug = _bug_class(fixture)
    # a HIDDEN ONLY fixture passes the public suite by design (tests/test_assignment_secrets.py checks both suites)
    hidden = "HIDDEN ONLY" in fixture.read_text(encoding="utf-8")
    ok, report, _ = _grade(assignment, fixture, fail_fast=True, tmp=tmp_path, secret=SECRET if hidden else None,
                           suite="hidden" if hidden else None)  # fmt: skip
    assert not ok, f"the grader passed the wrong answer {fixture.name}:\n{report}"
    assert "[FAIL]" in report and "hint:" in report, report
    assert "not implemented" not in report, report  # it failed on its bug, not on a missing function
    assert f"bug class: {bug}".lower() in report.lower(), f"{fixture.name} declares 'Bug class: {bug}':\n{report}"


@pytest.mark.parametrize("assignment", ASSIGNMENTS)
def test_untouched_skeleton_fails_without_crashing(assignment, tmp_path):
    ok, report, _ = _grade(assignment, ADIR / assignment / "student.py", fail_fast=True, tmp=tmp_path)
    assert not ok and "not implemented yet" in report, report
    assert "Traceback" not in report, report


def test_command_line_and_json(tmp_path):
    """The documented command: exit 0 / 1, the per-test report with points, and --json FILE / --json -."""
    cmd = [sys.executable, str(ADIR / "grade.py"), "kv_rollback"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop(grader.SECRET_ENV, None)
    ok = subprocess.run([*cmd, str(ADIR / "solutions" / "kv_rollback.py")], capture_output=True, text=True, env=env)
    assert ok.returncode == 0 and "[PASS] rollback_then_append (14/14 pts" in ok.stdout, ok.stdout + ok.stderr
    assert "Score: 80/80" in ok.stdout
    bad = ADIR / "fixtures" / "kv_rollback__stale_kv_after_rollback.py"
    out = tmp_path / "results.json"
    res = subprocess.run([*cmd, str(bad), "--json", str(out)], capture_output=True, text=True, env=env)
    assert res.returncode == 1 and "[FAIL] rollback_then_append (0/14 pts" in res.stdout, res.stdout
    assert "bug class: stale K/V after rollback" in res.stdout and "hint:" in res.stdout, res.stdout
    data = json.loads(out.read_text())
    _check_results_json(data)
    assert 0 < data["score"] < 80
    failed = [t for t in data["tests"] if t["status"] == "failed" and t["name"] != "copy check"]
    assert failed and all(t["score"] == 0 and "bug class:" in t["output"] for t in failed)
    # --json -: the JSON alone on stdout, the report on stderr; with a secret both suites, weighted by half
    both = subprocess.run([*cmd, str(bad), "--json", "-", "--hidden", SECRET], capture_output=True, text=True,
                          env=env)  # fmt: skip
    data = json.loads(both.stdout)
    _check_results_json(data)
    vis = {t["visibility"] for t in data["tests"] if t["name"] != "copy check"}
    assert vis == {"visible", "after_published"}, vis
    assert "hidden suite" in both.stderr and "each counts half" in both.stderr


def test_missing_or_misnamed_file_still_writes_results_json(tmp_path):
    """No file to grade (missing, misnamed, a folder, not .py): exit non-zero and, with --json, a valid results.json
    scoring 0 whose output is one line naming the file, what was expected and what the folder holds."""
    sub = tmp_path / "submission"
    sub.mkdir()
    (sub / "Student.py").write_text("x = 1\n")  # the student's file, misnamed
    (sub / "notes.txt").write_text("x\n")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop(grader.SECRET_ENV, None)
    cases = [
        (sub / "student.py", ["no such file", str(sub / "student.py"), "Student.py"]),  # misnamed
        (tmp_path / "nowhere" / "student.py", ["no such file", "does not exist"]),  # the folder is missing too
        (sub, ["is a folder", "Student.py"]),
        (sub / "notes.txt", ["not a Python file", "notes.txt"]),
    ]
    for i, (path, words) in enumerate(cases):
        out = tmp_path / f"results-{i}.json"
        proc = subprocess.run([sys.executable, str(ADIR / "grade.py"), "spec_sampling", str(path), "--json", str(out)],
                              capture_output=True, text=True, env=env)  # fmt: skip
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert out.is_file(), f"{path}: no results.json written\n{proc.stderr}"
        data = json.loads(out.read_text())
        _check_results_json(data)
        assert data["score"] == 0 and all(t["score"] == 0 and t["status"] == "failed" for t in data["tests"])
        line = data["output"]
        assert "\n" not in line and "expected your spec_sampling answer" in line and ".py" in line, line
        assert all(w in line for w in words), (words, line)
        assert line in proc.stderr, proc.stderr
    # --json -: the JSON alone on stdout; with a secret both suites are listed, hidden tests after_published
    proc = subprocess.run([sys.executable, str(ADIR / "grade.py"), "kv_rollback", str(sub / "student.py"), "--json",
                           "-", "--hidden", SECRET], capture_output=True, text=True, env=env)  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    data = json.loads(proc.stdout)
    _check_results_json(data)
    assert data["score"] == 0 and {t["visibility"] for t in data["tests"]} == {"visible", "after_published"}
    # without --json: the same line on stderr, exit 2, nothing written
    proc = subprocess.run([sys.executable, str(ADIR / "grade.py"), "kv_rollback", str(sub / "student.py")],
                          capture_output=True, text=True, env=env, cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 2 and "no such file" in proc.stderr and not proc.stdout, proc.stdout + proc.stderr


def test_timeout_fails_the_looping_test_and_goes_on(tmp_path):
    src = (ADIR / "solutions" / "kv_rollback.py").read_text()
    looping = src.replace("    def append(self, seq: int, k: torch.Tensor, v: torch.Tensor) -> None:\n",
                          "    def append(self, seq: int, k: torch.Tensor, v: torch.Tensor) -> None:\n"
                          "        while True:  # a student's infinite loop that swallows every exception\n"
                          "            try:\n"
                          "                pass\n"
                          "            except Exception:\n"
                          "                pass\n", 1)  # fmt: skip
    assert looping != src
    f = tmp_path / "looping.py"
    f.write_text(looping)
    buf = io.StringIO()
    t0 = time.perf_counter()
    rep = grader.grade("kv_rollback", str(f), out=buf, timeout=1.0)
    assert time.perf_counter() - t0 < 30, buf.getvalue()
    results = {r.test.name: r for r in rep.results}
    assert results["append_and_gather"].status == "FAIL" and results["append_and_gather"].bug == "timeout"
    assert "did not finish within 1 s" in buf.getvalue(), buf.getvalue()
    assert len(rep.results) == len(grader.TESTS["kv_rollback"])  # every later test still ran
    assert not rep.ok and rep.score == 0


def _fake(source: str):
    return types.SimpleNamespace(__source__=source)


@pytest.mark.parametrize("line", [
    "import minimtp.speculative",
    "from minimtp.speculative import verify",
    "from minimtp import speculative",
    "import minimtp.speculative as s",
    "import minimtp\nverify = minimtp.speculative.verify",
    "import importlib\nm = importlib.import_module('minimtp.speculative')",
    "m = __import__('minimtp.speculative')",
    "import sys\nv = sys.modules['minimtp.speculative']",
    "from minimtp.fast import fused",
])  # fmt: skip
def test_integrity_rejects_library_shortcuts(line):
    with pytest.raises(grader.Failure) as e:
        grader.no_library_shortcut(_fake(line))
    assert e.value.bug == grader.SP_SHORTCUT


@pytest.mark.parametrize("line", [
    "from minimtp.sampling import SamplingParams, process_logits, sample",
    "import minimtp.sampling as S\nx = S.sample",
    "from minimtp import sampling",
    "import torch\nfrom minimtp.errors import CacheFullError",
    '"""The batched signature of minimtp.speculative.verify (a docstring may name it)."""',
])  # fmt: skip
def test_integrity_accepts_honest_imports(line):
    grader.no_library_shortcut(_fake(line))


_DRESSED = """
import torch
import triton
import triton.language as tl


@triton.jit
def copy_kernel(out_ptr, x_ptr, N: tl.constexpr):
    i = tl.arange(0, N)
    tl.store(out_ptr + i, tl.load(x_ptr + i))


def paged_attention(q, k_cache, v_cache, block_tables, seq_lens, cu_q_lens, window=0, scale=1.0):
    out = torch.empty_like(q)
    k = k_cache[block_tables[0].long()].flatten(0, 1)
    s = torch.einsum("thd,nhd->htn", q, k) * scale
    w = s.softmax(-1)
    res = torch.einsum("htn,nhd->thd", w, k)
    copy_kernel[(1,)](out, res, N=res.numel())
    return out
"""


@pytest.mark.parametrize("edit", [
    None,  # einsum + softmax
    ("torch.einsum(\"thd,nhd->htn\", q, k)", "(q.transpose(0, 1) @ k.permute(1, 2, 0))"),
    ("s.softmax(-1)", "torch.nn.functional.softmax(s, -1)"),
    ("w = s.softmax(-1)", "w = torch.exp(s - s.amax(-1, keepdim=True))"),
    ("copy_kernel[(1,)](out, res, N=res.numel())", "out.copy_(res)"),  # no launch at all
])  # fmt: skip
def test_integrity_rejects_pytorch_dressed_up_as_triton(edit):
    src = _DRESSED if edit is None else _DRESSED.replace(*edit)
    assert edit is None or src != _DRESSED
    with pytest.raises(grader.Failure) as e:
        grader.check_triton_integrity(_fake(src))
    assert e.value.bug in (grader.PA_DRESSED, grader.PA_NOT_TRITON)


def test_integrity_accepts_honest_kernels():
    for path in [ADIR / "solutions" / "paged_attention_kernel.py", ADIR / "paged_attention_kernel" / "student.py"]:
        grader.check_triton_integrity(_fake(path.read_text()))
    honest = (ADIR / "solutions" / "paged_attention_kernel.py").read_text()
    honest = honest.replace("out = torch.empty_like(q)", "out = torch.empty(q.shape, dtype=torch.float32)")
    honest = honest.replace("paged_attention_kernel[(T, Hq)](", "grid = (triton.cdiv(T, 1), Hq)\n"
                            "    paged_attention_kernel[grid](")  # fmt: skip
    grader.check_triton_integrity(_fake(honest))
    with pytest.raises(grader.Failure):  # torch inside the kernel body
        grader.check_triton_integrity(_fake(honest.replace("row = tl.program_id(0)", "row = torch.tensor(0)")))


def test_chi2_failure_shows_the_largest_cell():
    import torch

    counts = torch.tensor([0.0, 0.0, 500.0, 500.0])
    with pytest.raises(grader.Failure) as e:
        grader.chi2_test(counts, torch.tensor([0.1, 0.1, 0.4, 0.4]), "demo")
    msg = e.value.evidence
    assert "largest contribution" in msg and "observed 0" in msg and "expected 100.0" in msg, msg


def test_public_loss_table_matches_the_mistakes():
    """The public grader names a distillation mistake from stored losses (it does not ship the loss code): they must
    be what the hidden suite's implementation of each mistake computes on the public inputs."""
    import torch

    assert grader.load_hidden() and grader.distil_drafter.LOSS_VARIANT is not None
    x, seed = grader._public_loss_inputs()
    target = grader._distil_setup()["target"]
    drafter = grader._fresh_drafter(seed)
    assert set(grader.PUBLIC_LOSS_TABLE) == set(grader._LOSS_MISTAKES)
    with torch.no_grad():
        for name, vals in grader.PUBLIC_LOSS_TABLE.items():
            for k, v in zip(grader.PUBLIC_LOSS_KS, vals):
                got = float(grader.distil_drafter.LOSS_VARIANT(target, drafter, x, k, name))
                assert abs(got - v) <= 2e-5 * abs(v), (name, k, got, v)
        for k in grader.PUBLIC_LOSS_KS:  # the library's loss is the definition (no switch set)
            ref = float(grader._reference_loss(target, drafter, x, k))
            from_definition = float(sys.modules["minimtp_hidden_suite"].loss_variant(target, drafter, x, k))
            assert abs(ref - from_definition) <= 1e-5 * abs(ref)


def test_hints_are_per_bug_class():
    """A failure's hint is its bug class's (a forgotten softmax scale gets the scale hint, not the causal-mask hint of
    the test it failed in); every bug class a test can name by default has a hint."""
    verify = next(t for t in grader.TESTS["paged_attention_kernel"] if "verify" in t.name)
    r = grader.Result(verify, "FAIL", 0.0, 0.0, grader.PA_SCALE, "...")
    assert "scale" in grader.hint_for(r) and grader.hint_for(r) != verify.hint
    r.bug = f"{grader.SP_DRAFTS} (drawn from the raw softmax: temperature / top-k ignored)"
    assert grader.hint_for(r) == grader.BUG_HINTS[grader.SP_DRAFTS]
    r.bug = "timeout"
    assert grader.hint_for(r) == verify.hint
    for p in FIXTURES:
        assert _bug_class(p) in grader.BUG_HINTS or _bug_class(p) in {
            grader.DD_LOSS,
            grader.DD_ACCEPT,
            grader.SP_OUTPUT,
            grader.KV_RANDOM,
            grader.PA_OUTPUT,
            grader.SP_SHORTCUT,
        }, f"{p.name}: no hint for its bug class {_bug_class(p)!r}"
