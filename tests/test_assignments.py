"""The assignment grader (tutorials/assignments/grade.py) must grade correctly:

* every reference solution in ``tutorials/assignments/solutions/`` PASSES;
* every classic wrong answer in ``tutorials/assignments/fixtures/<assignment>__<bug>.py`` FAILS, with a hint;
* every untouched student skeleton ``tutorials/assignments/<assignment>/student.py`` FAILS without crashing.

The grader runs in-process (one import of torch/triton for all of it); fixtures and skeletons are graded with
``fail_fast`` since one failing test is all that is asserted. One test runs the documented command line.
"""

from __future__ import annotations

import importlib.util
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ADIR = ROOT / "tutorials" / "assignments"


def _load_grader():
    spec = importlib.util.spec_from_file_location("minimtp_assignment_grader", ADIR / "grade.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


grader = _load_grader()
ASSIGNMENTS = sorted(grader.TESTS)
FIXTURES = sorted((ADIR / "fixtures").glob("*__*.py"))


# Triton kernels are graded in a fresh process, as a student runs the grader: its environment decides interpreted or
# compiled before triton is imported (docs: concepts/kernels, "Running the kernels on CPU").
IN_SUBPROCESS = {"paged_attention_kernel"}


def _grade(assignment: str, path: Path, fail_fast: bool = False) -> tuple[bool, str]:
    if assignment in IN_SUBPROCESS:
        cmd = [sys.executable, str(ADIR / "grade.py"), assignment, str(path)] + (["--fail-fast"] if fail_fast else [])
        env = dict(os.environ, OMP_NUM_THREADS="1", TRITON_INTERPRET="1")
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
        assert proc.returncode in (0, 1), f"the grader crashed ({proc.returncode}):\n{proc.stdout}{proc.stderr}"
        return proc.returncode == 0, proc.stdout + proc.stderr
    buf = io.StringIO()
    ok = grader.grade(assignment, str(path), out=buf, fail_fast=fail_fast)
    return ok, buf.getvalue()


def test_every_assignment_has_solution_skeleton_and_fixture():
    assert len(ASSIGNMENTS) >= 4
    fixture_names = {p.name.split("__")[0] for p in FIXTURES}
    for a in ASSIGNMENTS:
        assert (ADIR / "solutions" / f"{a}.py").is_file(), a
        assert (ADIR / a / "student.py").is_file(), a
        assert a in fixture_names, f"no fixture for {a}"
    assert fixture_names <= set(ASSIGNMENTS), fixture_names - set(ASSIGNMENTS)


@pytest.mark.parametrize("assignment", ASSIGNMENTS)
def test_reference_solution_passes(assignment):
    ok, report = _grade(assignment, ADIR / "solutions" / f"{assignment}.py")
    assert ok, report
    assert "[FAIL]" not in report and "[WARN]" not in report, report


@pytest.mark.parametrize("fixture", FIXTURES, ids=[p.stem for p in FIXTURES])
def test_classic_wrong_answer_fails_with_hint(fixture):
    assignment = fixture.name.split("__")[0]
    ok, report = _grade(assignment, fixture, fail_fast=True)
    assert not ok, f"the grader passed the wrong answer {fixture.name}:\n{report}"
    assert "[FAIL]" in report and "hint:" in report, report
    assert "not implemented" not in report, report  # it failed on its bug, not on a missing function


@pytest.mark.parametrize("assignment", ASSIGNMENTS)
def test_untouched_skeleton_fails_without_crashing(assignment):
    ok, report = _grade(assignment, ADIR / assignment / "student.py", fail_fast=True)
    assert not ok and "not implemented yet" in report, report
    assert "Traceback" not in report, report


def test_command_line(tmp_path):
    """The documented command: exit 0 for a passing file, 1 for a failing one, with the per-test report."""
    cmd = [sys.executable, str(ADIR / "grade.py"), "kv_rollback"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    ok = subprocess.run([*cmd, str(ADIR / "solutions" / "kv_rollback.py")], capture_output=True, text=True, env=env)
    assert ok.returncode == 0 and "[PASS] rollback_then_append" in ok.stdout, ok.stdout + ok.stderr
    bad = ADIR / "fixtures" / "kv_rollback__stale_kv_after_rollback.py"
    res = subprocess.run([*cmd, str(bad)], capture_output=True, text=True, env=env)
    assert res.returncode == 1 and "[FAIL] rollback_then_append" in res.stdout and "hint:" in res.stdout, res.stdout
