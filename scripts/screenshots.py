"""Build the docs, serve them locally and take headless-Chromium screenshots of a few pages.

    python scripts/screenshots.py            # writes docs/assets/screenshots/*.png

The screenshots are how we check, without a person at a browser, that the offline site renders: math through
the vendored KaTeX (no raw ``\\(`` left on the page), the plot of the executed tutorial 05, the figures the docs
build draws (the proof in pictures on the concepts pages and a handout), the theme's icons, the API reference.
Besides the pictures, the script checks each page's DOM after its scripts ran (KaTeX output present, no unrendered
math, the tutorial's plot inline, the build's figures linked and in the site) and exits non-zero if a check fails;
still look at the PNGs after running it. Needs the docs toolchain (``pip install -e ".[dev]"``) and Chromium
(``apt-get install -y --no-install-recommends chromium``). Nothing is fetched from the network: the site is served
on 127.0.0.1 and Chromium runs with networking features off.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "assets" / "screenshots"

# (file name, path on the site, window height, what the rendered page must contain). Headless Chromium captures the
# top of the page only (and a blank page for a #fragment URL), so pages whose point is further down are shot taller:
# the math page down to its first proof and the proof in pictures under it (the round timeline, the p/q/residual
# bars), tutorial 05 down to its plot (the one tutorial the docs build executes: see docs/hooks/tutorials.py), a
# handout down to its figure and points table. The checks run on the DOM after the scripts ran: "katex" = KaTeX
# rendered the math (no raw TeX left in an arithmatex element), "plot" = an inline PNG output, "figures" = an image
# drawn by the docs build (docs/hooks/figures.py) that the built site holds.
PAGES = [
    ("home.png", "/", 900, []),
    ("tutorial-05.png", "/tutorials/05_acceptance_and_speedup/", 3000, ["katex", "plot"]),
    ("speculative-decoding.png", "/concepts/speculative-decoding/", 3300, ["katex", "figures"]),
    ("paged-kv-cache.png", "/concepts/paged-kv-cache/", 2500, ["figures"]),
    ("kernels.png", "/concepts/kernels/", 1200, ["katex"]),
    ("assignments.png", "/assignments/", 1100, ["katex"]),
    ("handout-spec-sampling.png", "/assignments/spec_sampling/", 2900, ["katex", "figures"]),
    ("api.png", "/reference/api/", 1150, []),  # tall enough for the whole nav
]

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--disable-background-networking",
    "--no-first-run",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
    "--virtual-time-budget=3000",  # let KaTeX finish before the capture
]


def find_chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    sys.exit("error: Chromium not found; install it with: apt-get install -y --no-install-recommends chromium")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build(site: Path) -> None:
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    cmd = [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)]
    subprocess.run(cmd, cwd=ROOT, env=env, check=True)


def wait_until_up(url: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def dom_problems(dom: str, checks: list[str]) -> list[str]:
    """What is wrong with a page, judged from its DOM as Chromium left it (``--dump-dom``)."""
    problems = []
    if "katex" in checks:
        if 'class="katex"' not in dom:
            problems.append("no KaTeX output (is assets/katex loaded?)")
        # arithmatex keeps the TeX source in its span/div until KaTeX replaces it with class="katex" markup.
        raw = re.findall(r'class="arithmatex">(\\\(|\\\[)', dom)
        if raw:
            problems.append(f"{len(raw)} arithmatex element(s) left unrendered")
    if "plot" in checks and not re.search(r'<img[^>]+src="data:image/png;base64,', dom):  # (the CSS has data: URLs)
        problems.append("no inline PNG output (was the tutorial executed?)")
    if "figures" in checks and not re.search(r'<img[^>]+src="[^"]*assets/figures/[\w.-]+\.png"', dom):
        problems.append("no figure drawn by the docs build (docs/hooks/figures.py)")
    return problems


def missing_figures(dom: str, site: Path) -> list[str]:
    """The build-drawn figures a page links to that the built site does not hold."""
    names = set(re.findall(r'src="[^"]*assets/figures/([\w.-]+\.png)"', dom))
    return sorted(n for n in names if not (site / "assets" / "figures" / n).is_file())


def shrink(png: Path) -> None:
    """Re-encode with a 256-colour palette (about 4× smaller for text pages); skipped without Pillow."""
    try:
        from PIL import Image
    except ImportError:
        return
    with Image.open(png) as im:
        small = im.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT)
    small.save(png, optimize=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=OUT, help=f"output folder (default: {OUT.relative_to(ROOT)})")
    args = ap.parse_args(argv)
    chromium = find_chromium()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        site = Path(tmp) / "site"
        build(site)
        port = free_port()
        server = subprocess.Popen(
            [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(site)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_until_up(f"http://127.0.0.1:{port}/")
            failures = []
            for name, path, height, checks in PAGES:
                png = args.out / name
                url = f"http://127.0.0.1:{port}{path}"
                profile = Path(tmp) / f"profile-{name}"
                cmd = [chromium, *CHROMIUM_FLAGS, f"--window-size=1280,{height}", f"--user-data-dir={profile}"]
                run = dict(check=True, stderr=subprocess.DEVNULL, timeout=120)
                subprocess.run([*cmd, f"--screenshot={png}", url], stdout=subprocess.DEVNULL, **run)
                shrink(png)
                print(f"{png.relative_to(ROOT) if png.is_relative_to(ROOT) else png}: {png.stat().st_size // 1024} KiB")
                if checks:
                    dom = subprocess.run([*cmd, "--dump-dom", url], stdout=subprocess.PIPE, text=True, **run).stdout
                    failures += [f"{path}: {problem}" for problem in dom_problems(dom, checks)]
                    failures += [f"{path}: assets/figures/{n} is not in the site" for n in missing_figures(dom, site)]
            for failure in failures:
                print(f"error: {failure}", file=sys.stderr)
            if failures:
                return 1
        finally:
            server.terminate()
            server.wait(timeout=10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
