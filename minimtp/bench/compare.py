"""``python -m minimtp.bench compare``: minimtp and transformers side by side on one checkpoint, at any size.

Each side runs in its own child process (so peak RSS is its own) on the same files, dtype, thread count and prompt
(``--prompt-tokens`` seeded random ids) and reports: load time, peak RSS against the bytes of the weights, prefill
time, plain greedy decode tok/s (after the first token). minimtp also reports its draft-step cost ratio c, the cost of
verifying k + 1 tokens relative to one (k = 1..7), sampling tok/s at Gemma's defaults (T = 1, top-k 64, top-p 0.95)
and with top-p alone, and the speedup Leviathan et al.'s model predicts from c, the verify cost and the published
acceptance below. The roofline: a decode step must read every weight once except the embedding tables, of which it
reads one row (the tied head reads the whole embedding), so ``tok/s ≤ bandwidth / bytes``, with the bandwidth
measured here (``x.sum()`` over 2 GB, same threads). docs: benchmarks, "Real sizes".
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

from minimtp import Engine, load_assistant, load_target
from minimtp.bench.speedup import alpha_from_acceptance_length, predicted_speedup
from minimtp.bench.timing import assistant_step_ms, target_forward_ms
from minimtp.checkpoint import read_json
from minimtp.errors import ConfigError
from minimtp.fast import FastEngine

# Published mean acceptance lengths of Gemma 4 MTP drafters: (where, k, acceptance length or rate)
PUBLISHED = [
    ("vLLM, 31B + assistant, coding, T = 1 (vllm-project/vllm#41745)", 7, "length", 5.37),
    ("llama.cpp, 31B + assistant, per-task low (ggml-org/llama.cpp#23398)", 4, "rate", 0.66),
    ("llama.cpp, 31B + assistant, per-task high (ggml-org/llama.cpp#23398)", 4, "rate", 0.89),
]
# config.json's model_type -> the transformers class that reads the checkpoint (else Gemma4ForCausalLM)
TRANSFORMERS_CLASSES = {
    "gemma4": "Gemma4ForConditionalGeneration",
    "gemma4_unified": "Gemma4UnifiedForConditionalGeneration",
    "gemma4_unified_text": "Gemma4UnifiedForCausalLM",
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m minimtp.bench compare", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="target directory (text or multimodal layout)")
    p.add_argument("--assistant", default=None, help="assistant directory (for c, the verify cost and sampling)")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--sides", default="minimtp,transformers")
    p.add_argument("--reference", action="store_true", help="the reference Engine (default: FastEngine)")
    p.add_argument("--out", default="bench_results")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return p


def peak_rss_gb() -> float:
    """This process's peak resident set (VmHWM: unlike ru_maxrss it starts afresh at exec)."""
    with open("/proc/self/status") as f:
        kb = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    return kb / 1e6


def bandwidth_gbs(gb: float = 2.0) -> float:
    """Read bandwidth: median of 5 ``x.sum()`` over a ``gb`` GB float32 tensor (after one warm-up)."""
    x = torch.ones(int(gb * 1e9 / 4))
    ts = []
    for _ in range(6):
        t0 = time.perf_counter()
        x.sum()
        ts.append(time.perf_counter() - t0)
    return gb / sorted(ts[1:])[2]


def decode_bytes(target) -> tuple[float, float]:
    """(bytes of all target weights, bytes a decode step reads: all but the embedding tables, plus the tied head)."""
    total = sum(p.numel() * p.element_size() for p in target.state_dict().values())
    m = target.model
    tables = [m.embed_tokens.weight]
    if hasattr(m, "embed_tokens_per_layer"):
        tables.append(m.embed_tokens_per_layer.weight)
    step = total - sum(t.numel() * t.element_size() for t in tables)
    step += m.embed_tokens.weight.numel() * m.embed_tokens.weight.element_size()  # the head (tied or its own)
    return total, step


def prompt_ids(n: int, vocab: int) -> list[int]:
    """``n`` seeded random token ids below min(vocab, 200,000): the same prompt on both sides."""
    return torch.randint(10, min(vocab, 200_000), (n,), generator=torch.Generator().manual_seed(0)).tolist()


def child_minimtp(args) -> dict:
    """The minimtp side (in its own process): load time, RSS, prefill, plain and sampling tok/s, the verify cost of
    k + 1 tokens, and with an assistant its cost ratio c and the speedups predicted at the published acceptance."""
    t0 = time.perf_counter()
    target = load_target(args.model, dtype=args.dtype)
    assistant = load_assistant(args.assistant, target, dtype=args.dtype) if args.assistant else None
    make = Engine if args.reference else FastEngine
    make(target, assistant)  # the fast path rewrites both models here
    plain = make(target)
    res = dict(side="minimtp", load_s=time.perf_counter() - t0, rss_after_load_gb=peak_rss_gb())
    weight_bytes, step_bytes = decode_bytes(target)
    res["weights_gb"] = weight_bytes / 1e9
    res["decode_read_gb"] = step_bytes / 1e9
    prompt = prompt_ids(args.prompt_tokens, target.config.vocab_size)
    plain.generate([prompt[:8]], 2)  # warm-up
    st = plain.generate([prompt], args.new_tokens, stop_token_ids=[]).stats
    res["prefill_s"] = st.ttft_s
    res["plain_tok_s"] = (st.generated_tokens - 1) / (st.elapsed_s - st.ttft_s)
    res["peak_rss_gb"] = peak_rss_gb()  # after load, prefill and plain decoding: what transformers' run does
    for name, kw in (("sampled_tok_s", dict(top_k=64, top_p=0.95)), ("top_p_tok_s", dict(top_p=0.95))):
        st = plain.generate([prompt], args.new_tokens, temperature=1.0, seed=0, stop_token_ids=[], **kw).stats
        res[name] = (st.generated_tokens - 1) / (st.elapsed_s - st.ttft_s)
    ks = tuple(range(1, 9))
    ms = target_forward_ms(target, past=args.prompt_tokens, ks=ks, reps=3, rounds=2, warmup=1)
    res["verify_ratio"] = {k - 1: ms[k] / ms[1] for k in ks[1:]}  # k drafts + the pending token vs one token
    if assistant is not None:
        c = assistant_step_ms(target, assistant, past=args.prompt_tokens, reps=5, rounds=1) / ms[1]
        res["c"] = c
        res["predicted"] = []
        for where, k, kind, value in PUBLISHED:
            a = alpha_from_acceptance_length(value, k) if kind == "length" else value
            tokens = (1 - a ** (k + 1)) / (1 - a)
            refined = tokens / (k * c + res["verify_ratio"][k])
            res["predicted"].append(
                dict(where=where, k=k, alpha=a, leviathan=predicted_speedup(a, k, c), refined=refined)
            )
    res["final_rss_gb"] = peak_rss_gb()
    return res


def child_transformers(args) -> dict:
    """The transformers side (in its own process): load time, RSS, prefill and plain greedy tok/s."""
    import transformers  # seconds to import; only this child needs it

    kind = read_json(os.path.join(args.model, "config.json"), "config.json").get("model_type")
    cls = TRANSFORMERS_CLASSES.get(kind, "Gemma4ForCausalLM")
    t0 = time.perf_counter()
    model = getattr(transformers, cls).from_pretrained(args.model, dtype=getattr(torch, args.dtype)).eval()
    res = dict(side="transformers", cls=cls, load_s=time.perf_counter() - t0, rss_after_load_gb=peak_rss_gb())
    model.generation_config.eos_token_id = None
    vocab = model.config.get_text_config().vocab_size
    ids = torch.tensor([prompt_ids(args.prompt_tokens, vocab)])

    class Clock(transformers.StoppingCriteria):  # defined here: its base class comes with the local import
        """Called by generate after every token: its times give prefill and decode within one call."""

        def __init__(self):
            self.times = []

        def __call__(self, input_ids, scores, **kwargs):
            self.times.append(time.perf_counter())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    def timed(n: int) -> tuple[float, list[float]]:
        clock = Clock()
        start = time.perf_counter()
        model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=n,
            min_new_tokens=n,
            stopping_criteria=transformers.StoppingCriteriaList([clock]),
        )
        return start, clock.times

    with torch.inference_mode():
        timed(2)  # warm-up
        t0, times = timed(args.new_tokens)  # as minimtp's stats: time to the first token, then the rest per token
        res["prefill_s"] = times[0] - t0
        res["plain_tok_s"] = (len(times) - 1) / (times[-1] - times[0])
    res["peak_rss_gb"] = peak_rss_gb()
    return res


def markdown(rows: dict, args, bw: float) -> str:
    """The side-by-side table, the roofline, sampling and verify costs, and the predicted speedups."""
    m = rows.get("minimtp")
    t = rows.get("transformers")
    head = (
        f"`python -m minimtp.bench compare --model {args.model}` ({args.dtype}, {args.threads} thread(s), "
        f"{args.prompt_tokens}-token prompt, {args.new_tokens} new tokens; read bandwidth {bw:.1f} GB/s)"
    )
    lines = [head, "", "| | minimtp | transformers | ratio |", "|---|---|---|---|"]
    table = [
        ("load_s", "load (s)"),
        ("peak_rss_gb", "peak RSS (GB)"),
        ("prefill_s", "prefill (s)"),
        ("plain_tok_s", "plain decode (tok/s)"),
    ]
    for key, name in table:
        a = m.get(key) if m else None
        b = t.get(key) if t else None
        cells = [format(v, ".2f") if v is not None else "–" for v in (a, b)]
        ratio = f"{a / b:.2f}×" if a and b else "–"
        lines.append(f"| {name} | {cells[0]} | {cells[1]} | {ratio} |")
    if m:
        roof = bw / m["decode_read_gb"]
        reached = f"minimtp reaches {m['plain_tok_s'] / roof:.0%}"
        reached += f", transformers {t['plain_tok_s'] / roof:.0%}." if t else "."
        lines += [
            "",
            f"Weights {m['weights_gb']:.2f} GB; a decode step reads {m['decode_read_gb']:.2f} GB, so the "
            f"roofline is {roof:.2f} tok/s: {reached}",
        ]
        lines.append(
            f"Sampling (T = 1, top-k 64, top-p 0.95): {m['sampled_tok_s']:.2f} tok/s; top-p 0.95 alone: "
            f"{m['top_p_tok_s']:.2f} tok/s."
        )
        vr = ", ".join(f"k={k}: {v:.2f}" for k, v in m["verify_ratio"].items())
        lines.append(f"Verify of k + 1 tokens / one token: {vr}.")
        if "c" in m:
            lines += ["", f"Draft step cost c = {m['c']:.3f}. Predicted speedup at published acceptance:", ""]
            lines += ["| source | k | α | Leviathan | with the measured verify cost |", "|---|---|---|---|---|"]
            for p in m["predicted"]:
                lines.append(
                    f"| {p['where']} | {p['k']} | {p['alpha']:.2f} | {p['leviathan']:.2f}× | {p['refined']:.2f}× |"
                )
    return "\n".join(lines)


def run_child(args) -> int:
    """``--child minimtp|transformers``: measure one side and print its results as one ``RESULT {json}`` line."""
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    res = child_minimtp(args) if args.child == "minimtp" else child_transformers(args)
    print("RESULT " + json.dumps(res), flush=True)
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    if args.child:
        return run_child(args)
    for d in [args.model] + ([args.assistant] if args.assistant else []):
        if not os.path.isfile(os.path.join(d, "config.json")):
            print(f"error: {ConfigError(f'{d}: no config.json')}", file=sys.stderr)
            return 2
    torch.set_num_threads(args.threads)
    bw = bandwidth_gbs()
    rows = {}
    for side in args.sides.split(","):  # each side in its own process, so that its peak RSS is its own
        cmd = [sys.executable, "-m", "minimtp.bench", "compare", "--child", side] + argv
        proc = subprocess.run(cmd, capture_output=True, text=True)
        found = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not found:
            tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            print(f"error: the {side} run failed: {tail}", file=sys.stderr)
            return 2
        rows[side] = json.loads(found[0][len("RESULT ") :])
        print(json.dumps(rows[side]), file=sys.stderr, flush=True)
    md = markdown(rows, args, bw)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "compare.json"), "w") as f:
        json.dump({"rows": rows, "bandwidth_gbs": bw, "args": vars(args)}, f, indent=1)
    with open(os.path.join(args.out, "compare.md"), "w") as f:
        f.write(md + "\n")
    print(md)
    return 0
