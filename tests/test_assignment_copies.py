"""Copy detection in the grader (issue 23, item 2): winnowed fingerprints (tutorials/assignments/grading/similarity.py).

* A pasted-library submission (``minimtp.speculative.verify`` pasted into spec_sampling's ``verify``, the issue's
  80/80 case), a pasted-tutorial one (tutorial 07's kernel as the kernel answer) and a pasted-classmate one (roster
  mode: a classmate's file with every name changed and reformatted) are each flagged, with the line ranges of both
  files.
* Not flagged, at the threshold the grader uses: every fixture and reference solution against the library's
  answers and the tutorials (the measured maximum is printed in the assertion), and an independently written
  kv_rollback answer against the reference, the library and its classmates.
* Roster mode writes one results.json per student and a CSV naming the flags.
"""

from __future__ import annotations

import ast
import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ADIR = ROOT / "tutorials" / "assignments"
sys.path.insert(0, str(ADIR))
sys.path.insert(0, str(ADIR.parent))
from grading import holes, originality, similarity  # noqa: E402

ENV = {k: v for k, v in os.environ.items() if k != "MINIMTP_GRADER_SECRET"} | {"OMP_NUM_THREADS": "1"}

# kv_rollback written from the handout alone, in another style than the reference (the control that must NOT be
# flagged against the reference, the library or a classmate who wrote the reference's way)
INDEPENDENT_KV = """
from __future__ import annotations

import torch

from minimtp.errors import CacheFullError


class PagedKV:
    def __init__(self, num_blocks: int, block_size: int, dim: int):
        self.block_size = block_size
        self.k = torch.zeros(num_blocks, block_size, dim)
        self.v = torch.zeros(num_blocks, block_size, dim)
        self.free: list[int] = list(range(num_blocks - 1, -1, -1))
        self.tables: dict[int, list[int | None]] = {}
        self.lengths: dict[int, int] = {}

    def add(self, seq: int) -> None:
        self.tables[seq], self.lengths[seq] = [], 0

    def release(self, seq: int) -> None:
        self.free.extend(b for b in self.tables.pop(seq) if b is not None)
        del self.lengths[seq]

    def gather(self, seq: int, start: int = 0):
        pos = range(start, self.lengths[seq])
        blocks = [self.tables[seq][i // self.block_size] for i in pos]
        slots = [(b, i % self.block_size) for b, i in zip(blocks, pos)]
        k = torch.stack([self.k[b, s] for b, s in slots]) if slots else self.k.new_zeros(0, self.k.shape[-1])
        v = torch.stack([self.v[b, s] for b, s in slots]) if slots else self.v.new_zeros(0, self.v.shape[-1])
        return k, v

    def append(self, seq, k, v):
        start = self.lengths[seq]
        end = start + len(k)
        blocks_wanted = (end + self.block_size - 1) // self.block_size
        extra = max(0, blocks_wanted - len(self.tables[seq]))
        if extra > len(self.free):
            raise CacheFullError("pool exhausted")
        self.tables[seq].extend(self.free.pop() for _ in range(extra))
        for offset, pos in enumerate(range(start, end)):
            block, slot = divmod(pos, self.block_size)
            self.k[self.tables[seq][block], slot] = k[offset]
            self.v[self.tables[seq][block], slot] = v[offset]
        self.lengths[seq] = end

    def rollback(self, seq, n):
        owned = self.tables[seq]
        cut = (n + self.block_size - 1) // self.block_size
        self.free += [b for b in owned[cut:] if b is not None]
        del owned[cut:]
        self.lengths[seq] = n

    def trim(self, seq, keep):
        limit = self.lengths[seq] - keep
        owned = self.tables[seq]
        for idx, block in enumerate(owned):
            if block is not None and (idx + 1) * self.block_size <= limit:
                self.free.append(block)
                owned[idx] = None
"""


def _renamed(src: str) -> str:
    """A classmate's copy: every argument and local renamed, comments and docstrings gone, reformatted."""
    tree = ast.parse(src)
    for fn in [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)]:
        local = {a.arg for a in ast.walk(fn.args) if isinstance(a, ast.arg)} - {"self"}
        local |= {n.id for n in ast.walk(fn) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
        for node in ast.walk(fn):
            if isinstance(node, ast.Name) and node.id in local:
                node.id = "my_" + node.id
            elif isinstance(node, ast.arg) and node.arg in local:
                node.arg = "my_" + node.arg
    return ast.unparse(tree)


def _grader():
    import importlib.util

    spec = importlib.util.spec_from_file_location("minimtp_copies_grader", ADIR / "grade.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def test_a_pasted_library_submission_is_flagged(tmp_path):
    """The issue's case: minimtp.speculative.verify (and its helpers) pasted over the starter's verify, verify_one
    left as the TODO: it scores 80/80, and the copy check flags it against minimtp/speculative.py."""
    starter = (ADIR / "spec_sampling" / "student.py").read_text(encoding="utf-8")
    lib = (ROOT / "minimtp" / "speculative.py").read_text(encoding="utf-8")
    pasted = [src for name, src, _ in similarity.functions(lib) if name != "verify_greedy"]
    cut = starter.index("def verify(target_probs")
    sub = tmp_path / "student.py"
    sub.write_text(starter[:cut] + "\n\n".join(pasted) + "\n", encoding="utf-8")
    G = _grader()
    buf = io.StringIO()
    rep = G.grade("spec_sampling", str(sub), out=buf, suite="public")
    report = buf.getvalue()
    assert rep.copies and rep.copies[0].b == "minimtp/speculative.py", report
    assert "[FLAG] copy check" in report and "lines" in report, report
    (a0, a1), (b0, b1) = rep.copies[0].spans[0]
    assert a0 <= a1 and b0 <= b1
    data = G.gradescope_json(rep)
    [entry] = [t for t in data["tests"] if t["name"] == "copy check"]
    assert entry["status"] == "failed" and entry["max_score"] == 0 and entry["visibility"] == "hidden", entry
    assert "minimtp/speculative.py" in entry["output"]


def test_a_pasted_tutorial_submission_is_flagged():
    """Tutorial 07's kernel pasted as the kernel answer (helpers and all) is flagged against tutorial 07."""
    starter = (ADIR / "paged_attention_kernel" / "student.py").read_text(encoding="utf-8")
    tut = (ADIR.parent / "07_triton_paged_attention.py").read_text(encoding="utf-8")
    src = starter + "\n\n" + "\n\n".join(s for _, s, _ in similarity.functions(tut)) + "\n"
    best, flagged = originality.check("paged_attention_kernel", src, library=False)
    assert any(m.b == "tutorials/07_triton_paged_attention.py" for m in flagged), best.describe()


def test_the_fixtures_and_references_are_not_flagged_against_the_library_or_a_tutorial():
    """Measured on every fixture and reference solution: the largest share of their own code found in the
    library's answers or in a tutorial stays below the flag threshold (the numbers: docs/assignments.md)."""
    worst = (0.0, "")
    files = sorted((ADIR / "fixtures").glob("*__*.py")) + sorted((ADIR / "solutions").glob("*.py"))
    for f in files:
        a = f.stem.split("__")[0]
        mine = originality.own_code(a, f.read_text(encoding="utf-8"), False, f.stem)
        refs = list(originality.library_prints(a)) + list(originality.tutorial_prints())
        for r in refs:
            m = similarity.similarity(mine, r)
            worst = max(worst, (m.share, f"{f.stem} ~ {r.name}"))
            assert not m.flagged, f"{f.name}: {m.describe()}"
    assert worst[0] < similarity.FLAG_SHARE, worst


def test_the_library_mode_submission_is_compared_by_its_holes():
    """A filled library file is compared by its holes only (the rest is the library, given to everyone): the
    library's own bodies are flagged, the released holes are not."""
    lib = (ROOT / "minimtp" / "kv_cache.py").read_text(encoding="utf-8")
    best, flagged = originality.check("kv_rollback", lib, library=True)
    assert flagged and flagged[0].b == "minimtp/kv_cache.py" and flagged[0].share == 1.0
    cut = holes.cut(lib, holes.holes_of("minimtp/kv_cache.py"), {})
    _, flagged = originality.check("kv_rollback", cut, library=True)
    assert not flagged  # the released holes (signatures and raises) are nobody's copy


def test_roster_mode_flags_the_classmate_copy_and_writes_every_results_json(tmp_path):
    roster = tmp_path / "roster"
    (roster / "alice").mkdir(parents=True)
    (roster / "alice" / "student.py").write_text(INDEPENDENT_KV, encoding="utf-8")
    (roster / "bob").mkdir()
    (roster / "bob" / "student.py").write_text(_renamed(INDEPENDENT_KV), encoding="utf-8")
    (roster / "carol.py").write_text((ADIR / "solutions" / "kv_rollback.py").read_text(encoding="utf-8"))
    (roster / "dave").mkdir()  # nothing to grade: still a results.json, score 0
    out = tmp_path / "out"
    cmd = [sys.executable, str(ADIR / "grade.py"), "kv_rollback", "--roster", str(roster), "--out", str(out),
           "--hidden-secret", "course-secret"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = {r["student"]: r for r in csv.DictReader((out / "roster.csv").open(encoding="utf-8"))}
    assert set(rows) == {"alice", "bob", "carol", "dave"}, rows
    for sid in rows:
        data = json.loads((out / sid / "results.json").read_text(encoding="utf-8"))
        assert set(data) == {"score", "execution_time", "output", "tests"}
    assert float(rows["alice"]["score"]) == 80 and float(rows["bob"]["score"]) == 80, rows
    assert float(rows["dave"]["score"]) == 0 and "not graded" in rows["dave"]["status"]
    assert rows["bob"]["flagged"] == "yes" and "classmate alice" in rows["bob"]["copy_check"], rows["bob"]
    assert "classmate bob" in rows["alice"]["copy_check"], rows["alice"]
    assert "lines" in rows["bob"]["copy_check"]  # the spans of both files
    # alice's only flag is bob: her independent answer is not the reference's, the library's or carol's
    assert "reference" not in rows["alice"]["copy_check"] and "minimtp/" not in rows["alice"]["copy_check"]
    assert "classmate carol" not in rows["alice"]["copy_check"]
    hidden = json.loads((out / "alice" / "results.json").read_text(encoding="utf-8"))
    assert "student alice" in hidden["output"]  # the hidden suite was drawn for her
