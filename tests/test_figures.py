"""The proof-in-pictures figures (scripts/figures.py, drawn into the site by docs/hooks/figures.py) render, show
what they claim, and the handouts' points tables (docs/hooks/grader_points.py) add up."""

from __future__ import annotations

import importlib.util
import io
import random
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

ROOT = Path(__file__).resolve().parent.parent


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def figures():
    return _load(ROOT / "scripts" / "figures.py", "minimtp_test_figures")


def test_residual_identity_holds(figures):
    """min(p, q) + P(reject) * norm((p - q)^+) = p: on the page's example and on random pairs."""
    d = figures.residual_decomposition()
    assert d["out"] == pytest.approx(list(figures.P_EXAMPLE), abs=1e-12)
    assert d["reject"][0] == pytest.approx(0.1)
    rng = random.Random(0)
    for _ in range(200):
        V = rng.randint(2, 9)
        p = [rng.random() ** 3 for _ in range(V)]
        q = [rng.random() ** 3 for _ in range(V)]
        p, q = [x / sum(p) for x in p], [x / sum(q) for x in q]
        d = figures.residual_decomposition(p, q)  # asserts the identity itself
        assert sum(d["min"]) + d["reject"][0] == pytest.approx(1.0)
        assert d["out"] == pytest.approx(p, abs=1e-12)


def test_block_table_states_come_from_the_real_cache(figures):
    before, rolled, trimmed = figures.block_table_states(block_size=4, window=4)
    assert before["length"] == 14 and len(before["table"]) == 4  # t + 4 drafts written at 9..13
    assert rolled["length"] == 11 and len(rolled["table"]) == 3  # one accepted: L + n + 1 = 11
    assert before["table"][-1] in rolled["free"]
    assert trimmed["table"][0] is None and trimmed["table"][1:] == rolled["table"][1:]
    owned = [b for b in trimmed["table"] if b is not None] + list(trimmed["other"])
    assert sorted(owned + trimmed["free"]) == list(range(trimmed["num_blocks"])), "blocks leaked"


def test_acceptance_rows_read_the_benchmark(figures):
    rows = figures.acceptance_rows()
    assert rows and all(len(r["per_position"]) == r["k"] for r in rows)
    assert all(0.0 <= a <= 1.0 for r in rows for a in r["per_position"])


def test_scheduler_timeline_comes_from_the_real_scheduler(figures):
    st = figures.scheduler_timeline_states()  # asserts: one preemption, recomputed, all finish, no block leaked
    cells, p = st["cells"], st["preempted"]
    assert figures.SCHED_REQUESTS[p][0] == "C"  # the newest running request is the one preempted
    steps = sorted(cells[p])
    first = steps[0]
    assert cells[p][first][0] == "prefill" and ["preempted"] in cells[p].values()
    assert [s for s in steps if "recompute" in cells[p][s]] and st["kept"] > 1
    for i, (_, arrive, _, max_new, _, _) in enumerate(figures.SCHED_REQUESTS):
        emitted = sum(int(x[1:]) for v in cells[i].values() for x in v if x.startswith("+"))
        assert emitted + 1 == max_new and min(cells[i]) == arrive  # prefill's token + the rounds'
    assert max(st["held"].values()) <= st["num_blocks"]


@pytest.mark.parametrize(
    "name",
    [
        "round-timeline.png",
        "residual-bars.png",
        "block-table.png",
        "acceptance-by-position.png",
        "scheduler-timeline.png",
    ],
)
def test_figure_renders_a_non_empty_png(figures, name):
    from PIL import Image

    assert name in figures.FIGURES
    png = figures.render(name)
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000, f"{name}: {len(png)} bytes"
    with Image.open(io.BytesIO(png)) as im:
        w, h = im.size
        assert w >= 600 and h >= 300, (w, h)
        colours = im.convert("RGB").getcolors(maxcolors=1 << 20)
        assert colours is not None and len(colours) > 20, f"{name} looks blank"


def test_every_figure_is_listed_and_linked(figures):
    """Each figure appears on a page, and each page's figure exists."""
    docs = ROOT / "docs"
    text = "\n".join(p.read_text(encoding="utf-8") for p in docs.rglob("*.md"))
    for name in figures.FIGURES:
        assert f"assets/figures/{name}" in text, f"{name} is drawn but no page shows it"


def test_points_tables_total_80():
    pytest.importorskip("mkdocs")
    hook = _load(ROOT / "docs" / "hooks" / "grader_points.py", "minimtp_test_grader_points")

    class Config:
        config_file_path = str(ROOT / "mkdocs.yml")

    reg = hook._registry(Config())
    assert {"spec_sampling", "kv_rollback", "paged_attention_kernel", "distil_drafter"} <= set(reg["tests"])
    for a, rows in reg["tests"].items():
        table = hook.points_table([dict(r) for r in rows], reg["alpha"])
        assert "| | **autograded total** | **80** |" in table, f"{a}:\n{table}"
        chi2 = sum(int(r.get("chi2") or 0) for r in rows)
        assert ("Pearson χ² tests" in table) == bool(chi2), table  # the stated false-failure probability
        handout = ROOT / "docs" / "assignments" / f"{a}.md"
        assert handout.is_file() and f"<!-- grader-points: {a} -->" in handout.read_text(encoding="utf-8"), a
