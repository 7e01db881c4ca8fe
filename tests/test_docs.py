"""The documentation site builds with `mkdocs build --strict`, offline, with its math renderer vendored.

Strict mode turns every warning into an error: a broken link or anchor, a page missing from the nav, a
docstring mkdocstrings cannot parse. CI installs the `dev` extra (mkdocs-material, mkdocstrings, mkdocs-jupyter),
so this runs there; it is skipped only where mkdocs itself is not installed.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("mkdocs", reason="mkdocs is not installed (pip install -e '.[dev]' installs the docs toolchain)")
pytest.importorskip("material", reason="mkdocs-material is not installed (part of the dev extra)")

ROOT = Path(__file__).resolve().parent.parent
PLOTS = re.compile(r"^\s*(?:import|from)\s+matplotlib\b", re.MULTILINE)  # as in docs/hooks/tutorials.py
KATEX = ["assets/katex/katex.min.js", "assets/katex/katex.min.css", "assets/katex/contrib/auto-render.min.js"]


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stdout}\n{proc.stderr}"
    return out


def test_strict_build_writes_every_page(site: Path):
    for page in [
        "index.html",
        "concepts/speculative-decoding/index.html",
        "concepts/gemma4-target/index.html",
        "concepts/gemma4-assistant/index.html",
        "concepts/paged-kv-cache/index.html",
        "guides/real-checkpoints/index.html",
        "guides/serving-with-vllm/index.html",
        "reference/cli/index.html",
        "reference/api/index.html",
        "benchmarks/index.html",
        "assignments/index.html",
        "tutorials/01_plain_decoding/index.html",
        "tutorials/05_acceptance_and_speedup/index.html",
    ]:
        assert (site / page).is_file(), page


def test_only_the_plotting_tutorials_are_executed_and_show_their_plots(site: Path):
    """docs/hooks/tutorials.py executes the tutorials that import matplotlib (with MINIMTP_FAST=1) and displays the
    figures they leave open; the others render from source, without outputs."""
    plotting = {p.stem for p in (ROOT / "tutorials").glob("[!_]*.py") if PLOTS.search(p.read_text(encoding="utf-8"))}
    assert "05_acceptance_and_speedup" in plotting
    for page in sorted((site / "tutorials").glob("*/index.html")):
        html = page.read_text(encoding="utf-8")
        if page.parent.name in plotting:
            assert re.search(r'<img[^>]+src="data:image/png;base64,', html), f"{page.parent.name}: no plot on the page"
        else:  # (the notebook CSS itself holds data: URLs, so look for output areas, not for "data:image/png")
            assert 'class="jp-OutputArea ' not in html, f"{page.parent.name} was executed"
    html = (site / "tutorials/05_acceptance_and_speedup/index.html").read_text(encoding="utf-8")
    assert "tutorial 05 OK" in html, "tutorial 05 was not executed to its end"


def test_katex_is_vendored_and_referenced(site: Path):
    for asset in KATEX:
        assert (site / asset).is_file(), f"{asset} missing from the built site"
    fonts = list((site / "assets/katex/fonts").glob("*.woff2"))
    assert fonts, "KaTeX fonts missing from the built site"
    css = (site / "assets/katex/katex.min.css").read_text(encoding="utf-8")
    for font in set(re.findall(r"fonts/(KaTeX_[\w-]+\.woff2)", css)):
        assert (site / "assets/katex/fonts" / font).is_file(), f"katex.min.css needs fonts/{font}"

    html = (site / "concepts/speculative-decoding/index.html").read_text(encoding="utf-8")
    for asset in KATEX + ["assets/javascripts/katex-init.js"]:
        assert asset in html, f"the math page does not load {asset}"
    assert 'class="arithmatex"' in html, "pymdownx.arithmatex did not mark up the math"


def test_site_requests_nothing_from_the_network(site: Path):
    """No web fonts, no CDN scripts or styles: the site must render offline."""
    for page in site.rglob("*.html"):
        html = page.read_text(encoding="utf-8")
        for tag in re.findall(r"<(?:script|link)\b[^>]*>", html):
            url = re.search(r'(?:src|href)="([^"]+)"', tag)
            if url and ("stylesheet" in tag or tag.startswith("<script")):
                assert not re.match(r"(https?:)?//", url.group(1)), f"{page.relative_to(site)} loads {url.group(1)}"
        assert "fonts.googleapis.com" not in html, f"{page.relative_to(site)} requests Google Fonts"
