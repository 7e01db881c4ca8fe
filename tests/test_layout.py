"""The design rule, checked: one single-path reference, its twins beside it (docs: reference-and-twins).

* the reference modules mention no fast-path machinery (fused / prepacked / quantized matmuls, version counters)
  and import nothing from the twins (the two backend switches load a Triton kernel on request only);
* every module of the package stays one readable concept: at most 400 lines.

"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = ["config", "checkpoint", "model", "assistant", "kv_cache", "attention", "sampling", "speculative"]
REFERENCE += ["decode", "engine", "request", "errors", "stats"]
CONTROLS = ["controls", "grammar", "token_healing", "stop_strings"]  # what users steer p with (docs: concepts/controls)
SERVING = ["scheduler", "serving", "serve"]  # continuous batching and the HTTP server (docs: guides/serving)
FORBIDDEN = re.compile(r"fused|prepack|\bint8|onednn|_version|__setattr__", re.IGNORECASE)


@pytest.mark.parametrize("name", REFERENCE + CONTROLS + SERVING)
def test_reference_is_single_path(name):
    src = (ROOT / "minimtp" / f"{name}.py").read_text(encoding="utf-8")
    hits = [(i + 1, line.strip()) for i, line in enumerate(src.splitlines()) if FORBIDDEN.search(line)]
    assert not hits, f"minimtp/{name}.py mentions fast-path machinery: {hits[:3]}"
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, ast.ImportFrom) and node.module:
            assert not node.module.startswith("minimtp.fast"), f"minimtp/{name}.py imports {node.module}"
            if node.module.startswith("minimtp.kernels"):  # only the backend switch, inside a function
                assert node.col_offset > 0, f"minimtp/{name}.py imports {node.module} at module level"


def test_modules_are_short():
    """(The Triton kernels are exempt: one file per kernel with its wrapper, self-check and notes, as the Triton
    tutorials are written.)"""
    sizes = {
        str(p.relative_to(ROOT)): len(p.read_text(encoding="utf-8").splitlines()) for p in ROOT.glob("minimtp/**/*.py")
    }
    long = {k: n for k, n in sizes.items() if n > 400}
    assert not long, f"over 400 lines: {long}"


def _lines(names) -> int:
    return sum(len((ROOT / "minimtp" / f"{n}.py").read_text(encoding="utf-8").splitlines()) for n in names)


def test_reference_core_size():
    """The nine core modules with request.py, errors.py and stats.py: the reference a reader reads, at most 2,330
    lines together (2,095 before the controls and per-request settings, 2,292 before chunked prefill and the
    KV-shared prefill); the controls beside them at most 450; the scheduler and the server at most 750."""
    assert _lines([n for n in REFERENCE if n != "decode"]) <= 2330
    assert _lines(CONTROLS) <= 450
    assert _lines(SERVING) <= 750
