"""The README's commands as a newcomer runs them: from the repository root, in child processes, with a package
named ``kernels`` importable — Hugging Face's own where pip installed it (transformers >= 5.25 depends on it and
imports it while loading a tokenizer), a stub of it otherwise.

``python -m`` puts the working directory first on ``sys.path``, so any top-level folder of the repository that
is a regular package (it has an ``__init__.py``) hides an installed distribution of the same name. The Triton
twins live in the top-level ``kernels/`` folder for that reason without an ``__init__.py``: a namespace
portion, which an installed regular package always wins over; ``minimtp/kernels`` links to it, so they import
as ``minimtp.kernels`` in editable installs, wheels and sdists alike.
"""

from __future__ import annotations

import importlib.metadata
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.smoke


@pytest.fixture(scope="module")
def newcomer_env(tmp_path_factory) -> tuple[dict, str]:
    """The environment of a child process with a package named ``kernels`` importable, and the file that
    ``import kernels`` must resolve to: the installed distribution's, or a stub on ``PYTHONPATH``."""
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    try:
        installed = importlib.metadata.distribution("kernels")
        return env, str(installed.locate_file("kernels/__init__.py"))
    except importlib.metadata.PackageNotFoundError:
        pass
    stub = tmp_path_factory.mktemp("stub") / "kernels"
    stub.mkdir()
    (stub / "__init__.py").write_text('"""A stand-in for the PyPI package of this name."""\n')
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(stub.parent), env.get("PYTHONPATH")) if p)
    return env, str(stub / "__init__.py")


def run_from_root(env: dict, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_no_top_level_folder_is_a_regular_package():
    """A top-level ``__init__.py`` or module would shadow an installed distribution of that name."""
    shadows = [p.name for p in ROOT.iterdir() if p.suffix == ".py" or (p / "__init__.py").exists()]
    assert shadows == ["minimtp"]


def test_import_kernels_from_the_root_finds_the_installed_package(newcomer_env):
    env, expected = newcomer_env
    proc = run_from_root(env, "-c", "import kernels, minimtp.kernels.runtime; print(kernels.__file__)")
    assert proc.returncode == 0, proc.stderr
    assert os.path.samefile(proc.stdout.strip(), expected)


def test_readme_first_command_from_the_root(newcomer_env):
    env, _ = newcomer_env
    proc = run_from_root(env, "-m", "minimtp.generate", "--prompt", "def fibonacci(n):", "--max-new-tokens", "8")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip(), "no text generated"
    assert "draft acceptance rate" in proc.stderr


@pytest.mark.parametrize(
    "module", ["minimtp.bench", "minimtp.train", "minimtp.serve", "minimtp.kernels.bench", "minimtp.audit"]
)
def test_every_entry_point_starts_from_the_root(newcomer_env, module):
    env, _ = newcomer_env
    proc = run_from_root(env, "-m", module, "--help")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage:")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_from_the_root_answers_health(newcomer_env):
    env, _ = newcomer_env
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "minimtp.serve", "--port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        status = None
        while status is None and time.monotonic() < deadline and server.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                    status = response.status
            except OSError:
                time.sleep(0.5)
        assert status == 200, f"server exited {server.poll()}: {server.stderr.read() if server.poll() else ''}"
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_every_package_folder_is_installed():
    """A wheel or an sdist holds the packages ``pyproject.toml`` lists: every folder of ``minimtp/`` with Python in
    it must be one of them (an editable install would hide a missing one)."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]["packages"])
    folders = {
        ".".join(Path(d).relative_to(ROOT).parts)
        for d, _, files in os.walk(ROOT / "minimtp", followlinks=True)  # minimtp/kernels is a link
        if any(f.endswith(".py") for f in files)
    }
    assert folders == listed
