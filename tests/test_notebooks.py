"""The tutorials as Jupyter notebooks: ``scripts/make_notebooks.py`` converts every jupytext source to a valid
``.ipynb`` that runs top to bottom in a fresh kernel (nbclient), with ``MINIMTP_FAST=1``.

The default run executes a few of the quickest notebooks (a few seconds each); the ``slow`` test executes all of
them, including 07 and 08, whose first cell selects the Triton interpreter before anything imports torch.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
pytest.importorskip("nbclient")
pytest.importorskip("jupytext")
pytest.importorskip("ipykernel")

ROOT = Path(__file__).resolve().parent.parent
QUICK = ["02", "04", "06"]


def _make_notebooks():
    spec = importlib.util.spec_from_file_location("minimtp_make_notebooks", ROOT / "scripts" / "make_notebooks.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


mk = _make_notebooks()
ALL = [p.stem[:2] for p in mk.tutorials()]


@pytest.fixture
def fast_env(monkeypatch):
    """The environment the kernels inherit: small sample counts, headless plots, one thread."""
    monkeypatch.setenv("MINIMTP_FAST", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("PYTHONDONTWRITEBYTECODE", "1")


def test_every_tutorial_converts(tmp_path):
    written = mk.make(tmp_path)
    assert [p.stem for p in written] == [p.stem for p in mk.tutorials()] and len(written) >= 9
    assert (tmp_path / "_tiny.py").is_file(), "the helper module the tutorials import must sit next to them"
    for path in written:
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        assert nb.metadata.kernelspec["name"] == "python3"
        kinds = {c.cell_type for c in nb.cells}
        assert kinds == {"markdown", "code"}, (path.name, kinds)
        assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith(f"# {path.stem[:2]}"), path.name
        src = (mk.TUTORIALS / f"{path.stem}.py").read_text(encoding="utf-8")
        code_cells = len(re.findall(r"^# %%$", src, re.MULTILINE))
        assert sum(c.cell_type == "code" for c in nb.cells) == code_cells, path.name
        if path.stem[:2] in ("07", "08"):
            first = next(c for c in nb.cells if c.cell_type == "code")
            assert 'os.environ["TRITON_INTERPRET"] = "1"' in first.source and "import torch" not in first.source, (
                path.name
            )


def _code_in_markdown(nb) -> list[str]:
    """Lines of markdown cells that look like Python statements: a ``# %%`` missing in the percent-format source
    turns the code after it into text, which the script runs but the notebook does not."""
    pat = re.compile(r"^(print\(|assert |import |from \w+ import |[a-z_]\w* = )")
    return [ln for c in nb.cells if c.cell_type == "markdown" for ln in c.source.splitlines() if pat.match(ln)]


@pytest.mark.parametrize("stem", ALL)
def test_no_code_hidden_in_markdown_cells(stem):
    (src,) = mk.tutorials([stem])
    lines = _code_in_markdown(mk.convert(src))
    assert not lines, f"{src.name}: code inside a markdown cell (a '# %%' is missing before it): {lines}"


def _execute(stem: str, tmp_path: Path) -> None:
    (path,) = mk.make(tmp_path, [stem])
    nb = mk.execute(path, timeout=600)  # raises CellExecutionError at the first failing cell
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.get("execution_count") for c in code), f"{path.name}: not every code cell ran"
    errors = [out for c in code for out in c.get("outputs", []) if out.get("output_type") == "error"]
    assert not errors, errors
    text = "".join(out.get("text", "") for c in code for out in c.get("outputs", []))  # stream outputs
    marker = f"tutorial {stem} OK"
    if any(marker in c.source for c in code):
        assert marker in text, f"{path.name} did not run to its last cell:\n{text[-2000:]}"


@pytest.mark.parametrize("stem", QUICK)
def test_quick_notebooks_execute(stem, tmp_path, fast_env):
    _execute(stem, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("stem", [s for s in ALL if s not in QUICK])
def test_all_notebooks_execute(stem, tmp_path, fast_env):
    _execute(stem, tmp_path)
