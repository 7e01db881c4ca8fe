"""Shared test setup: the Triton interpreter on machines without a GPU, one CPU thread per test process, tiny HF
checkpoints saved once per session."""

from __future__ import annotations

import os
import sys

# The one place the tests choose how Triton kernels run (minimtp itself never sets it; docs/concepts/kernels.md).
# @triton.jit decides interpreted vs compiled when it decorates, and torch / transformers may import triton early,
# so this comes before any other import. Interpreter unless the machine has an NVIDIA device node — decided
# without importing torch. An explicit TRITON_INTERPRET=0 / =1 in the environment wins. Subprocesses inherit it;
# the compile check (tests/test_kernel_compile.py) strips it.
if not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from hf_models import patch_transformers, saved_pair  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    """The test machine is small and shared: keep torch to one intra-op thread."""
    torch.set_num_threads(1)
    patch_transformers()
    yield


@pytest.fixture(scope="session")
def hf_root(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("hf_models"))


@pytest.fixture(scope="session")
def saved(hf_root):
    """``saved(family, layout="text", dtype="float32") -> (target_dir, assistant_dir)``, each saved once."""

    def get(family: str, layout: str = "text", dtype: str = "float32") -> tuple[str, str]:
        return saved_pair(hf_root, family, layout, dtype)

    return get


@pytest.fixture(autouse=True)
def _restore_denormals():
    """The CLI and bench call torch.set_flush_denormal(True) (process-wide FTZ/DAZ); undo it after each test so
    later tests (hypothesis draws subnormal floats) see IEEE arithmetic."""
    yield
    torch.set_flush_denormal(False)
