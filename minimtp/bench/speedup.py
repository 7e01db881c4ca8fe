"""``python -m minimtp.bench``: does speculative decoding pay, and does the speedup model predict it?

Method (docs: benchmarks): the same prompts (code completion, JSON repair, fixed-format list, prose) run with and
without the assistant on one engine (same model, dtype, temperature, threads), after a warm-up of every shape;
repeats are interleaved and medians reported, so speedups are ratios measured in one run. The prediction is
Leviathan et al.'s (arXiv 2211.17192) with the cost ratio c = t_draft / t_target and the per-token acceptance α
of the i.i.d. model that reproduces the measured mean acceptance length:

    speedup = (1 − α^(k+1)) / ((1 − α)(k·c + 1))

and a refined one that also uses the measured verify cost: E[tokens/round] · t_target / (k·t_draft + t_verify).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

from minimtp.bench.timing import load_bench_pair
from minimtp.errors import MinimtpError
from minimtp.fast import weights_dtype
from minimtp.hf_compat import patch_transformers

PROMPTS = {
    "code": [
        "def fibonacci(n):\n",
        "import os\nimport sys\n\n\ndef main(argv=None):\n    parser = argparse.ArgumentParser(",
        "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):\n",
    ],
    "json": ['# Fix the JSON below\ndata = {"name": "minimtp", "version": 1, "tags": ["fast", "exact",], }\n'],
    "list": ["# Steps:\n# 1. read the file\n# 2. parse the header\n# 3."],
    "prose": ['"""The module provides a simple interface to the operating system and the file system. It'],
}


def _median(xs):
    """The median of ``xs``, NaN if empty."""
    return statistics.median(xs) if xs else float("nan")


def predicted_speedup(alpha: float, k: int, c: float) -> float:
    """Leviathan et al.: expected tokens per round (1−α^(k+1))/(1−α) over the round's cost k·c + 1."""
    if alpha >= 1.0:
        return (k + 1) / (k * c + 1)
    return (1 - alpha ** (k + 1)) / ((1 - alpha) * (k * c + 1))


def alpha_from_acceptance_length(mal: float, k: int) -> float:
    """The per-token acceptance α of the i.i.d. model whose expected tokens per round (1−α^(k+1))/(1−α) equals
    the measured mean acceptance length (bisection; accepted/drafted is (α+…+α^k)/k, not α)."""
    lo = 0.0
    hi = 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if sum(mid**j for j in range(k + 1)) < mal:
            lo = mid
        else:
            hi = mid
    return lo


def run_minimtp(engine, tok, prompts: dict, ks: list[int], args) -> dict:
    """The stats of every generation: {prompt kind: {k: [Stats]}}, k = 0 being plain decoding. Every (kind, k) is
    warmed up first; the repeats interleave the kinds and the draft lengths."""
    enc = {kind: [tok(p)["input_ids"] for p in ps] for kind, ps in prompts.items()}
    gen = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed, stop_token_ids=[])
    configs = [0] + ks
    for ids in enc.values():  # warm-up of every shape
        for k in configs:
            engine.generate(ids[:1], num_speculative_tokens=max(k, 1), use_assistant=k > 0, **gen)
    res = {kind: {k: [] for k in configs} for kind in enc}
    for _ in range(args.repeats):
        for kind, ids in enc.items():
            for k in configs:
                for p in ids:
                    r = engine.generate([p], num_speculative_tokens=max(k, 1), use_assistant=k > 0, **gen)
                    res[kind][k].append(r.stats)
    return res


def summarize(res: dict, ks: list[int]) -> list[dict]:
    """One row per (prompt kind, k): measured tok/s and speedup, acceptance, the costs c, t_target, t_draft and
    t_verify, and the two predicted speedups (module docstring)."""
    rows = []
    for kind, by_k in res.items():
        plain = by_k[0]
        tps0 = _median([s.tokens_per_second for s in plain])
        t_target = sum(s.verify_s for s in plain) / max(1, sum(s.target_steps for s in plain))
        for k in ks:
            st = by_k[k]
            drafted = sum(s.drafted for s in st)
            accepted = sum(s.accepted for s in st)
            rounds = sum(s.draft_rounds for s in st)
            alpha = accepted / drafted if drafted else 0.0
            t_draft = sum(s.draft_s for s in st) / max(1, drafted)
            t_verify = sum(s.verify_s for s in st) / max(1, sum(s.target_steps for s in st))
            mal = 1 + accepted / rounds if rounds else 1.0
            tps = _median([s.tokens_per_second for s in st])
            c = t_draft / t_target if t_target else float("nan")
            alpha_iid = alpha_from_acceptance_length(mal, k)
            pos = [0.0] * k
            for j in range(k):
                d = sum(s.drafted_per_position[j] for s in st if len(s.drafted_per_position) > j)
                a = sum(s.accepted_per_position[j] for s in st if len(s.accepted_per_position) > j)
                pos[j] = a / d if d else 0.0
            rows.append(
                dict(
                    prompt=kind,
                    k=k,
                    plain_tps=tps0,
                    spec_tps=tps,
                    speedup=tps / tps0,
                    acceptance_rate=alpha,
                    mean_acceptance_length=mal,
                    c=c,
                    t_target_ms=1e3 * t_target,
                    t_draft_ms=1e3 * t_draft,
                    t_verify_ms=1e3 * t_verify,
                    alpha_iid=alpha_iid,
                    predicted_leviathan=predicted_speedup(alpha_iid, k, c),
                    predicted_measured_costs=mal * t_target / (k * t_draft + t_verify) if t_verify else float("nan"),
                    per_position=pos,
                )
            )
    return rows


def markdown(rows: list[dict], header: str) -> str:
    """The table of ``summarize``'s rows under ``header``."""
    out = [
        header,
        "",
        "| prompt | k | plain tok/s | spec tok/s | speedup | predicted (Leviathan) | predicted (measured "
        "verify cost) | acceptance rate | mean acceptance length | c = t_draft/t_target |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        out.append(
            f"| {r['prompt']} | {r['k']} | {r['plain_tps']:.1f} | {r['spec_tps']:.1f} | **{r['speedup']:.2f}×** | "
            f"{r['predicted_leviathan']:.2f}× | {r['predicted_measured_costs']:.2f}× | {r['acceptance_rate']:.3f} | "
            f"{r['mean_acceptance_length']:.2f} | {r['c']:.3f} |"
        )
    return "\n".join(out)


def plots(rows: list[dict], out_dir: str) -> list[str]:
    """speedup_vs_k.png (measured and predicted, per prompt kind) and acceptance_by_position.png (at the largest
    k) in ``out_dir``; returns their paths."""
    import matplotlib  # an optional extra (pip install minimtp[plots])

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    kinds = sorted({r["prompt"] for r in rows})
    fig, ax = plt.subplots(figsize=(6, 4))
    for kind in kinds:
        rs = [r for r in rows if r["prompt"] == kind]
        ax.plot([r["k"] for r in rs], [r["speedup"] for r in rs], "o-", label=f"{kind} measured")
        ax.plot(
            [r["k"] for r in rs], [r["predicted_leviathan"] for r in rs], "x:", alpha=0.6, label=f"{kind} predicted"
        )
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xlabel("draft length k")
    ax.set_ylabel("speedup over plain decoding")
    ax.legend(fontsize=7)
    fig.tight_layout()
    files.append(os.path.join(out_dir, "speedup_vs_k.png"))
    fig.savefig(files[-1], dpi=110)
    fig, ax = plt.subplots(figsize=(6, 4))
    kmax = max(r["k"] for r in rows)
    for kind in kinds:
        r = [r for r in rows if r["prompt"] == kind and r["k"] == kmax][0]
        ax.plot(range(1, kmax + 1), r["per_position"], "o-", label=kind)
    ax.set_xlabel("draft position")
    ax.set_ylabel(f"acceptance rate (k = {kmax})")
    ax.set_ylim(0, 1)
    ax.legend()
    fig.tight_layout()
    files.append(os.path.join(out_dir, "acceptance_by_position.png"))
    fig.savefig(files[-1], dpi=110)
    return files


def compare_transformers(model_dir, asst_dir, tok, args, dtype) -> dict:
    """The same checkpoint through transformers' generate, plain and with assistant_model (kv-sharing fix applied):
    median tok/s on the code prompts, {"plain": ..., "assisted": ...}."""
    # the model classes take seconds to import, and only --compare-transformers needs them
    from transformers import Gemma4AssistantForCausalLM, Gemma4ForCausalLM

    patch_transformers()
    t = Gemma4ForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    a = Gemma4AssistantForCausalLM.from_pretrained(asst_dir, dtype=dtype).eval() if asst_dir else None
    t.generation_config.eos_token_id = None
    out = {"plain": [], "assisted": []}
    ids_all = [tok(p, return_tensors="pt")["input_ids"] for p in PROMPTS["code"]]
    kw = dict(max_new_tokens=args.max_new_tokens, do_sample=False, min_new_tokens=args.max_new_tokens)
    with torch.inference_mode():
        for ids in ids_all[:1]:  # warm-up
            t.generate(ids, attention_mask=torch.ones_like(ids), **kw)
            if a is not None:
                t.generate(ids, attention_mask=torch.ones_like(ids), assistant_model=a, **kw)
        for _ in range(args.repeats):
            for ids in ids_all:
                for name, extra in (("plain", {}), ("assisted", {"assistant_model": a})):
                    if name == "assisted" and a is None:
                        continue
                    t0 = time.perf_counter()
                    o = t.generate(ids, attention_mask=torch.ones_like(ids), **kw, **extra)
                    out[name].append((o.shape[1] - ids.shape[1]) / (time.perf_counter() - t0))
    return {k: _median(v) for k, v in out.items()}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m minimtp.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None)
    p.add_argument("--assistant", default=None)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--draft-dtype", default="auto", help="assistant dtype (see python -m minimtp.generate --help)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is stable on a 2-vCPU VM)")
    p.add_argument("--ks", default="2,3,4,5,6,8", help="draft lengths to try")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompts", default="code,json,list,prose", help="comma-separated prompt types")
    p.add_argument("--attention", choices=["torch", "triton"], default="torch")
    p.add_argument("--reference", action="store_true", help="the pure reference Engine (no CPU fast path)")
    p.add_argument("--out", default="bench_results", help="directory for bench.md, bench.json and the plots")
    p.add_argument("--compare-transformers", action="store_true")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        model_dir, asst_dir, tok, (target, _, engine) = load_bench_pair(args)
        dtype = weights_dtype(target)  # what --dtype resolved to
        ks = [int(x) for x in args.ks.split(",")]
        kinds = args.prompts.split(",")
        unknown = [k for k in kinds if k not in PROMPTS]
        if unknown:
            print(f"error: unknown prompt type(s) {unknown}, expected some of {list(PROMPTS)}", file=sys.stderr)
            return 2
        res = run_minimtp(engine, tok, {k: PROMPTS[k] for k in kinds}, ks, args)
    except MinimtpError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rows = summarize(res, ks)
    header = (
        f"minimtp bench: {os.path.basename(os.path.abspath(model_dir))} ({dtype}, assistant "
        f"{weights_dtype(engine.assistant)}), {'reference Engine' if args.reference else 'FastEngine'}, "
        f"{args.threads} thread(s), "
        f"T={args.temperature}, {args.max_new_tokens} new tokens, median of {args.repeats} interleaved repeats"
    )
    md = markdown(rows, header)
    report = {"rows": rows, "args": vars(args)}
    if args.compare_transformers:
        tf = compare_transformers(model_dir, asst_dir, tok, args, getattr(torch, dtype))
        code = [r for r in rows if r["prompt"] == "code"] or rows
        best = max(code, key=lambda r: r["spec_tps"])
        assisted = tf.get("assisted", float("nan"))
        report["transformers"] = tf
        md += (
            f"\n\ntransformers generate on the code prompts: plain {tf['plain']:.1f} tok/s, assisted "
            f"{assisted:.1f} tok/s. minimtp (k={best['k']}): {best['spec_tps']:.1f} tok/s = "
            f"**{best['spec_tps'] / tf['plain']:.2f}×** transformers plain, "
            f"**{best['spec_tps'] / assisted:.2f}×** transformers assisted."
        )
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench.md"), "w") as f:
        f.write(md + "\n")
    with open(os.path.join(args.out, "bench.json"), "w") as f:
        json.dump(report, f, indent=1)
    pngs = plots(rows, args.out)
    print(md)
    print(f"\nwrote {args.out}/bench.md, bench.json, " + ", ".join(os.path.basename(x) for x in pngs))
    return 0
