"""The design, checked: one single-path reference, its twins and its tooling beside it (docs: reference-and-twins).

* the reference (the pipeline modules at ``minimtp/`` top level, and ``minimtp/controls/``) imports only modules
  before it in the pipeline: never the tooling (the CLI, serving, benchmarks, training), never a fast twin; a
  Triton kernel only inside the backend switch;
* the reference mentions no fast-path machinery (fused / prepacked / quantized matmuls, version counters);
* the package's imports form no cycle;
* the code is laid out by ``ruff format`` alone: no ``# fmt: skip``.

Sizes are reported, not capped: ``python scripts/line_counts.py``.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# the path of a token, in order: a module may import the ones before it (docs: index, "The path of a token")
PIPELINE = [
    "errors",
    "config",
    "checkpoint",
    "tokenizer",
    "attention",
    "kv_cache",
    "model",
    "assistant",
    "sampling",
    "speculative",
    "controls.penalties",
    "controls.grammar",
    "controls.token_healing",
    "controls.logits",
    "controls.stop_strings",
    "controls",
    "settings",
    "stats",
    "request",
    "scheduler",
    "engine",
    "decode",
]
TOOLING = (
    "minimtp.generate",
    "minimtp.flags",
    "minimtp.serve",
    "minimtp.bench",
    "minimtp.train",
    "minimtp.audit",
    "minimtp.hf_compat",
)
FORBIDDEN = re.compile(r"\bfused|prepack|\bint8|onednn|_version|__setattr__", re.IGNORECASE)


def module_path(name: str) -> Path:
    path = ROOT / "minimtp" / Path(*name.split("."))
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def imports(path: Path) -> list[tuple[str, bool]]:
    """(imported minimtp module, at module level?) for every import in the file."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("minimtp"):
            names = [f"{node.module}.{a.name}" if node.module == "minimtp" else node.module for a in node.names]
            out += [(n, node.col_offset == 0) for n in names]
        elif isinstance(node, ast.Import):
            out += [(a.name, node.col_offset == 0) for a in node.names if a.name.startswith("minimtp")]
    return out


def test_the_pipeline_lists_every_reference_module():
    top = {p.stem for p in (ROOT / "minimtp").glob("*.py")} - {"__init__", "generate", "flags", "hf_compat"}
    controls = {f"controls.{p.stem}" for p in (ROOT / "minimtp" / "controls").glob("*.py")} - {"controls.__init__"}
    assert set(PIPELINE) == top | controls | {"controls"}


@pytest.mark.parametrize("name", PIPELINE)
def test_the_reference_imports_only_what_comes_before_it(name):
    earlier = {f"minimtp.{m}" for m in PIPELINE[: PIPELINE.index(name)]}
    for module, top_level in imports(module_path(name)):
        if module.startswith("minimtp.kernels"):  # the backend switch loads a Triton twin on request only
            assert not top_level, f"minimtp/{name}: imports {module} at module level"
            continue
        assert not module.startswith(TOOLING), f"minimtp/{name} imports the tooling module {module}"
        assert not module.startswith("minimtp.fast"), f"minimtp/{name} imports the fast twin {module}"
        assert module in earlier, f"minimtp/{name} imports {module}, which comes later in the pipeline (or is unknown)"


@pytest.mark.parametrize("name", PIPELINE)
def test_the_reference_is_single_path(name):
    src = module_path(name).read_text(encoding="utf-8")
    hits = [(i + 1, line.strip()) for i, line in enumerate(src.splitlines()) if FORBIDDEN.search(line)]
    assert not hits, f"minimtp/{name} mentions fast-path machinery: {hits[:3]}"


def test_the_package_has_no_import_cycle():
    """Module-level imports between minimtp's modules (a package's ``__init__`` counts as the package)."""
    graph = {}
    for path in (ROOT / "minimtp").rglob("*.py"):
        rel = path.relative_to(ROOT).with_suffix("")
        name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        graph[name] = {m for m, top in imports(path) if top}

    def resolve(m):  # "minimtp.fast.optimize.FastEngine" -> the module that defines it
        while m not in graph and "." in m:
            m = m.rsplit(".", 1)[0]
        return m

    state: dict[str, int] = {}

    def visit(node, stack):
        state[node] = 1
        for dep in sorted(resolve(m) for m in graph.get(node, ())):
            if dep == node or dep not in graph:
                continue
            assert state.get(dep) != 1, f"import cycle: {' -> '.join([*stack, node, dep])}"
            if dep not in state:
                visit(dep, [*stack, node])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])


def test_no_fmt_skip():
    hits = [
        str(p.relative_to(ROOT))
        for folder in ("minimtp", "kernels")
        for p in (ROOT / folder).rglob("*.py")
        if "fmt: skip" in p.read_text(encoding="utf-8")
    ]
    assert not hits, f"laid out by hand instead of by ruff format: {hits}"
