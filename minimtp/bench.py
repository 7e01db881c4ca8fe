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
import importlib
import json
import os
import statistics
import sys
import time

# python -m minimtp.bench NAME ...: the other benchmarks, one module each
SUBCOMMANDS = {
    "controls": "minimtp.bench_controls",  # the cost of each decoding control
    "serve": "minimtp.bench_serve",  # the server's throughput and latency by concurrency
    "realsize": "minimtp.bench_realsize",  # random-weight checkpoints of the real sizes (and their sizes on paper)
    "compare": "minimtp.bench_compare",  # minimtp and transformers side by side on one checkpoint
    "longctx": "minimtp.bench_longctx",  # plain and speculative per-token cost by context length
}
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
    return statistics.median(xs) if xs else float("nan")


def predicted_speedup(alpha: float, k: int, c: float) -> float:
    """Leviathan et al.: expected tokens per round (1−α^(k+1))/(1−α) over the round's cost k·c + 1."""
    if alpha >= 1.0:
        return (k + 1) / (k * c + 1)
    return (1 - alpha ** (k + 1)) / ((1 - alpha) * (k * c + 1))


def alpha_from_acceptance_length(mal: float, k: int) -> float:
    """The per-token acceptance α of the i.i.d. model whose expected tokens per round (1−α^(k+1))/(1−α) equals
    the measured mean acceptance length (bisection; accepted/drafted is (α+…+α^k)/k, not α)."""
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if sum(mid**j for j in range(k + 1)) < mal:
            lo = mid
        else:
            hi = mid
    return lo


def run_minimtp(engine, tok, prompts: dict, ks: list[int], args) -> dict:
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
    rows = []
    for kind, by_k in res.items():
        plain = by_k[0]
        tps0 = _median([s.tokens_per_second for s in plain])
        t_target = sum(s.verify_s for s in plain) / max(1, sum(s.target_steps for s in plain))
        for k in ks:
            st = by_k[k]
            drafted, accepted = sum(s.drafted for s in st), sum(s.accepted for s in st)
            rounds = sum(s.draft_rounds for s in st)
            alpha = accepted / drafted if drafted else 0.0
            t_draft = sum(s.draft_s for s in st) / max(1, drafted)
            t_verify = sum(s.verify_s for s in st) / max(1, sum(s.target_steps for s in st))
            mal = 1 + accepted / rounds if rounds else 1.0
            tps = _median([s.tokens_per_second for s in st])
            c = t_draft / t_target if t_target else float("nan")
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
                    alpha_iid=alpha_from_acceptance_length(mal, k),
                    predicted_leviathan=predicted_speedup(alpha_from_acceptance_length(mal, k), k, c),
                    predicted_measured_costs=mal * t_target / (k * t_draft + t_verify) if t_verify else float("nan"),
                    per_position=pos,
                )
            )
    return rows


def markdown(rows: list[dict], header: str) -> str:
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
    import matplotlib

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
    """The same checkpoint through transformers' generate, plain and with assistant_model (kv-sharing fix applied)."""
    import torch
    from transformers import Gemma4AssistantForCausalLM, Gemma4ForCausalLM

    from minimtp.hf_compat import patch_transformers

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


def median_ms(fn, reps: int) -> float:
    """Median wall time of ``fn()`` over ``reps`` calls, in milliseconds."""
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t) * 1e3)
    return statistics.median(ts)


def prefilled_cache(target, past: int, room: int, attention_backend: str = "torch", seed: int = 0):
    """A one-sequence paged KV cache (sequence 0) holding ``past`` random tokens run through ``target``, with room
    for ``room`` more. Returns ``(cache, forward, ids, hidden)``: ``forward(start, count)`` runs ``ids[start:
    start + count]`` at those positions over the cache (logits for every row, as a verify step), ``ids`` holds
    ``past + room`` random token ids, ``hidden`` is the target's hidden state at ``past - 1``."""
    import torch

    from minimtp.attention import PagedContext, get_attention_backend
    from minimtp.kv_cache import KVCache

    cfg, w = target.config, target.model.embed_tokens.weight
    block = 16
    blocks = -(-(past + room) // block) + 1
    cache = KVCache(cfg, {t: blocks for t in set(cfg.layer_types)}, block, None, w.dtype, w.device)
    cache.add(0)
    attend = get_attention_backend(attention_backend)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, cfg.vocab_size, (past + room,), generator=gen).to(w.device)

    def forward(start: int, count: int):
        cache.reserve(0, start + count)
        ctx = PagedContext(cache, attend, [0], [start], [count])
        pos = torch.arange(start, start + count, device=w.device)
        return target.run(ids[start : start + count], pos, ctx, logit_rows="all")

    with torch.inference_mode():
        hidden = forward(0, past).hidden[-1:]
    return cache, forward, ids, hidden


def target_forward_ms(target, past=256, ks=(1, 2, 3, 5), reps=30, rounds=3, warmup=10, **kw) -> dict:
    """Median latency (ms) of a k-token forward of ``target`` over a paged cache of ``past`` tokens (logits for all
    k rows, as the verify step of a round), for each k in ``ks``. Every shape is warmed up first (oneDNN builds
    primitives per shape) and the shapes are interleaved over ``rounds`` against drift; ``kw``: attention_backend."""
    import torch

    cache, forward, _, _ = prefilled_cache(target, past, max(ks), **kw)

    def step(k):
        forward(past, k)
        cache.truncate(0, past)

    res = {k: [] for k in ks}
    with torch.inference_mode():
        for k in ks:
            for _ in range(warmup):
                step(k)
        for _ in range(rounds):
            for k in ks:
                res[k].append(median_ms(lambda k=k: step(k), reps))
    return {k: statistics.median(v) for k, v in res.items()}


def assistant_step_ms(target, assistant, past: int = 256, reps: int = 50, rounds: int = 3, **kw) -> float:
    """Median latency (ms) of one drafting step of ``assistant`` (its forward and the argmax) at position
    ``past`` over ``target``'s paged cache of ``past`` tokens, as in a round of the engine; ``kw``:
    attention_backend."""
    import torch

    from minimtp.attention import DraftPagedContext, get_attention_backend

    cache, _, ids, hidden = prefilled_cache(target, past, 1, **kw)
    attend = get_attention_backend(kw.get("attention_backend", "torch"))
    ctx = DraftPagedContext(cache, assistant.config.text, attend, [0], [past])
    pos = torch.tensor([past], device=hidden.device)

    def step():
        logits, _ = assistant.step(target.embed(ids[past : past + 1]), hidden, pos, ctx)
        logits.float().argmax(-1)

    with torch.inference_mode():
        for _ in range(20):
            step()
        return statistics.median(median_ms(step, reps) for _ in range(rounds))


def top_p_ms(V: int = 262_144, rows: int = 1, peaked: bool = True, reps: int = 7) -> tuple[float, float]:
    """Milliseconds per row of ``process_logits`` at T = 1, top-p 0.95 alone, on ``rows`` random float32 logit rows
    (8·randn, a small nucleus, if ``peaked``; else 3·randn): (reference, fast twin), median of ``reps`` each."""
    import torch

    from minimtp.fast.top_p import process_logits as fast_process_logits
    from minimtp.sampling import SamplingParams, process_logits

    x = (8.0 if peaked else 3.0) * torch.randn(rows, V, generator=torch.Generator().manual_seed(0))
    params = SamplingParams(1.0, top_p=0.95)
    return tuple(median_ms(lambda f=f: f(x, params), reps) / rows for f in (process_logits, fast_process_logits))


def load_bench_pair(args):
    """(model dir, assistant dir, tokenizer, (target, assistant, engine)) as the shared flags ask, after setting the
    thread count; the embedded pair without --model. Raises MinimtpError (one line)."""
    import torch

    from minimtp.errors import ConfigError
    from minimtp.generate import DEFAULT_DIR, load_pair, load_tokenizer

    torch.set_flush_denormal(True)
    torch.set_num_threads(args.threads)
    model_dir = args.model or os.path.join(DEFAULT_DIR, "target")
    asst_dir = args.assistant or (None if args.model else os.path.join(DEFAULT_DIR, "assistant"))
    if asst_dir is None:
        raise ConfigError("--assistant DIR is required with --model")
    return model_dir, asst_dir, load_tokenizer(model_dir), load_pair(model_dir, asst_dir, args)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] and argv[0] in SUBCOMMANDS:  # python -m minimtp.bench controls|serve|realsize|longctx ...
        return importlib.import_module(SUBCOMMANDS[argv[0]]).main(argv[1:])
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
    args = p.parse_args(argv)

    import torch

    from minimtp.errors import MinimtpError
    from minimtp.fast import weights_dtype

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
        report["transformers"] = tf
        md += (
            f"\n\ntransformers generate on the code prompts: plain {tf['plain']:.1f} tok/s, assisted "
            f"{tf.get('assisted', float('nan')):.1f} tok/s. minimtp (k={best['k']}): {best['spec_tps']:.1f} tok/s = "
            f"**{best['spec_tps'] / tf['plain']:.2f}×** transformers plain, "
            f"**{best['spec_tps'] / tf.get('assisted', float('nan')):.2f}×** transformers assisted."
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


if __name__ == "__main__":
    sys.exit(main())
