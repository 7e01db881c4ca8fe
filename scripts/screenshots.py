"""Build the docs, serve them locally and take headless-Chromium screenshots of a few pages.

    python scripts/screenshots.py            # writes docs/assets/screenshots/*.png

The screenshots are how we check, without a person at a browser, that the offline site renders: math through
the vendored KaTeX (no raw ``\\(`` left on the page), the theme's icons, the API reference. Look at them after
running this. Needs the docs toolchain (``pip install -e ".[dev]"``) and Chromium
(``apt-get install -y --no-install-recommends chromium``). Nothing is fetched from the network: the site is served
on 127.0.0.1 and Chromium runs with networking features off.
"""

from __future__ import annotations

import argparse
import os
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

# (file name, path on the site, window height). The math page is shot taller so that the first proof, with its
# display equations and lemma boxes, is in view (headless Chromium captures a blank page for a #fragment URL).
PAGES = [
    ("home.png", "/", 900),
    ("speculative-decoding.png", "/concepts/speculative-decoding/", 1800),
    ("api.png", "/reference/api/", 900),
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
            for name, path, height in PAGES:
                png = args.out / name
                profile = Path(tmp) / f"profile-{name}"
                cmd = [chromium, *CHROMIUM_FLAGS, f"--window-size=1280,{height}", f"--user-data-dir={profile}"]
                cmd.append(f"--screenshot={png}")
                cmd.append(f"http://127.0.0.1:{port}{path}")
                subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120)
                shrink(png)
                print(f"{png.relative_to(ROOT) if png.is_relative_to(ROOT) else png}: {png.stat().st_size // 1024} KiB")
        finally:
            server.terminate()
            server.wait(timeout=10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
