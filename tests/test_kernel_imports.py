"""Importing the kernels has no side effects, and the interpreter is the caller's explicit choice.

* ``import minimtp.kernels`` (and ``.paged_attention``, ``.verify``, ``.runtime``) writes no environment variable
  and rebinds no attribute of any ``triton`` module — with the interpreter on, off, and switched on too late.
* Interpreter off + CPU tensors: every wrapper raises ``CompatibilityError`` with the one-line fix.
* ``TRITON_INTERPRET=1`` set after ``triton`` was imported: ``CompatibilityError`` saying so, not Triton's
  "Cannot call @triton.jit'd outside of the scope of a kernel".

Each case runs in a fresh interpreter (``@triton.jit`` decides its mode at import), with ``TRITON_INTERPRET``
set or removed explicitly, whatever conftest.py chose for this process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from minimtp.kernels.runtime import NEEDS_CUDA, SET_TOO_LATE

ROOT = Path(__file__).resolve().parents[1]

# Snapshot os.environ and every triton module's namespace (object identities), import the kernel modules,
# compare. torch / triton are imported first: what they do at import is theirs; a newly imported triton
# submodule shows up as a new module attribute of its parent package, which is not a patch.
SNAPSHOT = """
import json, os, sys, types
import torch, triton, triton.language
{before}

def triton_namespaces():
    return {{name: {{k: id(v) for k, v in vars(m).items()}}
            for name, m in list(sys.modules.items()) if name.split(".")[0] == "triton" and m is not None}}

env0, ns0 = dict(os.environ), triton_namespaces()
import minimtp.kernels, minimtp.kernels.paged_attention, minimtp.kernels.runtime, minimtp.kernels.verify
env1, ns1 = dict(os.environ), triton_namespaces()

changed_env = sorted(k for k in env0.keys() | env1.keys() if env0.get(k) != env1.get(k))
patched = []
for name, before in ns0.items():
    module = sys.modules[name]
    for k, v in vars(module).items():
        if k in before and before[k] != id(v):
            patched.append(f"{{name}}.{{k}} rebound")
        elif k not in before and not isinstance(v, types.ModuleType):
            patched.append(f"{{name}}.{{k}} added")
    patched += [f"{{name}}.{{k}} deleted" for k in before.keys() - vars(module).keys()]
print(json.dumps({{"env": changed_env, "patched": patched}}))
"""


def _python(code: str, interpret: str | None, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "TRITON_DEFAULT_FP_FUSION")}
    if interpret is not None:
        env["TRITON_INTERPRET"] = interpret
    env.setdefault("OMP_NUM_THREADS", "1")
    return subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.parametrize(
    "interpret,before",
    [
        (None, ""),  # compiled (GPU) mode
        ("1", ""),  # interpreter, set before Python started
        (None, "os.environ['TRITON_INTERPRET'] = '1'"),  # set after triton was imported: still nothing patched
    ],
    ids=["interpreter-off", "interpreter-on", "set-too-late"],
)
def test_importing_the_kernels_changes_no_environment_and_no_triton_attribute(interpret, before):
    proc = _python(SNAPSHOT.format(before=before), interpret)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {"env": [], "patched": []}


CALL_ALL = """
import torch
from minimtp.errors import CompatibilityError
from minimtp.kernels import paged_attention as pa, verify as kv
from minimtp.kernels.paged_attention import _random_case

B, K, V = 2, 2, 40
p = torch.softmax(torch.randn(B, K + 1, V), -1)
d, nd = torch.zeros(B, K, dtype=torch.int64), torch.full((B,), K)
u, e = torch.rand(B, K, dtype=torch.float64), torch.ones(B, V)
calls = {
    "paged_attention": lambda: pa.paged_attention(*_random_case([1], [5], 4, 2, 16, 16, torch.float32, "cpu")),
    "verify": lambda: kv.verify(p, d, None, nd, u, e),
    "verify_greedy": lambda: kv.verify_greedy(p, d, nd),
}
for name, call in calls.items():
    try:
        call()
        print(name, "ran")
    except CompatibilityError as err:
        print(name, "CompatibilityError:", err)
"""


def _outcomes(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = [line.split(" ", 1) for line in proc.stdout.splitlines() if line.startswith(("paged", "verify"))]
    return dict(lines)


def test_cpu_tensors_without_the_interpreter_raise_compatibility_error():
    got = _outcomes(_python(CALL_ALL, None))
    want = f"CompatibilityError: {NEEDS_CUDA}"
    assert got == {"paged_attention": want, "verify": want, "verify_greedy": want}
    assert "\n" not in NEEDS_CUDA and "TRITON_INTERPRET=1" in NEEDS_CUDA


def test_interpreter_set_after_triton_was_imported_raises_compatibility_error():
    late = "import os, triton\nos.environ['TRITON_INTERPRET'] = '1'\n"
    got = _outcomes(_python(late + CALL_ALL, None))
    want = f"CompatibilityError: {SET_TOO_LATE}"
    assert got == {"paged_attention": want, "verify": want, "verify_greedy": want}


@pytest.mark.interp
def test_interpreter_set_before_python_starts_runs_after_transformers():
    """The documented opt-in: TRITON_INTERPRET=1 exported before Python starts, transformers' model code (which
    imports triton) imported first, then the kernels — they run, no re-wrapping of Triton's standard library."""
    first = "import sys, transformers.modeling_utils\nassert 'triton' in sys.modules\n"
    got = _outcomes(_python(first + CALL_ALL, "1"))
    assert got == {"paged_attention": "ran", "verify": "ran", "verify_greedy": "ran"}
