"""CI's tutorial runs: every ``tutorials/NN_topic.py`` must run as a plain script and end without error.

Each tutorial ends with ``assert`` checks of its own results, so exit status 0 means "the numbers the tutorial
shows are right", not just "it did not crash". ``MINIMTP_FAST=1`` shrinks sample counts and training steps; with
it each tutorial takes about 5-15 s on a 2-core CPU (~90 s for all of them).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TUTORIALS = sorted(p for p in (ROOT / "tutorials").glob("[0-9][0-9]_*.py"))


def test_tutorials_exist():
    assert len(TUTORIALS) >= 9, [p.name for p in TUTORIALS]


@pytest.mark.parametrize("path", TUTORIALS, ids=[p.stem for p in TUTORIALS])
def test_tutorial_runs(path: Path, tmp_path):
    env = dict(os.environ, MINIMTP_FAST="1", MPLBACKEND="Agg", OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
    proc = subprocess.run(
        [sys.executable, str(path)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    out = (proc.stdout + proc.stderr)[-4000:]
    assert proc.returncode == 0, f"{path.name} exited with {proc.returncode}:\n{out}"
    assert f"tutorial {path.stem[:2]} OK" in proc.stdout, out
