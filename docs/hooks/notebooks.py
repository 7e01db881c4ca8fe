"""mkdocs hook: put Jupyter notebooks of the tutorials into the built site, for download.

For every ``tutorials/NN_topic.py`` it adds ``notebooks/NN_topic.ipynb`` (converted by ``scripts/make_notebooks.py``,
i.e. ``jupytext --to ipynb``, without outputs) and the helper modules the tutorials import (``notebooks/_tiny.py``),
so that a reader downloads a notebook and its helper into one folder and runs it top to bottom. Generated on every
build, never committed; pages link to them like to any file of the site.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import nbformat
from mkdocs.structure.files import File

PREFIX = "notebooks"


def _make_notebooks(config):
    path = Path(config.config_file_path).parent / "scripts" / "make_notebooks.py"
    spec = importlib.util.spec_from_file_location("minimtp_docs_make_notebooks", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def on_files(files, config):
    mk = _make_notebooks(config)
    for src in mk.tutorials():
        files.append(File.generated(config, f"{PREFIX}/{src.stem}.ipynb", content=nbformat.writes(mk.convert(src))))
    for helper in sorted(mk.TUTORIALS.glob("_*.py")):
        files.append(File.generated(config, f"{PREFIX}/{helper.name}", content=helper.read_bytes()))
    return files
