"""``python -m minimtp.bench controls``: what each decoding control costs per token, plain and speculative.

For every control (none, penalties, stop strings, a regex, a JSON Schema, token healing) the same prompts are decoded
plain (k = 0) and speculatively; the table gives tok/s (median over the repeats of the prompts), the decode time per
token after the first (prefill excluded), the part of it spent applying the controls (penalties + grammar masks,
timed around the engine's one call site) and the draft acceptance. Runs make max_new_tokens tokens (stop tokens off)
except under a grammar, which ends when its text is complete. A second table gives the acceptance on JSON prompts
with and without a schema, a third the per-row cost of the processed distribution at Gemma's real vocabulary
(262,144 tokens): top-p without top-k in the reference and its fast twin, the penalties, applying a mask.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

import minimtp.engine as engine_mod
from minimtp.bench.timing import load_bench_pair, median_ms, top_p_ms
from minimtp.controls import Penalties, apply_penalties
from minimtp.errors import MinimtpError
from minimtp.sampling import SamplingParams, process_logits

CONTROLS = {
    "none": {},
    "repetition 1.3": dict(repetition_penalty=1.3),
    "presence 0.5 + frequency 0.5": dict(presence_penalty=0.5, frequency_penalty=0.5),
    "stop strings": dict(stop=["\n\n\n", "if __name__"]),
    "regex": dict(regex=r"(    [^\n]*\n){1,40}"),
    "json schema": dict(json_schema={"type": "object", "additionalProperties": {"type": ["string", "integer"]}}),
    "token healing": dict(token_healing=True),
}
CODE = ["def fibonacci(n):\n", "class Stack:\n    def __init__(self):\n", "import os\nimport sys\n\n\ndef main():\n"]
JSON = [  # prompts after which JSON is a natural continuation (the first is the main bench's "json" prompt)
    '# Fix the JSON below\ndata = {"name": "minimtp", "version": 1, "tags": ["fast", "exact",], }\nfixed = ',
    "data = json.loads('",
    "print(json.dumps(",
]
RECORD = {  # the shape of the bench's JSON prompt
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "version": {"type": "integer"},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 4},
    },
    "required": ["name", "version", "tags"],
    "additionalProperties": False,
}


def _timed_controls():
    """Wrap the engine's ``_controlled`` to add up its wall time: (the real function, for the caller to restore,
    and a one-element list holding the seconds spent in it)."""
    real = engine_mod._controlled
    spent = [0.0]

    def timed(*a, **kw):
        t0 = time.perf_counter()
        out = real(*a, **kw)
        spent[0] += time.perf_counter() - t0
        return out

    engine_mod._controlled = timed
    return real, spent


def run_controls(engine, tok, args) -> list[dict]:
    """One row per (control, k in {0, args.k}) on the code prompts: median tok/s, decode ms per token, of which
    the controls' share, acceptance."""
    enc = [tok(p)["input_ids"] for p in CODE]
    gen = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed)
    rows = []
    real, spent = _timed_controls()
    try:
        for name, kw in CONTROLS.items():
            for k in (0, args.k):
                # no stop tokens (every run makes max_new_tokens) except under a grammar, which ends at its end
                ends = {} if "regex" in kw or "json_schema" in kw else {"stop_token_ids": []}
                call = dict(num_speculative_tokens=max(k, 1), use_assistant=k > 0, **gen, **kw, **ends)
                engine.generate(enc[:1], **call)  # warm-up
                stats = []
                ctl_s = 0.0
                for _ in range(args.repeats):
                    for ids in enc:
                        spent[0] = 0.0
                        stats.append(engine.generate([ids], **call).stats)
                        ctl_s += spent[0]
                toks = sum(s.generated_tokens for s in stats)
                tps = sorted(s.tokens_per_second for s in stats)[len(stats) // 2]
                decode_s = sum(s.elapsed_s - s.ttft_s for s in stats) / max(1, toks - len(stats))
                drafted = sum(s.drafted for s in stats)
                accepted = sum(s.accepted for s in stats)
                rows.append(
                    dict(
                        control=name,
                        k=k,
                        tps=tps,
                        ms_per_token=1e3 * decode_s,
                        acceptance=accepted / drafted if drafted else None,
                        tokens=toks,
                        controls_ms_per_token=1e3 * ctl_s / max(toks, 1),
                    )
                )
    finally:
        engine_mod._controlled = real
    return rows


def json_acceptance(engine, tok, args) -> list[dict]:
    """Acceptance on the JSON prompts unconstrained, with a record schema and with "any object" (k = args.k)."""
    enc = [tok(p)["input_ids"] for p in JSON]
    out = []
    cases = (
        ("unconstrained", {}),
        ("record schema", dict(json_schema=RECORD)),
        ("any object", CONTROLS["json schema"]),
    )
    for name, kw in cases:
        call = dict(max_new_tokens=args.max_new_tokens, num_speculative_tokens=args.k, **kw)
        stats = []
        for _ in range(args.repeats):
            for ids in enc:
                stats.append(engine.generate([ids], **call).stats)
        drafted = sum(s.drafted for s in stats)
        accepted = sum(s.accepted for s in stats)
        mal = 1 + accepted / max(1, sum(s.draft_rounds for s in stats))
        out.append(dict(control=name, acceptance=accepted / drafted if drafted else 0.0, mean_acceptance_length=mal))
    return out


def real_vocab_ms(reps: int = 7, V: int = 262_144, history: int = 1000) -> dict:
    """ms per row at Gemma's vocabulary: top-p 0.95 alone (reference / twin), penalties, applying a mask."""
    g = torch.Generator().manual_seed(0)
    x = 8 * torch.randn(V, generator=g)
    prompt = torch.randint(0, V, (history,), generator=g)
    generated = torch.randint(0, V, (history,), generator=g)
    pen = Penalties(1.3, 0.5, 0.5)
    mask = torch.rand(V, generator=g) < 0.01
    ref, fast = top_p_ms(V, rows=1, peaked=True, reps=reps)
    return {
        "top-p 0.95 alone, reference (full sort)": ref,
        "top-p 0.95 alone, fast twin": fast,
        "top-k 64 + top-p 0.95 (Gemma's defaults)": median_ms(
            lambda: process_logits(x[None], SamplingParams(1.0, 64, 0.95)), reps
        ),
        f"penalties over {history} prompt + {history} generated tokens": median_ms(
            lambda: apply_penalties(x, prompt, generated, pen), reps
        ),
        "grammar mask applied (masked_fill)": median_ms(lambda: x.masked_fill(~mask, float("-inf")), reps),
    }


def markdown(rows: list[dict], js: list[dict], real: dict, args) -> str:
    """The three tables: per control, the JSON prompts' acceptance, the per-row costs at V = 262,144."""
    engine_name = "reference Engine" if args.reference else "FastEngine"
    md = [
        f"controls, {args.threads} thread(s), T={args.temperature}, {args.max_new_tokens} new tokens, "
        f"median over {args.repeats} repeats of {len(CODE)} prompts, {engine_name}",
        "",
        "| control | k | tokens | tok/s | decode ms/token | of which controls | acceptance |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        acc = f"{r['acceptance']:.3f}" if r["acceptance"] is not None else "–"
        md.append(
            f"| {r['control']} | {r['k']} | {r['tokens']} | {r['tps']:.1f} | {r['ms_per_token']:.2f} | "
            f"{r['controls_ms_per_token']:.3f} | {acc} |"
        )
    md += ["", "| JSON prompts | acceptance | mean acceptance length |", "|---|---|---|"]
    for r in js:
        md.append(f"| {r['control']} | {r['acceptance']:.3f} | {r['mean_acceptance_length']:.2f} |")
    md += ["", "| at V = 262,144 (one row) | ms |", "|---|---|"]
    for name, ms in real.items():
        md.append(f"| {name} | {ms:.2f} |")
    return "\n".join(md)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m minimtp.bench controls", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None)
    p.add_argument("--assistant", default=None)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--draft-dtype", default="auto")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("-k", type=int, default=5, help="drafts per round of the speculative rows")
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reference", action="store_true")
    p.add_argument("--attention", choices=["torch", "triton"], default="torch")
    p.add_argument("--out", default="bench_results")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        _, _, tok, (_, _, engine) = load_bench_pair(args)
        rows = run_controls(engine, tok, args)
        js = json_acceptance(engine, tok, args)
        real = real_vocab_ms()
    except MinimtpError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    md = markdown(rows, js, real, args)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "controls.md"), "w") as f:
        f.write(md + "\n")
    with open(os.path.join(args.out, "controls.json"), "w") as f:
        json.dump({"rows": rows, "json": js, "real_vocab_ms": real, "args": vars(args)}, f, indent=1)
    print(md)
    return 0
