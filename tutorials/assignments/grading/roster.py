"""Roster mode: grade a whole class, each student with their own hidden suite, and compare the submissions.

``grade.py ASSIGNMENT --roster DIR --out OUT [--hidden-secret S]``: every entry of DIR is one student, its name the
student id: a folder ``DIR/<id>/`` holding one Python file (the starter file ``student.py``, or the library file of
the assignment, e.g. ``kv_cache.py``), or a file ``DIR/<id>.py``. Each is graded as ``grade.py`` grades one file
(with ``S``: the hidden suite too, seeded from HMAC(S, id)), its results.json written to ``OUT/<id>/results.json``
(a folder with no Python file gets the results.json of an ungraded submission, score 0). Then every pair of
submissions is compared (grading/similarity.py) and ``OUT/roster.csv`` gets one row per student: the score, the
suites' scores, and the copy-check flags with their spans (library, reference, tutorial, classmates).
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path

from . import holes, originality
from .core import grade, gradescope_json, not_graded_json, student_secret, submission_problem, write_json_data


def submissions(folder: str, assignment: str) -> dict[str, str | None]:
    """student id -> the file to grade (None: nothing gradable in the student's folder)."""
    lib_name = os.path.basename(holes.LIBRARY_FILE[assignment])
    out: dict[str, str | None] = {}
    for entry in sorted(Path(folder).iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_file() and entry.suffix == ".py":
            out[entry.stem] = str(entry)
        elif entry.is_dir():
            py = sorted(p for p in entry.rglob("*.py") if "__pycache__" not in p.parts)
            pick = [p for p in py if p.name in ("student.py", lib_name)] or py
            out[entry.name] = str(pick[0]) if len(pick) == 1 else (str(pick[0]) if pick else None)
    return out


def grade_roster(assignment: str, folder: str, out_dir: str, course_secret: str | None = None, timeout=None,
                 suite: str | None = None, copy_check: bool = True) -> int:  # fmt: skip
    """Grade every submission of ``folder``; returns 0 (the roster was graded; failures are in the CSV)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows, codes, flags = [], {}, {}
    for sid, path in submissions(folder, assignment).items():
        dest = out / sid
        dest.mkdir(exist_ok=True)
        secret = student_secret(course_secret, sid) if course_secret else None
        why = submission_problem(assignment, path) if path else f"no Python file in {Path(folder) / sid}"
        if why:
            suites = ("public", "hidden") if secret and suite != "public" else ("public",)
            write_json_data(not_graded_json(assignment, f"cannot grade: {why}", suites), str(dest / "results.json"))
            rows.append({"student": sid, "file": path or "", "score": 0.0, "status": f"not graded: {why}"})
            print(f"{sid}: not graded ({why})")
            continue
        buf = io.StringIO()
        report = grade(assignment, os.path.abspath(path), out=buf, timeout=timeout, secret=secret, suite=suite,
                       copy_check=copy_check, student=sid)  # fmt: skip
        (dest / "report.txt").write_text(buf.getvalue(), encoding="utf-8")
        source = Path(path).read_text(encoding="utf-8")
        codes[sid] = originality.own_code(assignment, source, report.library, f"{sid} ({Path(path).name})")
        flags[sid] = [m.describe(limit=20) for m in report.copies]
        row = {"student": sid, "file": path, "score": round(report.score, 2),
               "status": "passed" if report.ok else "failed"}  # fmt: skip
        for s in report.suites:
            row[f"{s}_score"] = round(report.suite_score(s), 2)
        rows.append(row)
        data = gradescope_json(report)
        write_json_data(data, str(dest / "results.json"))
        print(f"{sid}: {report.score:g}/{report.max_score:g}" + (" [flagged]" if report.copies else ""))
    pairs = originality.pairwise(codes) if copy_check else []
    for m in pairs:
        for me, other in ((m.a, m.b), (m.b, m.a)):
            sid = me.split(" (")[0]
            flags.setdefault(sid, []).append(f"classmate {other}: {m.describe(limit=20)}")
    for row in rows:
        found = flags.get(row["student"], [])
        row["flagged"] = "yes" if found else ""
        row["copy_check"] = " | ".join(found)
    fields = ["student", "file", "score", "public_score", "hidden_score", "status", "flagged", "copy_check"]
    with open(out / "roster.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    print(f"roster: {len(rows)} students, {sum(1 for r in rows if r['flagged'])} flagged: {out / 'roster.csv'}")
    return 0
