"""Ahead-of-time compilation of every Triton kernel variant for sm_80 and sm_90 — no GPU needed.

The interpreter (which the other kernel tests use) accepts programs the GPU compiler rejects (``tl.dot`` with
K < 16, type errors in the GPU-only bf16 path) and says nothing about shared memory. So
``tests/support/kernel_compile_check.py`` records the launches of the real wrappers and compiles each distinct variant
to cubin with Triton's bundled ptxas, checking ``metadata.shared`` against the per-block limit (sm_80: 163 KiB,
sm_90: 227 KiB). It must run in a process where the interpreter is off, hence the subprocess, whose environment
leaves out the ``TRITON_INTERPRET=1`` that conftest.py sets for the other tests.

Cost: ~100 variants x 2 targets; a few minutes with a cold cache, seconds warm (cache: ``$TRITON_CACHE_DIR`` or
``.cache/triton`` in the repository).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "support" / "kernel_compile_check.py"


def _clean_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_CACHE_DIR", str(ROOT / ".cache" / "triton"))
    return env


def _run(*args: str, timeout: int = 1800) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        env=_clean_env(),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.compile
def test_every_variant_compiles_for_sm80_and_sm90(tmp_path):
    out = tmp_path / "compile.json"
    proc = _run("--json", str(out))
    tail = (proc.stdout + proc.stderr)[-6000:]
    assert out.exists(), tail
    summary = json.loads(out.read_text())
    failed = [f"{r['arch']} {r['variant']}: {r['error']}" for r in summary["results"] if not r["ok"]]
    assert not failed, "\n".join(failed)
    assert proc.returncode == 0, tail
    kernels = {r["variant"].split("(")[0] for r in summary["results"]}
    assert kernels == {
        "paged_attention._paged_attention_kernel",
        "paged_attention._reduce_segments_kernel",
        "verify._greedy_argmax_kernel",
        "verify._greedy_finish_kernel",
        "verify._race_kernel",
        "verify._race_finish_kernel",
    }
    assert summary["variants"] >= 90 and summary["compiles"] == 2 * summary["variants"]
    peak = {a: max(r["shared"] for r in summary["results"] if r["arch"] == a) for a in ("sm_80", "sm_90")}
    print(f"\n{summary['compiles']} compiles in {summary['seconds']} s; peak shared memory {peak}")


@pytest.mark.compile
def test_the_check_can_fail():
    """An fp16 ``tl.dot`` with K = 8 runs under the interpreter but must be rejected by the compile check."""
    proc = _run("--bad-dot", timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "K >= 16" in proc.stdout + proc.stderr


def test_bench_script_imports_and_helps_without_gpu():
    env = {k: v for k, v in os.environ.items()}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "kernels" / "bench.py"), "--help"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "bandwidth" in proc.stdout
