"""mkdocs hook: publish the top-level ``tutorials/*.py`` (jupytext percent format) as notebook pages.

The tutorials live next to the package, not under ``docs/``, so that they run as plain scripts
(``python tutorials/01_x.py``) and the test suite can smoke-test them. This hook

* adds every ``tutorials/[!_]*.py`` to the site as ``tutorials/<name>.py`` (mkdocs-jupyter, configured with
  ``include: ["tutorials/*.py"]``, then renders it as a notebook; the hook runs before it);
* appends a "Tutorials" nav section listing them in file-name order, unless ``mkdocs.yml``'s nav already has a
  section of that name (then the explicit list wins);
* watches the folder under ``mkdocs serve``;
* puts the pages in ``OPTIONAL_PAGES`` into their nav section once their file exists (pages written in parallel
  with the rest of the site; a nav entry for a missing file would fail the strict build);
* when mkdocs-jupyter has ``execute: true``, executes only the tutorials that plot (those importing matplotlib), so
  that their figures appear on the page, and renders the others from source: every other tutorial is added to
  ``execute_ignore``. The kernel inherits ``MINIMTP_FAST=1`` (small sample counts; set ``MINIMTP_FAST=0`` for the
  full run) and an IPython startup file (``show_figures.py``) that displays the figures the tutorial leaves open,
  since the tutorials select the non-interactive Agg backend.

So adding a tutorial is: drop ``tutorials/NN_topic.py`` (first markdown cell ``# Title``) and rebuild.
"""

from __future__ import annotations

import atexit
import os
import re
import shutil
import tempfile
from pathlib import Path, PurePath

from mkdocs.plugins import event_priority
from mkdocs.structure.files import File

SECTION = "Tutorials"
# section -> [(title, path under docs/)], appended to that nav section when the file exists and is not listed yet.
OPTIONAL_PAGES = {"Concepts": [("Triton kernels", "concepts/kernels.md")]}
# A tutorial that imports matplotlib makes a plot: it is executed during the build (when mkdocs-jupyter's
# execute is on) so that the page shows the figure.
PLOTS = re.compile(r"^\s*(?:import|from)\s+matplotlib\b", re.MULTILINE)
_IPYTHONDIR: str | None = None


def _tutorial_dir(config) -> Path:
    return Path(config.config_file_path).parent / "tutorials"


def _tutorials(config) -> list[Path]:
    d = _tutorial_dir(config)
    return sorted(p for p in d.glob("*.py") if not p.name.startswith("_")) if d.is_dir() else []


def _add_optional_pages(config) -> None:
    docs = Path(config.docs_dir)
    for section, pages in OPTIONAL_PAGES.items():
        entries = next((item[section] for item in config.nav if isinstance(item, dict) and section in item), None)
        if entries is None:
            continue
        listed = {e if isinstance(e, str) else next(iter(e.values())) for e in entries}
        for title, path in pages:
            if (docs / path).is_file() and path not in listed:
                entries.append({title: path})


def _ipython_dir() -> str:
    """A throw-away IPYTHONDIR whose default profile runs ``show_figures.py`` at kernel start-up."""
    global _IPYTHONDIR
    if _IPYTHONDIR is None:
        _IPYTHONDIR = tempfile.mkdtemp(prefix="minimtp-docs-ipython-")
        atexit.register(shutil.rmtree, _IPYTHONDIR, ignore_errors=True)
        startup = Path(_IPYTHONDIR, "profile_default", "startup")
        startup.mkdir(parents=True)
        shutil.copy(Path(__file__).with_name("show_figures.py"), startup / "00-show-figures.py")
    return _IPYTHONDIR


def _execute_only_plotting_tutorials(config, paths: list[Path]) -> None:
    plugin = config.plugins.get("mkdocs-jupyter")
    if plugin is None or not plugin.config.get("execute"):
        return
    ignore = plugin.config["execute_ignore"]
    for p in paths:
        if not PLOTS.search(p.read_text(encoding="utf-8")) and f"tutorials/{p.name}" not in ignore:
            ignore.append(f"tutorials/{p.name}")
    if any(not any(PurePath(p).match(pattern) for pattern in ignore) for p in paths):
        # Some tutorial will run: the kernels that mkdocs-jupyter starts inherit this environment.
        os.environ.setdefault("MINIMTP_FAST", "1")
        os.environ["IPYTHONDIR"] = _ipython_dir()


def on_config(config):
    if config.nav is not None:
        _add_optional_pages(config)
    paths = _tutorials(config)
    _execute_only_plotting_tutorials(config, paths)
    nav = config.nav
    if not paths or nav is None:
        return config
    has_section = any(isinstance(item, dict) and SECTION in item for item in nav)
    if not has_section:
        entries = [f"tutorials/{p.name}" for p in paths]
        # Right after "Concepts" when there is one, else at the end.
        at = next((i + 1 for i, item in enumerate(nav) if isinstance(item, dict) and "Concepts" in item), len(nav))
        nav.insert(at, {SECTION: entries})
    return config


@event_priority(100)  # before mkdocs-jupyter's on_files, which turns these into notebook pages
def on_files(files, config):
    for p in _tutorials(config):
        files.append(
            File(
                f"tutorials/{p.name}",
                src_dir=str(p.parent.parent),
                dest_dir=config.site_dir,
                use_directory_urls=config.use_directory_urls,
            )
        )
    return files


def on_serve(server, config, builder):
    d = _tutorial_dir(config)
    if d.is_dir():
        server.watch(str(d))
    return server
