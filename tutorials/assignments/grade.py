#!/usr/bin/env python
"""Grade an assignment with the project's property tests.

    python tutorials/assignments/grade.py <assignment> path/to/student.py        # the public suite
    python tutorials/assignments/grade.py <assignment> FILE --json results.json  # + Gradescope's results.json
    python tutorials/assignments/grade.py <assignment> FILE --hidden SECRET      # + the instructor's hidden suite
    python tutorials/assignments/grade.py <assignment> FILE --hidden-secret S --student ID   # one student's draws
    python tutorials/assignments/grade.py <assignment> --library                 # the holes of the installed minimtp
    python tutorials/assignments/grade.py <assignment> --roster DIR --out OUT    # a class: CSV + results.json each
    python tutorials/assignments/grade.py --points <assignment>                  # the points of every test
    python tutorials/assignments/grade.py --list

Prints one line per test (PASS / FAIL / WARN) with its points, and for every failure the bug class (the invariant
the file breaks), the smallest evidence the grader found, and a hint; then ``Score: S/80``. Exits 0 iff every
required test passed (1 otherwise, 2 when there is no file to grade: a missing or misnamed file, which ``--json``
still reports in a results.json scoring 0). WARN marks an advisory test (0 points; it never fails the grade).

Points. Each assignment's autograded tests total 80 points (the handout adds 20 points of written questions).
Integrity checks (imports and the shape of the code, read from its syntax tree, never executed) are worth 0 points
but gate the score: a file that fails one scores 0 (its other tests still run, for feedback).

Suites. The public suite (this file) uses fixed seeds, so the grade of a given file is deterministic. The hidden
suite (``hidden_suite.py`` beside this file, instructors only: the student release leaves out every ``hidden*``
file) runs the same invariants on new cases (vocabulary sizes, block sizes, Hq:Hkv = 8:1, softmax scales != 1,
partly full pools, sequences much longer than the window, gradients of the distillation loss) drawn from a secret
the instructor passes (``--hidden SECRET`` or the environment variable ``MINIMTP_GRADER_SECRET``). With a secret
both suites run and the score is their mean (each test counts for half its points).

Library. A student release ships minimtp itself with each assignment's functions as holes (grading/holes.py);
``--library`` grades the holes of the installed minimtp (the file ``python -m minimtp.generate`` runs on), and a
FILE that is the assignment's library file (it defines every hole) is graded the same way: through the
assignment's API (grading/library.py).

Copy check. The file's own code (what the starter file does not give) is fingerprinted (winnowing,
grading/similarity.py) and compared with the library's answer, the reference solution and every tutorial, and in
roster mode with every other submission; a match above the measured threshold is flagged with the matching line
ranges of both files (it does not change the score: an instructor reads it).

Per-student hidden suites. ``--hidden-secret S --student ID`` seeds the hidden suite from HMAC-SHA256(S, ID): every
student gets other cases, the instructor regrades any of them from S alone. ``--roster DIR`` grades every
submission of DIR (``DIR/<id>/<file>.py`` or ``DIR/<id>.py``), each with its own secret, writes
``OUT/<id>/results.json`` and ``OUT/roster.csv`` (one row per student: scores, the copy-check flags and their spans).

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
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # tutorials/, for _tiny
sys.path.insert(0, HERE)  # for the grading package beside this file (loaded by path, the folder is not on sys.path)

# Without a GPU the kernel assignment runs under Triton's interpreter, which must be chosen before triton is imported
# (docs: concepts/kernels, "Running the kernels on CPU"): the grader opts in here unless the caller decided.
if not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import grading  # noqa: E402
from grading import (  # noqa: E402
    ALPHA,
    DEFAULT_TIMEOUT,
    DESCRIPTIONS,
    SECRET_ENV,
    TESTS,
    grade,
    load_hidden,
    not_graded_json,
    student_secret,
    submission_problem,
    suite_tests,
    write_json_data,
)
from grading.roster import grade_roster  # noqa: E402


def __getattr__(name: str):
    """Every other name of the grader (``grader.TESTS``, ``grader.Failure``, ``grader.distil_drafter``...) is the
    grading package's."""
    try:
        return getattr(grading, name)
    except AttributeError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None


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
    ap.add_argument("file", nargs="?", help="the student file to grade (a starter-style file or the library's)")
    ap.add_argument("--list", action="store_true", help="list the assignments")
    ap.add_argument("--points", metavar="ASSIGNMENT", nargs="?", const="", help="print the points of every test")
    ap.add_argument("-x", "--fail-fast", action="store_true", help="stop at the first failing test")
    ap.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, metavar="S",
                    help=f"time limit of each test in seconds (default {DEFAULT_TIMEOUT:g}; 0: none)")  # fmt: skip
    ap.add_argument("--json", metavar="FILE", help="also write Gradescope's results.json to FILE ('-': stdout, "
                    "the report then goes to stderr)")  # fmt: skip
    ap.add_argument("--hidden", metavar="SECRET", help=f"run the hidden suite too, seeded from SECRET (default: "
                    f"${SECRET_ENV}; instructors only)")  # fmt: skip
    ap.add_argument("--hidden-secret", metavar="S", help="the course secret: with --student (or --roster) the "
                    "hidden suite is seeded from HMAC(S, student id)")  # fmt: skip
    ap.add_argument("--student", metavar="ID", help="the student id the hidden suite is drawn for")
    ap.add_argument("--suite", choices=("public", "hidden", "both"), help="which suites to run (default: public, "
                    "or both with a secret)")  # fmt: skip
    ap.add_argument("--library", action="store_true", help="grade the library's holes: FILE is the assignment's "
                    "library file (default: the installed minimtp's)")  # fmt: skip
    ap.add_argument("--no-copy-check", action="store_true", help="skip the copy check")
    ap.add_argument("--roster", metavar="DIR", help="grade every submission in DIR (DIR/<id>/*.py or DIR/<id>.py)")
    ap.add_argument("--out", metavar="DIR", help="with --roster: where roster.csv and <id>/results.json go")
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
    if args.student and not args.hidden_secret:
        print("--student needs --hidden-secret S (the course secret the student's is derived from)", file=sys.stderr)
        return 2
    if args.roster:
        if not args.out:
            print("--roster needs --out DIR (where roster.csv and the results.json files go)", file=sys.stderr)
            return 2
        if not os.path.isdir(args.roster):
            print(f"--roster {args.roster}: no such folder", file=sys.stderr)
            return 2
        return grade_roster(
            args.assignment,
            args.roster,
            args.out,
            course_secret=args.hidden_secret,
            timeout=args.timeout or None,
            suite=args.suite,
            copy_check=not args.no_copy_check,
        )
    if args.hidden_secret and args.student:
        secret = student_secret(args.hidden_secret, args.student)
    else:
        secret = args.hidden or (os.environ.get(SECRET_ENV) if args.suite in (None, "hidden", "both") else None)
    if args.suite == "public":
        secret = None
    if args.library and not args.file:
        try:
            args.file = grading.library.installed_file(args.assignment)
        except FileNotFoundError as e:
            print(f"cannot grade: {e} (pip install -e the release first)", file=sys.stderr)
            return 2
    why = submission_problem(args.assignment, args.file)
    if why:  # nothing to grade: say so, and with --json still write a results.json (score 0) that says so
        print(f"cannot grade: {why}", file=sys.stderr)
        if args.json:
            suite = args.suite or ("both" if secret else "public")
            suites = ("public", "hidden") if suite == "both" else (suite,)
            if "hidden" in suites and not load_hidden():
                suites = ("public",)
            write_json_data(not_graded_json(args.assignment, f"cannot grade: {why}", suites), args.json)
        return 2
    out = sys.stderr if args.json == "-" else sys.stdout
    report = grade(args.assignment, os.path.abspath(args.file), out=out, fail_fast=args.fail_fast,
                   timeout=args.timeout or None, secret=secret, suite=args.suite, json_path=args.json,
                   library=True if args.library else None, copy_check=not args.no_copy_check,
                   student=args.student or "")  # fmt: skip
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
