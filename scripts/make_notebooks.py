"""Make Jupyter notebooks (``.ipynb``) of the tutorials from their jupytext sources.

    python scripts/make_notebooks.py OUT              # OUT/NN_topic.ipynb for every tutorials/NN_topic.py
    python scripts/make_notebooks.py OUT 04 06        # only tutorials 04 and 06
    python scripts/make_notebooks.py OUT --execute    # and run each one top to bottom, saving its outputs

The tutorials are percent-format scripts (``# %%`` cells), the form the tests run and the docs render; this script
converts them with jupytext (the same as ``jupytext --to ipynb``) and copies the helper modules they import
(``tutorials/_*.py``, e.g. ``_tiny.py``) next to them, so ``jupyter lab OUT`` opens them and each runs top to bottom
with OUT as its working directory (``pip install -e ".[dev]"`` provides minimtp, jupytext, nbclient and ipykernel).
Tutorials 07 and 08 set ``TRITON_INTERPRET=1`` in their first cell, before anything imports torch or triton, so run
them in a fresh kernel. ``MINIMTP_FAST=1`` in the environment Jupyter starts from shrinks the sample counts, as for
the scripts. Generated notebooks are not committed: make them when you need them.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import jupytext
import nbformat

ROOT = Path(__file__).resolve().parent.parent
TUTORIALS = ROOT / "tutorials"
KERNELSPEC = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}


def tutorials(only: list[str] | None = None) -> list[Path]:
    """The numbered tutorials, in order; ``only`` selects by number prefix ("04") or stem."""
    paths = sorted(TUTORIALS.glob("[0-9][0-9]_*.py"))
    if only:
        paths = [p for p in paths if any(p.stem == o or p.stem.startswith(f"{o}_") for o in only)]
    return paths


def convert(src: Path) -> nbformat.NotebookNode:
    """The notebook of one percent-format tutorial: its cells, a Python 3 kernelspec, no jupytext pairing."""
    nb = jupytext.read(src, fmt="py:percent")
    nb.metadata.pop("jupytext", None)  # a standalone notebook, not paired with the script
    nb.metadata["kernelspec"] = dict(KERNELSPEC)
    nb.metadata["language_info"] = {"name": "python"}
    nbformat.validate(nb)
    return nb


def make(out: Path, only: list[str] | None = None) -> list[Path]:
    """Write ``out/<stem>.ipynb`` for the selected tutorials and copy the helper modules; returns the notebooks."""
    out.mkdir(parents=True, exist_ok=True)
    for helper in sorted(TUTORIALS.glob("_*.py")):
        shutil.copy2(helper, out / helper.name)
    written = []
    for src in tutorials(only):
        dst = out / f"{src.stem}.ipynb"
        nbformat.write(convert(src), dst)
        written.append(dst)
    return written


def execute(path: Path, timeout: int = 600) -> nbformat.NotebookNode:
    """Run the notebook top to bottom in a fresh kernel, with its folder as working directory; save the outputs.
    Raises ``nbclient.exceptions.CellExecutionError`` on the first cell that fails."""
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(
        nb, timeout=timeout, kernel_name=KERNELSPEC["name"], resources={"metadata": {"path": str(path.parent)}}
    )
    client.execute()
    nbformat.write(nb, path)
    return nb


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path, help="output folder (created)")
    ap.add_argument("only", nargs="*", help="tutorial numbers or stems (default: all)")
    ap.add_argument("--execute", action="store_true", help="run each notebook and save its outputs")
    ap.add_argument("--timeout", type=int, default=600, help="seconds per cell when executing (default 600)")
    args = ap.parse_args(argv)
    written = make(args.out, args.only or None)
    if not written:
        print(f"no tutorial matches {args.only}", file=sys.stderr)
        return 2
    for nb in written:
        if args.execute:
            execute(nb, args.timeout)
        print(nb)
    return 0


if __name__ == "__main__":
    sys.exit(main())
