"""``python -m minimtp.audit sampling``: is an endpoint's sampling exact? A seeded-sample χ² test against minimtp.

For each prompt, n requests with distinct seeds ask the endpoint for the first m tokens at fixed settings; minimtp
enumerates the exact distribution of those m tokens on the same checkpoint (enumeration.py; a small top-k keeps it
enumerable) and Pearson's χ² compares the counts of the returned texts with it (cells of expected count < 5
pooled), summed over prompts. A text outside the exact support is impossible for an exact sampler: the verdict
fails on it alone. The power is stated as the smallest total-variation distance (between the pooled distributions)
the test detects with probability ``power`` at level ``alpha`` for that N (stats.detectable_tv). An exact
speculative engine passes at any draft length and draft mode (docs: concepts/speculative-decoding); transformers'
argmax drafts verified as if sampled, or penalties that lag the drafts, do not (docs: guides/audit).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter

from minimtp.audit.endpoint import OpenAIEndpoint
from minimtp.audit.enumeration import by_text, first_tokens
from minimtp.audit.inputs import DEFAULT_PROMPTS, add_sampling_flags, prompt_ids, read_prompts, sampling_params
from minimtp.audit.stats import chi2_sf, detectable_tv, pooled_chi2
from minimtp.controls.penalties import Penalties
from minimtp.errors import ConfigError, MinimtpError
from minimtp.flags import DEFAULT_DIR
from minimtp.model import load_target
from minimtp.sampling import SamplingParams
from minimtp.tokenizer import load_tokenizer


def request_settings(params: SamplingParams, penalties: Penalties) -> dict:
    """The body fields of the audit's settings (OpenAI's and vLLM's names)."""
    out = {"temperature": params.temperature}
    for name, v in (("top_k", params.top_k), ("top_p", params.top_p), ("min_p", params.min_p)):
        if v is not None:
            out[name] = v
    if penalties.repetition != 1.0:
        out["repetition_penalty"] = penalties.repetition
    if penalties.presence:
        out["presence_penalty"] = penalties.presence
    if penalties.frequency:
        out["frequency_penalty"] = penalties.frequency
    return out


def audit_sampling(
    endpoint,
    target,
    tokenizer,
    prompts: list,
    *,
    m: int = 3,
    n: int = 500,
    params: SamplingParams,
    penalties: Penalties | None = None,
    seed: int = 0,
    alpha: float = 1e-3,
    power: float = 0.9,
    send_ids: bool = False,
) -> dict:
    """The test (module docstring) of ``endpoint`` (endpoint.Endpoint) on ``prompts`` (strings or token-id lists).
    ``tokenizer`` None: prompts are token ids, the endpoint returns token ids, and outcomes are compared as ids."""
    if n < 1 or m < 1:
        raise ConfigError(f"samples={n}, tokens={m}: expected integers >= 1")
    penalties = penalties or Penalties()
    settings = request_settings(params, penalties)
    ids = prompt_ids(prompts, tokenizer)
    rows = []
    for i, (prompt, pid) in enumerate(zip(prompts, ids)):
        dist = first_tokens(target, pid, m, params, penalties)
        exact = by_text(dist, tokenizer) if tokenizer is not None else dist
        seeds = [seed + i * n + s for s in range(n)]
        sent = pid if send_ids or not isinstance(prompt, str) else prompt
        got = endpoint.complete(sent, seeds, m, settings)
        texts = [_outcome(t, tokenizer) for t in got]
        counts = Counter(texts)
        outside = sum(c for t, c in counts.items() if t not in exact)
        cells = sorted(exact)
        chi2, df = pooled_chi2([counts.get(t, 0) for t in cells], [exact[t] for t in cells])
        worst = sorted(cells, key=lambda t: -abs(counts.get(t, 0) - n * exact[t]))[:3]
        rows.append(
            {
                "prompt": prompt,
                "samples": n,
                "support": len(cells),
                "seen": len(counts),
                "outside_support": outside,
                "outside_examples": [t for t in counts if t not in exact][:3],
                "chi2": chi2,
                "df": df,
                "p_value": 0.0 if outside else chi2_sf(chi2, df),
                "largest_gaps": [{"text": t, "observed": counts.get(t, 0), "expected": n * exact[t]} for t in worst],
            }
        )
    chi2 = sum(r["chi2"] for r in rows)
    df = sum(r["df"] for r in rows)
    outside = sum(r["outside_support"] for r in rows)
    p = 0.0 if outside else chi2_sf(chi2, df)
    total = n * len(rows)
    return {
        "settings": {**settings, "tokens": m, "samples_per_prompt": n, "prompts": len(rows), "seed": seed},
        "prompts": rows,
        "chi2": chi2,
        "df": df,
        "p_value": p,
        "alpha": alpha,
        "outside_support": outside,
        "verdict": "pass" if p >= alpha else "fail",
        "power": {
            "power": power,
            "tv_every_prompt": detectable_tv(total, df, alpha, power),  # the same bias at every prompt
            "tv_one_prompt": detectable_tv(n, df, alpha, power) if df else None,  # a bias at one prompt only
        },
    }


def _outcome(got, tokenizer):
    """A returned continuation as the enumeration keys it: text, or (without a tokenizer) a tuple of ids."""
    if isinstance(got, str):
        if tokenizer is None:
            raise ConfigError("the endpoint returned text but the audit has no tokenizer to compare texts with")
        return got
    if tokenizer is None:
        return tuple(int(t) for t in got)
    return tokenizer.decode(list(got), skip_special_tokens=True)


def format_report(res: dict, where: str) -> str:
    s = res["settings"]
    knobs = ", ".join(f"{k}={v}" for k, v in s.items() if k not in ("tokens", "samples_per_prompt", "prompts"))
    lines = [f"sampling audit of {where}: {s['prompts']} prompts x {s['samples_per_prompt']} seeded samples of the "]
    lines[0] += f"first {s['tokens']} tokens ({knobs})"
    for i, r in enumerate(res["prompts"]):
        lines.append(
            f"  prompt {i}: {r['seen']} texts seen of {r['support']} possible, chi2 {r['chi2']:.1f} on {r['df']} df, "
            f"p = {r['p_value']:.3g}"
            + (f", {r['outside_support']} outside the support" if r["outside_support"] else "")
        )
    pw = res["power"]
    lines += [
        f"combined: chi2 {res['chi2']:.1f} on {res['df']} df, p = {res['p_value']:.3g} -> "
        f"{res['verdict'].upper()} at alpha = {res['alpha']:g}",
        f"power: a bias of total variation >= {pw['tv_every_prompt']:.4f} at every prompt (or >= "
        f"{pw['tv_one_prompt'] or float('inf'):.4f} at one prompt alone) is detected with probability "
        f">= {pw['power']:g} at this N and alpha",
    ]
    if res["outside_support"]:
        ex = next(r["outside_examples"] for r in res["prompts"] if r["outside_support"])
        lines.append(
            f"{res['outside_support']} returned texts are impossible under the exact distribution (e.g. {ex[0]!r}): "
            "a wrong sampler, or a different checkpoint, tokenizer, prompt or settings than --checkpoint's"
        )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m minimtp.audit sampling", description=__doc__.split("\n\n")[0])
    p.add_argument("--base-url", required=True, help="the endpoint's OpenAI base URL, e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--model", default=None, help="the served model name (the body's model field)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--checkpoint", default=None, help="the same checkpoint, local (default: the embedded target)")
    p.add_argument("--dtype", default="float32", help="the reference's dtype (default float32)")
    p.add_argument("--prompts", help="prompts file (default: four built-in prompts)")
    p.add_argument("--tokens", type=int, default=3, help="m, the tokens per sample (default 3)")
    p.add_argument("--samples", type=int, default=500, help="seeded requests per prompt (default 500)")
    add_sampling_flags(p)
    p.set_defaults(top_k=4)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--presence-penalty", type=float, default=0.0)
    p.add_argument("--frequency-penalty", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0, help="the first seed (request s of prompt i: seed + i*n + s)")
    p.add_argument("--alpha", type=float, default=1e-3, help="the test's level (default 1e-3)")
    p.add_argument("--send-ids", action="store_true", help="send token-id prompts instead of text")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--json", action="store_true")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        ckpt = args.checkpoint or f"{DEFAULT_DIR}/target"
        target = load_target(ckpt, dtype=args.dtype)
        tok = load_tokenizer(ckpt)
        prompts = read_prompts(args.prompts) if args.prompts else DEFAULT_PROMPTS[:4]
        pen = Penalties(args.repetition_penalty, args.presence_penalty, args.frequency_penalty).validate()
        endpoint = OpenAIEndpoint(args.base_url, args.model, args.api_key, args.concurrency)
        res = audit_sampling(
            endpoint,
            target,
            tok,
            prompts,
            m=args.tokens,
            n=args.samples,
            params=sampling_params(args),
            penalties=pen,
            seed=args.seed,
            alpha=args.alpha,
            send_ids=args.send_ids,
        )
    except MinimtpError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(res, indent=2) if args.json else format_report(res, args.base_url))
    return 0 if res["verdict"] == "pass" else 1
