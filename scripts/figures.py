"""The proof in pictures: the figures of the concepts pages and the handouts, drawn by code (matplotlib, Agg).

    python scripts/figures.py OUT        # writes OUT/<name>.png for every figure

The docs build calls :func:`render` through ``docs/hooks/figures.py``, which adds the PNGs to the site as
``assets/figures/<name>.png`` (generated on every build, never committed). Each figure computes what it shows:

* ``round-timeline.png``: one speculative round (draft k, verify k+1 rows, accept / recover / bonus, roll back);
* ``residual-bars.png``: p, q, min(p, q) and the residual (p-q)^+ of the example of the speculative-decoding page,
  and the output min(p, q) + P(reject) norm((p-q)^+), asserted equal to p;
* ``block-table.png``: a paged KV cache's block table before and after a rollback and a sliding-window trim,
  read from the real :class:`minimtp.kv_cache.KVCache` driven through one round;
* ``acceptance-by-position.png``: measured acceptance per draft position (``docs/assets/bench/bench.json``)
  against the i.i.d. model alpha^j;
* ``scheduler-timeline.png``: four requests through the real :class:`minimtp.scheduler.Scheduler` step by step
  (waiting, prefill, rounds, retired; one preempted on a full KV pool and recomputed), with the pool's use.
"""

from __future__ import annotations

import io
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, Rectangle  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
BENCH_JSON = ROOT / "docs" / "assets" / "bench" / "bench.json"

# one palette for every figure
ACCEPT, REJECT, RESID, Q_BLUE, P_DARK, GREY, STALE = (
    "#2e7d32",
    "#c62828",
    "#ef6c00",
    "#1565c0",
    "#37474f",
    "#b0bec5",
    "#ffcdd2",
)
OWNER = {0: "#5c6bc0", 1: "#26a69a"}

# The example of docs/concepts/speculative-decoding.md ("Three rules that look right and are not").
P_EXAMPLE = (0.4, 0.3, 0.2, 0.1)
Q_EXAMPLE = (0.5, 0.3, 0.1, 0.1)


# ------------------------------------------------------------------------------------------------ (a) one round


def _box(ax, x, y, text, color="white", edge=P_DARK, w=0.84, h=0.5, dashed=False, hatch=None, fontsize=10, tc="black"):
    ax.add_patch(
        Rectangle(
            (x - w / 2, y - h / 2), w, h, facecolor=color, edgecolor=edge, lw=1.2, ls="--" if dashed else "-",
            hatch=hatch, zorder=2,
        )
    )  # fmt: skip
    bbox = dict(boxstyle="round,pad=0.15", facecolor="white", edgecolor="none", alpha=0.85) if hatch else None
    ax.text(x, y, text, ha="center", va="center", fontsize=fontsize, color=tc, zorder=3, bbox=bbox)


def _arrow(ax, a, b, color=P_DARK, rad=0.0):
    ax.add_patch(
        FancyArrowPatch(a, b, arrowstyle="-|>", mutation_scale=10, color=color, lw=1.0,
                        connectionstyle=f"arc3,rad={rad}", zorder=1)
    )  # fmt: skip


def round_timeline(k: int = 4, accepted: int = 2):
    """One round with k drafts of which the first ``accepted`` survive: columns are sequence positions L .. L+k+1."""
    assert 0 <= accepted < k, "the picture shows a round that ends with a rejection"
    fig, ax = plt.subplots(figsize=(9.6, 5.4))
    xs = list(range(1, k + 3))  # x = 1 is position L (the pending token t), x = 1 + i is position L + i
    lanes = {"pos": 6.0, "draft": 5.0, "rows": 4.15, "inputs": 3.35, "decide": 2.3, "kv": 1.3, "out": 0.3}
    labels = {
        "draft": "① draft\nassistant, k steps\nat position L",
        "rows": "② verify: target rows",
        "inputs": "one forward over\nk+1 inputs",
        "decide": "③ accept / recover\n(or bonus)",
        "kv": "④ roll back\nthe KV cache",
        "out": "emitted",
    }
    for lane, text in labels.items():
        ax.text(-0.35, lanes[lane], text, ha="right", va="center", fontsize=9.5, color=P_DARK)
    for x in xs:
        i = x - 1
        ax.text(x, lanes["pos"], "L" if i == 0 else f"L+{i}", ha="center", va="center", fontsize=10, color=P_DARK)
    ax.axhline(lanes["pos"] - 0.35, color=GREY, lw=0.8)
    _box(ax, 0.1, lanes["inputs"], "context\n< L", color="#eceff1", w=0.7, h=0.6, fontsize=8.5)

    # ① draft: t -> d1 -> ... -> dk, every step at position L, step j+1 reading step j's hidden state
    _box(ax, 1, lanes["draft"], "$t$", color="#eceff1")
    for i in range(1, k + 1):
        _box(ax, 1 + i, lanes["draft"], f"$d_{i} \\sim q_{i}$", color="#e3f2fd", edge=Q_BLUE)
        _arrow(ax, (i + 0.42, lanes["draft"]), (i + 0.58, lanes["draft"]), color=Q_BLUE)
    # ② verify: inputs t, d1..dk at L..L+k; row i (from the input at L+i-1) is p_i, the distribution of position L+i
    for i in range(0, k + 1):
        _box(ax, 1 + i, lanes["inputs"], "$t$" if i == 0 else f"$d_{i}$", color="#eceff1")
        _box(ax, 2 + i, lanes["rows"], f"$p_{{{i + 1}}}$", color="#fff3e0", edge=RESID)
        _arrow(ax, (1 + i + 0.2, lanes["inputs"] + 0.25), (2 + i - 0.2, lanes["rows"] - 0.25), color=RESID)
    # ③ decide
    for i in range(1, k + 1):
        x = 1 + i
        if i <= accepted:
            _box(ax, x, lanes["decide"], f"✓ accept\n$u_{i} < p_{i}/q_{i}$", color="#e8f5e9", edge=ACCEPT, h=0.62,
                 fontsize=8.5)  # fmt: skip
        elif i == accepted + 1:
            _box(ax, x, lanes["decide"], f"✗ reject →\n$y \\sim (p_{i}-q_{i})^+$", color="#ffebee", edge=REJECT,
                 h=0.62, w=0.92, fontsize=8.5)  # fmt: skip
        else:
            _box(ax, x, lanes["decide"], "not\nlooked at", color="white", edge=GREY, h=0.62, fontsize=8.5, tc=GREY)
    _box(ax, k + 2, lanes["decide"], f"bonus\n$y \\sim p_{{{k + 1}}}$\nif all k pass", edge=P_DARK, dashed=True, h=0.75,
         w=0.92, fontsize=8.5)  # fmt: skip
    # ④ KV cache: verify wrote positions L..L+k; keep L..L+n, roll back the rest
    n = accepted
    for i in range(0, k + 1):
        keep = i <= n
        _box(ax, 1 + i, lanes["kv"], "kept" if keep else "rolled\nback", color="#e8f5e9" if keep else STALE,
             edge=ACCEPT if keep else REJECT, hatch=None if keep else "///", fontsize=8.5, h=0.58)  # fmt: skip
    ax.text(k + 2, lanes["kv"], f"length ←\nL+n+1 = L+{n + 1}", ha="center", va="center", fontsize=8.5, color=P_DARK)
    # emitted: the n accepted drafts, then the recovered token y (pending at L+n+1, run by the next round)
    for i in range(1, n + 1):
        _box(ax, 1 + i, lanes["out"], f"$d_{i}$", color="#e8f5e9", edge=ACCEPT)
    _box(ax, n + 2, lanes["out"], "$y$", color="#ffebee", edge=REJECT)
    ax.text(n + 2.6, lanes["out"], f"{n + 1} tokens for one target forward (at most k+1 = {k + 1})", ha="left",
            va="center", fontsize=9, color=P_DARK)  # fmt: skip
    ax.set_xlim(-1.75, k + 2.55)
    ax.set_ylim(-0.15, 6.4)
    ax.axis("off")
    ax.set_title(f"One speculative round: k = {k} drafts, n = {n} accepted", fontsize=12)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------- (b) why the output is p


def residual_decomposition(p=P_EXAMPLE, q=Q_EXAMPLE) -> dict[str, list[float]]:
    """The pieces of Lemma 1 for one position: accepted mass min(p, q), residual (p-q)^+, P(reject) = 1 - beta,
    the normalised residual r and the output min(p, q) + P(reject) r. Asserts that the output is p."""
    mins = [min(a, b) for a, b in zip(p, q)]
    resid = [max(a - b, 0.0) for a, b in zip(p, q)]
    beta = sum(mins)
    reject = 1.0 - beta
    assert abs(sum(resid) - reject) < 1e-12, "the residual's mass is P(reject)"
    r = [x / reject for x in resid] if reject > 0 else list(p)
    out = [m + reject * ri for m, ri in zip(mins, r)]
    assert all(abs(o - a) < 1e-12 for o, a in zip(out, p)), f"min(p,q) + P(reject) r = {out} is not p = {list(p)}"
    return {"p": list(p), "q": list(q), "min": mins, "resid": resid, "r": r, "out": out, "reject": [reject]}


def residual_bars(p=P_EXAMPLE, q=Q_EXAMPLE):
    d = residual_decomposition(p, q)
    V = len(p)
    xs = list(range(V))
    fig, axes = plt.subplots(1, 3, figsize=(10, 3.7), sharey=True)
    w = 0.38
    ax = axes[0]
    ax.bar([x - w / 2 for x in xs], d["p"], w, color=P_DARK, label="target $p$")
    ax.bar([x + w / 2 for x in xs], d["q"], w, color=Q_BLUE, label="drafter $q$")
    ax.set_title("1. the two distributions")
    ax.legend(frameon=False, fontsize=9)
    ax = axes[1]
    ax.bar(xs, d["min"], 0.6, color=ACCEPT, label=r"$\min(p, q)$: accepted")
    ax.bar(xs, d["resid"], 0.6, bottom=d["min"], color=RESID, label=r"$(p-q)^+$: residual")
    ax.set_title(r"2. $p = \min(p,q) + (p-q)^+$")
    ax.legend(frameon=False, fontsize=9, loc="upper right")
    beta = 1 - d["reject"][0]
    ax.text(0.97, 0.74, f"P(accept) = Σ min(p, q) = {beta:.2f}\nP(reject) = Σ (p−q)⁺ = {1 - beta:.2f}",
            transform=ax.transAxes, va="top", ha="right", fontsize=9)  # fmt: skip
    ax = axes[2]
    rej = d["reject"][0]
    recovered = [rej * x for x in d["r"]]
    ax.bar(xs, d["min"], 0.6, color=ACCEPT, label="accepted draft")
    ax.bar(xs, recovered, 0.6, bottom=d["min"], color=RESID, label=f"rejected ({rej:.2f}) × norm$((p-q)^+)$")
    ax.step([-0.5, *xs, V - 0.5], [d["p"][0], *d["p"], d["p"][-1]], where="mid", color="black", lw=1.5, ls="--",
            label="$p$")  # fmt: skip
    ax.set_title("3. the output is exactly $p$")
    ax.legend(frameon=False, fontsize=9, loc="upper right")
    for ax in axes:
        ax.set_xticks(xs, [f"token {x}" for x in xs], fontsize=9)
        ax.set_ylim(0, 0.62)
        ax.spines[["top", "right"]].set_visible(False)
    axes[0].set_ylabel("probability")
    fig.suptitle(
        f"Sampled draft $x \\sim q$, accepted with $\\min(1, p(x)/q(x))$: p = {list(p)}, q = {list(q)}", fontsize=11
    )
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------------------------------------ (c) block tables


def block_table_states(block_size: int = 4, window: int = 4) -> list[dict]:
    """Drive the real KVCache through one round of sequence 0 (next to a sequence 1 that interleaves the pool) and
    return the sliding-window table, length and free list after: the verify write, the rollback, the window trim.

    Sequence 0 holds L = 9 positions (the pending token t goes at 9); the round writes t and k = 4 drafts at 9..13,
    n = 1 draft is accepted, so the cache rolls back to L + n + 1 = 11; then trim_window with keep = W + 1."""
    import minimtp
    from minimtp.config import SLIDING, load_text_config
    from minimtp.kv_cache import KVCache

    cfg = load_text_config(os.path.join(os.path.dirname(minimtp.__file__), "default_model", "target"))
    num_blocks = 10
    cache = KVCache(cfg, {t: num_blocks for t in set(cfg.layer_types)}, block_size, sliding_keep=window + 1)
    cache.add(0)
    cache.add(1)
    for n0, n1 in [(4, 4), (8, 6), (9, 6)]:  # the two prompts grow in turns: their blocks interleave in the pool
        cache.reserve(0, n0)
        cache.reserve(1, n1)
    L, k, n = 9, 4, 1
    snap = lambda title, note, written=False: {
        "title": title,
        "note": note,
        "table": list(cache.tables[0][SLIDING]),
        "other": list(cache.tables[1][SLIDING]),
        "length": cache.lengths[0],
        "free": sorted(cache.free_blocks[SLIDING]),
        "num_blocks": num_blocks,
        "block_size": block_size,
        "rejected": range(L + n + 1, L + k + 1),
        "written": range(L, L + k + 1) if written else range(0),
    }
    cache.reserve(0, L + k + 1)
    states = [snap(f"after the verify write: t and k = {k} drafts at {L}..{L + k}", f"length {L + k + 1}", True)]
    cache.truncate(0, L + n + 1)
    states.append(snap(f"after rollback: n = {n} accepted, length L+n+1 = {L + n + 1}", "stale slot kept, block freed"))
    cache.trim_window(0, L + n + 1)
    states.append(snap(f"after trim_window: keep = W+1 = {window + 1} (W = {window})", "front block freed"))
    t0, t1, t2 = (s["table"] for s in states)
    assert len(t0) == -(-(L + k + 1) // block_size) and len(t1) == -(-(L + n + 1) // block_size), (t0, t1)
    assert t0[-1] in states[1]["free"], "rollback returns the block past the new length"
    assert t2[0] is None and t1[0] in states[2]["free"], (
        "the trim frees the block all of whose positions left the window"
    )
    return states


def block_table(block_size: int = 4, window: int = 4):
    states = block_table_states(block_size, window)
    bs = block_size
    width = 4 * bs  # positions drawn per state
    fig, axes = plt.subplots(len(states), 1, figsize=(9.6, 6.6))
    for ax, st in zip(axes, states):
        length, table = st["length"], st["table"]
        # top: the sequence's positions, grouped by table entry
        for pos in range(width):
            j = pos // bs
            held = j < len(table)
            block = table[j] if held else None
            if held and block is None:
                color, edge, hatch = "white", GREY, "xx"
            elif pos < length and pos in st["written"]:
                color, edge, hatch = "#fff3e0", RESID, None
            elif pos < length:
                color, edge, hatch = "#e8f5e9", ACCEPT, None
            elif held and pos in st["rejected"]:
                color, edge, hatch = STALE, REJECT, "///"
            else:
                color, edge, hatch = "white", "#cfd8dc", None
            ax.add_patch(Rectangle((pos, 1.2), 1, 0.8, facecolor=color, edgecolor=edge, hatch=hatch, lw=0.8))
            ax.text(pos + 0.5, 1.6, str(pos), ha="center", va="center", fontsize=7.5, color=P_DARK)
        for j in range(width // bs):
            held = j < len(table)
            label = "—" if not held else ("freed" if table[j] is None else f"block {table[j]}")
            ax.add_patch(Rectangle((j * bs, 1.2), bs, 0.8, fill=False, edgecolor=P_DARK, lw=1.6 if held else 0.4))
            ax.text(j * bs + bs / 2, 2.25, label, ha="center", va="center", fontsize=9, color=P_DARK)
        shown = ["None" if b is None else str(b) for b in table]
        ax.text(width + 0.6, 1.6, f"table = [{', '.join(shown)}]\n{st['note']}", va="center", fontsize=9)
        # bottom: the pool, each block coloured by its owner
        x0 = 0.0
        cell = width / st["num_blocks"]
        for b in range(st["num_blocks"]):
            if b in table:
                color = OWNER[0]
            elif b in st["other"]:
                color = OWNER[1]
            else:
                color = "white"
            ax.add_patch(Rectangle((x0 + b * cell, 0), cell * 0.92, 0.7, facecolor=color, edgecolor=P_DARK, lw=0.8))
            ax.text(x0 + b * cell + cell * 0.46, 0.35, str(b), ha="center", va="center", fontsize=8,
                    color="white" if color != "white" else P_DARK)  # fmt: skip
        ax.text(width + 0.6, 0.35, f"pool: free {st['free']}", va="center", fontsize=9)
        ax.text(-0.4, 1.6, "seq 0\npositions", ha="right", va="center", fontsize=8.5, color=P_DARK)
        ax.text(-0.4, 0.35, "block pool", ha="right", va="center", fontsize=8.5, color=P_DARK)
        ax.set_title(st["title"], fontsize=10.5, loc="left")
        ax.set_xlim(-2.6, width + 6.2)
        ax.set_ylim(-0.1, 2.55)
        ax.axis("off")
    handles = [
        Rectangle((0, 0), 1, 1, facecolor="#e8f5e9", edgecolor=ACCEPT, label="valid (< length)"),
        Rectangle((0, 0), 1, 1, facecolor="#fff3e0", edgecolor=RESID, label="written by the verify step"),
        Rectangle((0, 0), 1, 1, facecolor=STALE, edgecolor=REJECT, hatch="///", label="rejected, stale (never read)"),
        Rectangle((0, 0), 1, 1, facecolor="white", edgecolor=GREY, hatch="xx", label="freed by the window"),
        Rectangle((0, 0), 1, 1, facecolor=OWNER[0], label="block of seq 0"),
        Rectangle((0, 0), 1, 1, facecolor=OWNER[1], label="block of seq 1"),
    ]  # fmt: skip
    fig.legend(handles=handles, loc="lower center", ncol=6, frameon=False, fontsize=8.5)
    fig.suptitle(f"Sliding-window layers' block table of one sequence (block size {bs}), from minimtp.kv_cache.KVCache",
                 fontsize=11.5)  # fmt: skip
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    return fig


# ------------------------------------------------------------------------------------------------ (d) acceptance


def acceptance_rows(path: Path = BENCH_JSON) -> list[dict]:
    """The benchmark rows with the largest k per prompt kind: prompt, k, per_position, alpha_iid."""
    rows = json.loads(Path(path).read_text(encoding="utf-8"))["rows"]
    best: dict[str, dict] = {}
    for r in rows:
        if r.get("per_position") and (r["prompt"] not in best or r["k"] > best[r["prompt"]]["k"]):
            best[r["prompt"]] = r
    assert best, f"{path}: no rows with per_position"
    return list(best.values())


def acceptance_by_position(path: Path = BENCH_JSON):
    rows = acceptance_rows(path)
    args = json.loads(Path(path).read_text(encoding="utf-8")).get("args", {})
    fig, ax = plt.subplots(figsize=(8.5, 4.2))
    colors = plt.get_cmap("tab10").colors
    for c, m, r in zip(colors, "os^Dv", rows):
        js = list(range(1, r["k"] + 1))
        ax.plot(js, r["per_position"], "-", marker=m, color=c, label=f"{r['prompt']}: measured", ms=7, mfc="none",
                mew=1.5)  # fmt: skip
        a = r.get("alpha_iid")
        if a:
            ax.plot(
                js, [a**j for j in js], "--", color=c, alpha=0.7, lw=1.2, label=f"{r['prompt']}: i.i.d. α^j, α={a:.2f}"
            )
    ax.set_xlabel("draft position j in the round")
    ax.set_ylabel("P(draft j is accepted)")
    ax.set_ylim(0, 1.02)
    ax.set_xticks(range(1, max(r["k"] for r in rows) + 1))
    ax.spines[["top", "right"]].set_visible(False)
    ax.legend(frameon=False, fontsize=8, ncol=2, loc="lower left")
    t = args.get("temperature")
    ax.set_title(
        "Acceptance along the round: the default pair, docs/assets/bench/bench.json"
        + (f" (temperature {t:g})" if t is not None else ""),
        fontsize=10.5,
    )
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------------------------------------ (e) scheduler

SCHED_REQUESTS = [  # name, arrival step, prompt tokens, max new tokens, k (0 = plain), accepted drafts per round
    ("A", 0, 6, 14, 3, (2, 3, 1)),
    ("B", 0, 5, 9, 3, (0, 1, 3)),
    ("C", 1, 7, 12, 3, (3, 2, 2)),
    ("D", 2, 4, 5, 0, (0,)),
]


def scheduler_timeline_states(num_blocks: int = 10, block_size: int = 4, max_num_seqs: int = 3) -> dict:
    """Drive the real Scheduler (admit, reserve + preempt, retire, over a real KVCache of ``num_blocks`` blocks)
    through SCHED_REQUESTS with a stand-in engine: the bookkeeping of Engine.prefill / Engine.round (cache length,
    rollback, budget) with the scripted number of accepted drafts instead of the models. Returns per request the
    label of each step ("waiting", "prefill", "recompute", "preempted", the tokens a round emitted) and the step it
    retired in, and the KV blocks held during each step's round."""
    import minimtp
    from minimtp.config import load_text_config
    from minimtp.kv_cache import KVCache
    from minimtp.request import Request
    from minimtp.scheduler import Scheduler, StepResult

    cfg = load_text_config(os.path.join(os.path.dirname(minimtp.__file__), "default_model", "target"))
    cache = KVCache(cfg, {t: num_blocks for t in set(cfg.layer_types)}, block_size)
    pool = next(iter(cache.num_blocks))
    cells: dict[int, dict[int, list[str]]] = {i: {} for i in range(len(SCHED_REQUESTS))}
    held, running, kept, step = {}, {}, {}, 0
    mark = lambda r, label: cells[r.index].setdefault(step, []).append(label)

    class Scripted:
        """The engine's bookkeeping (cache length, rollback, budget) with the scripted number of accepted drafts
        instead of the models; token ids do not matter to the scheduler."""

        def execute(self, plan, _cache):
            if plan.prefill:
                for r in plan.prefill:
                    mark(r, "recompute" if r.out else "prefill")
                    r.cache_len = len(r.prompt) + max(len(r.out) - 1, 0)  # a preempted request keeps its tokens
                tokens = [[] if r.out else [0] for r in plan.prefill]
                return StepResult(tokens, [0] * len(tokens), [0] * len(tokens))
            held[step] = cache.num_blocks[pool] - len(cache.free_blocks[pool])
            running[step] = len(plan.decode)
            ks, accepted, tokens = [], [], []
            for r in plan.decode:
                k = max(0, min(r.k, r.max_new - len(r.out) - 1))
                script = SCHED_REQUESTS[r.index][5]
                n = min(k, script[r.stats.draft_rounds % len(script)])
                r.cache_len += 1 + n
                cache.truncate(r.id, r.cache_len)  # roll back the rejected drafts
                mark(r, f"+{min(n + 1, r.max_new - len(r.out))}")
                ks.append(k)
                accepted.append(n)
                tokens.append([0] * (n + 1))
            return StepResult(tokens, ks, accepted)

    engine = Scripted()
    sched = Scheduler(cache, max_num_seqs=max_num_seqs)
    real_preempt = sched._preempt

    def preempt(r):
        mark(r, "preempted")
        kept[r.index] = len(r.out)
        real_preempt(r)

    sched._preempt = preempt
    reqs = [Request(list(range(n)), k=k, max_new=m, index=i) for i, (_, _, n, m, k, _) in enumerate(SCHED_REQUESTS)]
    retired = {}
    while step == 0 or sched.has_work:
        for r, spec in zip(reqs, SCHED_REQUESTS):
            if spec[1] == step:
                sched.add(r)
        waiting = set(sched.waiting)
        plan = sched.schedule()
        for r in sched.postprocess(plan, engine.execute(plan, cache)):
            retired[r.index] = step
        for r in reqs:
            if (r in waiting or r in sched.waiting) and step not in cells[r.index]:
                mark(r, "waiting")
        step += 1
    assert len(kept) == 1, "the picture shows one preemption"
    [(preempted, tokens)] = kept.items()
    assert any("recompute" in v for v in cells[preempted].values()), "it is recomputed"
    assert all(len(r.out) == r.max_new and r.done == "length" for r in reqs), "every request finishes"
    assert max(running.values()) <= max_num_seqs and not cache.tables, "batch bound kept, every block released"
    assert sorted(cache.free_blocks[pool]) == list(range(num_blocks)), "blocks leaked"
    return {"cells": cells, "retired": retired, "held": held, "steps": step, "num_blocks": num_blocks,
            "max_num_seqs": max_num_seqs, "preempted": preempted, "kept": tokens}  # fmt: skip


def scheduler_timeline():
    st = scheduler_timeline_states()
    cells, steps = st["cells"], st["steps"]
    fig, (ax, bx) = plt.subplots(2, 1, figsize=(9.6, 5.6), gridspec_kw={"height_ratios": [3, 1.25]}, sharex=True)
    n_req = len(SCHED_REQUESTS)
    style = {
        "waiting": ("#eceff1", GREY, None),
        "prefill": ("#fff3e0", RESID, None),
        "recompute": ("#fff3e0", RESID, "///"),
        "preempted": ("#ffebee", REJECT, None),
        "round": ("#e8f5e9", ACCEPT, None),
    }
    for i, (name, _, plen, max_new, k, _) in enumerate(SCHED_REQUESTS):
        y = n_req - 1 - i
        for s in range(steps):
            labels = cells[i].get(s, [])
            for j, label in enumerate(labels):
                kind = "round" if label.startswith("+") else label
                color, edge, hatch = style[kind]
                w = 0.9 / len(labels)
                x0 = s + 0.05 + j * w
                ax.add_patch(Rectangle((x0, y - 0.35), w, 0.7, facecolor=color, edgecolor=edge, hatch=hatch, lw=1.0))
                text = {"waiting": "wait", "recompute": "recomp."}.get(label, label)
                bbox = dict(boxstyle="round,pad=0.1", facecolor="white", edgecolor="none", alpha=0.8) if hatch else None
                ax.text(x0 + w / 2, y, text, ha="center", va="center", fontsize=7.5 if len(labels) > 1 else 8.5,
                        color=P_DARK, bbox=bbox)  # fmt: skip
        end = st["retired"][i]
        ax.text(end + 1.02, y, "✓ retired", ha="left", va="center", fontsize=8.5, color=ACCEPT)
        desc = f"{name}: prompt {plen}, {max_new} tokens,\n" + (f"k = {k}" if k else "plain (k = 0)")
        ax.text(-0.15, y, desc, ha="right", va="center", fontsize=8.5, color=P_DARK)
    p = st["preempted"]
    ax.text(st["retired"][p] + 2.1, n_req - 1 - p, f"preempted with {st['kept']} tokens, kept;\nrecomputed from "
            "prompt + tokens so far", ha="left", va="center", fontsize=8, color=REJECT)  # fmt: skip
    ax.set_ylim(-0.6, n_req - 0.4)
    ax.set_yticks([])
    ax.spines[["top", "right", "left", "bottom"]].set_visible(False)
    ax.tick_params(bottom=False)
    title = f"max_num_seqs = {st['max_num_seqs']}, a pool of {st['num_blocks']} KV blocks"
    ax.set_title(f"Continuous batching: four requests through minimtp.scheduler.Scheduler ({title})", fontsize=10.5,
                 loc="left")  # fmt: skip
    handles = [Rectangle((0, 0), 1, 1, facecolor=c, edgecolor=e, hatch=h, label=lab) for lab, (c, e, h) in
               zip(["waiting", "prefill (admitted)", "recompute (re-admitted)", "preempted: blocks freed",
                    "round: +tokens emitted"], style.values())]  # fmt: skip
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.02), ncol=5, frameon=False, fontsize=8)
    xs = sorted(st["held"])
    bx.bar([x + 0.5 for x in xs], [st["held"][x] for x in xs], width=0.6, color=OWNER[0])
    bx.axhline(st["num_blocks"], color=REJECT, lw=1.0, ls="--")
    bx.text(
        steps + 0.2, st["num_blocks"] + 0.2, f"pool: {st['num_blocks']} blocks", va="bottom", fontsize=8, color=REJECT
    )
    bx.set_ylim(0, st["num_blocks"] + 1.5)
    bx.set_ylabel("KV blocks held\nduring the round", fontsize=8.5)
    bx.set_xticks([s + 0.5 for s in range(steps)], [str(s) for s in range(steps)])
    bx.set_xlabel("scheduler step (retire, admit, reserve + preempt, round, retire)")
    bx.set_xlim(-0.1, steps + 2.6)
    bx.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------------------------------------ rendering

FIGURES: dict[str, Callable] = {
    "round-timeline.png": round_timeline,
    "residual-bars.png": residual_bars,
    "block-table.png": block_table,
    "acceptance-by-position.png": acceptance_by_position,
    "scheduler-timeline.png": scheduler_timeline,
}


def render(name: str, dpi: int = 100) -> bytes:
    """The PNG bytes of figure ``name`` (a key of FIGURES)."""
    fig = FIGURES[name]()
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight", pad_inches=0.08)
    finally:
        plt.close(fig)
    return buf.getvalue()


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or argv[0].startswith("-"):
        print(__doc__.split("\n\n")[1].strip(), file=sys.stderr)
        return 2
    out = Path(argv[0])
    out.mkdir(parents=True, exist_ok=True)
    for name in FIGURES:
        (out / name).write_bytes(render(name))
        print(out / name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
