"""Shared test setup: the Triton interpreter on machines without a GPU, one CPU thread per test process, the
embedded default model checked once, and the fixtures several test files use (tiny HF checkpoints saved once per
session, untied pairs, assistants with either head). The shared code itself is in ``support/``."""

from __future__ import annotations

import functools
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

sys.path.insert(0, os.path.dirname(__file__))  # for the support package
from support.common import missing_default_model  # noqa: E402
from support.drafting import hf_pair  # noqa: E402
from support.hf_models import patch_transformers, saved_pair  # noqa: E402
from support.untied import untie_minimtp  # noqa: E402

import minimtp  # noqa: E402


def pytest_sessionstart(session):
    """The embedded default model ships inside the package: without it the install is broken, and every test on
    it would fail for that one reason. Stop here and say so."""
    missing = missing_default_model()
    if missing:
        raise pytest.UsageError(
            f"the embedded default model is incomplete, missing {', '.join(missing)}: a broken install or checkout "
            "(it ships in minimtp/default_model/; restore it, e.g. git checkout -- minimtp/default_model)"
        )


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


@pytest.fixture(scope="module")
def untied_pair(saved):
    """``untied_pair(family) -> (target, assistant)``, fp32, the target's head untied (``support.untied``); once
    per test module."""

    @functools.cache
    def get(family: str):
        tdir, adir = saved(family)
        target = untie_minimtp(minimtp.load_target(tdir))
        return target, minimtp.load_assistant(adir, target)

    return get


@pytest.fixture(scope="module")
def assistant_dir(saved, tmp_path_factory):
    """``assistant_dir(family, ordered) -> (target_dir, assistant_dir)``; the default head comes from ``saved``."""
    root = tmp_path_factory.mktemp("assistants")

    @functools.cache
    def get(family: str, ordered: bool):
        tdir, adir = saved(family)
        if ordered != (family == "e2b"):  # hf_models' default: centroid head for e2b, dense head otherwise
            adir = str(root / f"{family}-{'ordered' if ordered else 'dense'}")
            hf_pair(family, ordered)[1].save_pretrained(adir)
        return tdir, adir

    return get


@pytest.fixture(autouse=True)
def _restore_denormals():
    """The CLI and bench call torch.set_flush_denormal(True) (process-wide FTZ/DAZ); undo it after each test so
    later tests (hypothesis draws subnormal floats) see IEEE arithmetic."""
    yield
    torch.set_flush_denormal(False)
