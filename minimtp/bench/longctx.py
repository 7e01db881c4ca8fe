"""``python -m minimtp.bench longctx``: how the per-token cost of plain and speculative decoding grows with context.

For each context length n a prompt of n tokens (minimtp's own source files, always ending with the same 256
tokens, so that what is predicted next is the same at every length) is prefilled and continued for
``--new-tokens`` tokens, plain (no assistant) and speculatively (k drafts), on the reference Engine and on the
FastEngine. Reported per run (median of the repeats): decode time per token after the
first (prefill excluded), time to first token, and for the speculative runs the draft and verify time per round
and the mean acceptance length τ. The claim checked is the one of docs/benchmarks.md "Long context": the
speculative per-token cost grows no faster with n than the plain one,

    slope_spec = (Δ t_draft_round + Δ t_verify_round) / τ   ≤   slope_plain = Δ t_step,

which holds when the drafter's k attention reads per round (one per draft step, over the same target K/V) cost no
more than the τ − 1 target steps a round saves. The embedded pair was trained on 4,096 positions; ``--max-positions``
raises the engine's limit so the cost can be measured beyond it (RoPE is defined at every position; the acceptance
there is whatever the model gives, and is reported).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
from pathlib import Path

import torch

from minimtp import Engine, load_assistant, load_target
from minimtp.errors import MinimtpError
from minimtp.fast import FastEngine
from minimtp.flags import DEFAULT_DIR
from minimtp.tokenizer import load_tokenizer

PACKAGE = Path(__file__).resolve().parents[1]  # minimtp/: its source files make the long prompts
TAIL = 256  # every prompt ends with the same tokens, so acceptance compares like with like


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m minimtp.bench longctx", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="target directory (default: the embedded pair)")
    p.add_argument("--assistant", default=None)
    p.add_argument(
        "--tokenizer",
        default=None,
        help="tokenizer directory (default: the model's; a random-weight "
        "`realsize` checkpoint has none: the embedded pair's ids fit its vocabulary)",
    )
    p.add_argument("--dtype", default="float32")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--contexts", default="16,1000,4000,16000", help="comma-separated prompt lengths in tokens")
    p.add_argument("--k", type=int, default=4, help="drafts per round")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--engines", default="reference,fast", help="reference and/or fast")
    p.add_argument("--max-positions", type=int, default=32768, help="the engine's context limit for the run")
    p.add_argument("--out", default="bench_results")
    return p


def long_prompt(tok, n: int) -> list[int]:
    """n tokens ending with the same TAIL tokens (the start of minimtp/engine.py), after n - TAIL tokens of the other
    source files of minimtp (repeated if they are shorter)."""
    tail = tok((PACKAGE / "engine.py").read_text(encoding="utf-8"), verbose=False)["input_ids"][:TAIL]
    sources = [p for p in sorted(PACKAGE.glob("**/*.py")) if p.name != "engine.py"]
    text = "".join(p.read_text(encoding="utf-8") for p in sources)
    ids = tok(text, verbose=False)["input_ids"]
    head = (ids * (n // len(ids) + 1))[: max(0, n - TAIL)]
    return head + tail[len(tail) - min(n, TAIL) :]


def measure(engine, prompt: list[int], k: int, new: int, repeats: int) -> dict:
    """Median decode ms/token, ttft, draft and verify ms per round, τ of ``repeats`` generations."""
    runs = []
    for _ in range(repeats):
        kw = dict(num_speculative_tokens=k) if k else {}
        st = engine.generate([prompt], new, temperature=0.0, stop_token_ids=[], **kw).stats
        rounds = max(st.target_steps, 1)
        runs.append(
            dict(
                ms_per_token=(st.elapsed_s - st.ttft_s) / max(st.generated_tokens - 1, 1) * 1e3,
                ttft_s=st.ttft_s,
                draft_ms_per_round=st.draft_s / rounds * 1e3,
                verify_ms_per_round=st.verify_s / rounds * 1e3,
                tau=st.mean_acceptance_length,
            )
        )
    return {key: statistics.median(r[key] for r in runs) for key in runs[0]}


def markdown(rows: list[dict], header: str) -> str:
    """The table of the rows under ``header``, and per engine the growth per 1,000 tokens of context from the first
    context length to the last (none with one length)."""
    lines = [
        header,
        "",
        "| engine | context | plain ms/token | spec ms/token | spec / plain | τ | draft ms/round | "
        "verify ms/round | plain step ms | prefill s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        p = r["plain"]
        s = r["spec"]
        lines.append(
            f"| {r['engine']} | {r['context']:,} | {p['ms_per_token']:.2f} | {s['ms_per_token']:.2f} | "
            f"{s['ms_per_token'] / p['ms_per_token']:.2f} | {s['tau']:.2f} | {s['draft_ms_per_round']:.2f} | "
            f"{s['verify_ms_per_round']:.2f} | {p['verify_ms_per_round']:.2f} | {p['ttft_s']:.2f} |"
        )
    for eng in dict.fromkeys(r["engine"] for r in rows):
        rs = [r for r in rows if r["engine"] == eng]
        first = rs[0]
        last = rs[-1]
        dn = (last["context"] - first["context"]) / 1000
        if dn <= 0:
            continue  # one context length: no slope
        sp = (last["plain"]["ms_per_token"] - first["plain"]["ms_per_token"]) / dn
        ss = (last["spec"]["ms_per_token"] - first["spec"]["ms_per_token"]) / dn
        lines.append(f"\n{eng}: per 1,000 tokens of context, plain {sp:+.2f} ms/token, speculative {ss:+.2f} ms/token")
    return "\n".join(lines)


def plot(rows: list[dict], path: str) -> None:
    """longctx.png: plain and speculative decode ms/token against context, per engine."""
    import matplotlib  # an optional extra (pip install minimtp[plots])

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for eng, style in (("reference", "--"), ("fast", "-")):
        rs = [r for r in rows if r["engine"] == eng]
        if rs:
            n = [r["context"] for r in rs]
            ax.plot(n, [r["plain"]["ms_per_token"] for r in rs], "o" + style, label=f"{eng}: plain")
            ax.plot(n, [r["spec"]["ms_per_token"] for r in rs], "s" + style, label=f"{eng}: speculative")
    ax.set_xscale("log")
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("decode ms / token")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def run(args, model_dir: str, asst_dir: str) -> list[dict]:
    """One row per (engine, context length): the plain and the speculative ``measure``. Raises MinimtpError."""
    contexts = [int(x) for x in args.contexts.split(",")]
    if max(contexts) + args.new_tokens + args.k + 2 > args.max_positions:
        raise MinimtpError(f"--contexts up to {max(contexts)} need --max-positions > {args.max_positions}")
    tok = load_tokenizer(args.tokenizer or model_dir)
    rows = []
    for eng in args.engines.split(","):
        if eng not in ("reference", "fast"):
            raise MinimtpError(f"--engines: {eng!r}, expected 'reference' and/or 'fast'")
        target = load_target(model_dir, dtype=args.dtype)  # fresh models: the fast path rewrites them
        target.config = dataclasses.replace(target.config, max_position_embeddings=args.max_positions)
        assistant = load_assistant(asst_dir, target, dtype=args.dtype)
        make = Engine if eng == "reference" else FastEngine
        plain_engine = make(target)
        spec_engine = make(target, assistant)
        for e in (plain_engine, spec_engine):  # warm-up
            e.generate([long_prompt(tok, 300)], 16)
        for n in contexts:
            prompt = long_prompt(tok, n)
            row = dict(engine=eng, context=n)
            row["plain"] = measure(plain_engine, prompt, 0, args.new_tokens, args.repeats)
            row["spec"] = measure(spec_engine, prompt, args.k, args.new_tokens, args.repeats)
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    return rows


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    torch.set_flush_denormal(True)
    torch.set_num_threads(args.threads)
    model_dir = args.model or os.path.join(DEFAULT_DIR, "target")
    asst_dir = args.assistant or os.path.join(DEFAULT_DIR, "assistant")
    try:
        if args.model and not args.assistant:
            raise MinimtpError("--assistant DIR is required with --model")
        rows = run(args, model_dir, asst_dir)
    except MinimtpError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    header = (
        f"minimtp bench longctx: {os.path.basename(os.path.abspath(model_dir))} ({args.dtype}), k = {args.k}, "
        f"{args.threads} thread(s), greedy, {args.new_tokens} new tokens, median of {args.repeats} runs"
    )
    md = markdown(rows, header)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "longctx.json"), "w") as f:
        json.dump({"rows": rows, "args": vars(args)}, f, indent=1)
    with open(os.path.join(args.out, "longctx.md"), "w") as f:
        f.write(md + "\n")
    plot(rows, os.path.join(args.out, "longctx.png"))
    print(md)
    print(f"\nwrote {args.out}/longctx.md, longctx.json, longctx.png")
    return 0
