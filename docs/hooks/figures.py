"""mkdocs hook: draw the proof-in-pictures figures on every build and add them to the site.

The figure code is ``scripts/figures.py`` (also runnable on its own: ``python scripts/figures.py OUT``). For each
entry of its ``FIGURES`` this hook adds a generated file ``assets/figures/<name>.png`` to the site, so pages link
to them like any other image (``![...](../assets/figures/residual-bars.png)``) and the strict build checks those
links. Nothing is written under ``docs/``: the PNGs exist only in the built site. Under ``mkdocs serve`` the
figure code is watched.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from mkdocs.exceptions import PluginError
from mkdocs.plugins import get_plugin_logger
from mkdocs.structure.files import File

log = get_plugin_logger("figures")
PREFIX = "assets/figures"


def _script(config) -> Path:
    return Path(config.config_file_path).parent / "scripts" / "figures.py"


def _load(config):
    path = _script(config)
    spec = importlib.util.spec_from_file_location("minimtp_docs_figures", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def on_files(files, config):
    try:
        mod = _load(config)
        rendered = {name: mod.render(name) for name in mod.FIGURES}
    except Exception as e:  # a broken figure is a broken build (the pages link to it)
        raise PluginError(f"scripts/figures.py failed: {type(e).__name__}: {e}") from e
    for name, png in rendered.items():
        files.append(File.generated(config, f"{PREFIX}/{name}", content=png))
    log.info(f"drew {len(rendered)} figures into {PREFIX}/")
    return files


def on_serve(server, config, builder):
    server.watch(str(_script(config)))
    return server
