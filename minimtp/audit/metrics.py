"""``python -m minimtp.audit metrics``: an engine's speculative-decoding counters against the exact expectation.

Reads Prometheus text (``GET /metrics``, or a saved scrape) with vLLM's names (``vllm:spec_decode_num_drafts``,
``..._num_draft_tokens``, ``..._num_accepted_tokens``, ``..._num_accepted_tokens_per_pos{position=j}``; vllm
``v1/spec_decode/metrics.py``) or minimtp's (the same with ``minimtp:``, minimtp/serve/metrics.py), summed over the
other labels (engines, model names); ``--baseline`` subtracts an earlier scrape so only the audited workload counts.
The per-position rate r_j = accepted at j / drafts is compared with the expected one e_j of the same workload
(``audit expected``: from its ``--json`` output, or computed here from the same flags). Under an exact engine r_j is a
mean of D Bernoulli draws, so its standard error is at most sqrt(e_j (1 - e_j) / D); with the expected value's own
standard error s_j (the choice of continuations), z_j = (r_j - e_j) / sqrt(e_j (1 - e_j)/D + s_j²). A position is
flagged when |z_j| > ``--z`` and |r_j - e_j| > ``--tolerance`` (room for a workload that is not exactly the
expected's). The pattern of the flags names the likely causes (docs: guides/audit, "Reading the metrics check").
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import urllib.request

import torch

from minimtp.audit.expected import continuations
from minimtp.audit.expected import run as run_expected
from minimtp.audit.inputs import add_pair_flags, add_sampling_flags, load_models, prompt_ids, read_prompts
from minimtp.errors import ConfigError, MinimtpError
from minimtp.model import load_target
from minimtp.sampling import SamplingParams, process_logits

NAMES = {
    "spec_decode_num_drafts": "drafts",
    "spec_decode_num_draft_tokens": "draft_tokens",
    "spec_decode_num_accepted_tokens": "accepted",
    "spec_decode_num_accepted_tokens_per_pos": "per_pos",
}


def read_text(where: str) -> str:
    """The Prometheus text at an http(s) URL, or in a file."""
    if re.match(r"https?://", where):
        try:
            with urllib.request.urlopen(where, timeout=30) as r:
                return r.read().decode()
        except (OSError, ValueError) as e:
            raise ConfigError(f"{where}: cannot read the metrics ({e})") from None
    try:
        with open(where, encoding="utf-8") as f:
            return f.read()
    except OSError as e:
        raise ConfigError(f"{where}: cannot read the metrics ({e.strerror})") from None


def parse(text: str) -> dict:
    """{"prefix", "drafts", "draft_tokens", "accepted", "per_pos": {j: count}} from Prometheus text."""
    from prometheus_client.parser import text_string_to_metric_families

    out = {"prefix": None, "drafts": 0.0, "draft_tokens": 0.0, "accepted": 0.0, "per_pos": {}}
    found = False
    try:
        families = list(text_string_to_metric_families(text))
    except ValueError as e:
        raise ConfigError(f"not Prometheus text ({e})") from None
    for fam in families:
        for s in fam.samples:
            prefix, _, name = s.name.rpartition(":")
            if name.endswith("_created"):
                continue
            key = NAMES.get(name.removesuffix("_total"))
            if key is None:
                continue
            found = True
            out["prefix"] = prefix
            if key == "per_pos":
                j = int(s.labels.get("position", 0))
                out["per_pos"][j] = out["per_pos"].get(j, 0.0) + s.value
            else:
                out[key] += s.value
    if not found:
        raise ConfigError("no speculative-decoding counters (spec_decode_num_drafts, ...) in these metrics")
    return out


def subtract(now: dict, base: dict) -> dict:
    """The counters of ``now`` less those of an earlier scrape ``base``."""
    pos = {j: v - base["per_pos"].get(j, 0.0) for j, v in now["per_pos"].items()}
    keys = ("drafts", "draft_tokens", "accepted")
    return {"prefix": now["prefix"], **{k: now[k] - base[k] for k in keys}, "per_pos": pos}


def compare(observed: dict, expected: dict, z: float = 4.0, tolerance: float = 0.05) -> dict:
    """Per-position rates against the expected ones, the flags, and the likely causes."""
    D = observed["drafts"]
    rows = []
    for e in expected["per_position"]:
        j = e["position"]
        obs = observed["per_pos"].get(j, 0.0) / D if D else 0.0
        var = e["rate"] * (1 - e["rate"]) / D if D else 0.0
        sd = max(math.sqrt(var + e["se"] ** 2), 1e-9)  # > 0: an expected rate of exactly 0 or 1 still gives a z
        zj = (obs - e["rate"]) / sd
        flag = "ok"
        if abs(zj) > z and abs(obs - e["rate"]) > tolerance:
            flag = "low" if obs < e["rate"] else "high"
        rows.append({"position": j, "observed": obs, "expected": e["rate"], "sd": sd, "z": zj, "flag": flag})
    mal = 1 + observed["accepted"] / D if D else 1.0
    return {
        "drafts": D,
        "mean_acceptance_length": mal,
        "expected_mean_acceptance_length": expected["mean_acceptance_length"],
        "per_position": rows,
        "flagged": any(r["flag"] != "ok" for r in rows) or D == 0,
        "causes": causes(rows, D),
    }


def causes(rows: list[dict], drafts: float) -> list[str]:
    """The likely causes the pattern of the flags points at (docs: guides/audit)."""
    if drafts == 0:
        return [
            "no drafts recorded: the engine proposed nothing (speculation off, the drafter never ran, or its counters "
            "are not wired; mlx-swift-lm#308)"
        ]
    low = [r for r in rows if r["flag"] == "low"]
    high = [r for r in rows if r["flag"] == "high"]
    out = []
    ratio = [r["observed"] / r["expected"] if r["expected"] > 0 else 1.0 for r in rows]
    decays = len(rows) > 1 and min(ratio[1:]) < 0.5 * ratio[0]
    if low and decays:
        out.append(
            "acceptance collapses after position 0 (later positions fall far below the reference, much more than the "
            "first): the draft steps read the wrong K/V - the KV sharing or block table of the draft layers (the wrong "
            "KV group's block table: vllm-ascend#16980; the wrong store layer), or the hidden state handed from one "
            "draft step to the next, or a position that is not held constant within the round"
        )
    if low and not decays:
        out.append(
            "every position is low by a similar factor: the engine's target or drafter distributions differ from the "
            "reference - precision (an FP8 or bf16 target or KV cache: vllm#41789; measure KL(p_ref || p_engine) with "
            "--engine-dtype), another checkpoint, tokenizer or chat template, or other sampling settings than the "
            "expected's"
        )
    if high:
        out.append(
            "more is accepted than an exact verifier can accept on this workload: a rule that accepts too often "
            "(greedy verification at T > 0, argmax drafts verified as if sampled) or an easier workload than the "
            "expected's prompts; test exactness with `python -m minimtp.audit sampling`"
        )
    return out or ["consistent with the reference"]


@torch.inference_mode()
def precision_gap(reference, other, prompts: list[list[int]], params: SamplingParams, n: int, seed: int) -> dict:
    """Mean KL(p_ref || p_other) of the raw softmaxes and mean TV of the processed distributions between the same
    checkpoint in two dtypes, along plain-decoded continuations of the reference. TV bounds how much any single
    position's acceptance can move: |Σ min(p, q) - Σ min(p', q)| <= TV(p, p')."""
    conts = continuations(reference, prompts, n, params, seed)
    kl, tv, rows = 0.0, 0.0, 0
    dev = other.model.embed_tokens.weight.device
    for p, e in zip(prompts, conts):
        ids = torch.tensor([p + e])
        a = reference(ids)[0, len(p) - 1 : -1].double()
        b = other(ids.to(dev))[0, len(p) - 1 : -1].double().cpu()
        la = torch.log_softmax(a, -1)
        lb = torch.log_softmax(b, -1)
        kl += float((la.exp() * (la - lb)).sum())
        pa = process_logits(a, params)
        pb = process_logits(b, params)
        tv += float(0.5 * (pa - pb).abs().sum())
        rows += a.shape[0]
    return {"kl": kl / rows, "tv": tv / rows, "positions": rows}


def format_report(res: dict, where: str) -> str:
    lines = [
        f"metrics check of {where}: {res['drafts']:.0f} drafts, mean acceptance length "
        f"{res['mean_acceptance_length']:.3f} (expected {res['expected_mean_acceptance_length']:.3f})",
        "position  observed  expected  (sd)      z        flag",
    ]
    for r in res["per_position"]:
        lines.append(
            f"{r['position']:>8}  {r['observed']:>8.4f}  {r['expected']:>8.4f}  ({r['sd']:.4f})  {r['z']:>7.2f}  "
            f"{r['flag']}"
        )
    if "precision" in res:
        pg = res["precision"]
        lines.append(
            f"precision: KL(p_ref || p_{pg['dtype']}) = {pg['kl']:.3g} nats, TV = {pg['tv']:.4f} per position "
            f"(over {pg['positions']} positions): acceptance can move by at most the TV per position"
        )
    lines += ["likely causes:" if res["flagged"] else "verdict:"] + [f"  - {c}" for c in res["causes"]]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m minimtp.audit metrics", description=__doc__.split("\n\n")[0])
    p.add_argument("--url", required=True, help="the engine's metrics: http://HOST:PORT/metrics, or a saved file")
    p.add_argument("--baseline", default=None, help="an earlier scrape (URL or file) to subtract")
    p.add_argument("--expected", default=None, help="the JSON of `audit expected --json` for the same workload")
    add_pair_flags(p)
    add_sampling_flags(p, temperature=0.0)
    p.add_argument("--prompts", help="prompts file of the workload (with no --expected)")
    p.add_argument("--k", type=int, default=None)
    p.add_argument("--draft-mode", choices=["argmax", "sample"], default="argmax")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--z", type=float, default=4.0, help="flag beyond this many standard deviations (default 4)")
    p.add_argument("--tolerance", type=float, default=0.05, help="and beyond this absolute gap (default 0.05)")
    p.add_argument("--engine-dtype", default=None, help="measure KL(p_ref || p) against the target in this dtype")
    p.add_argument("--json", action="store_true")
    return p


def run(args) -> dict:
    observed = parse(read_text(args.url))
    if args.baseline:
        observed = subtract(observed, parse(read_text(args.baseline)))
    if args.expected:
        try:
            with open(args.expected, encoding="utf-8") as f:
                expected = json.load(f)
            expected["per_position"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"{args.expected}: not the JSON of `audit expected --json` ({e})") from None
    else:
        args.cost = 0.0
        expected = run_expected(args)
    res = compare(observed, expected, args.z, args.tolerance)
    if args.engine_dtype:
        target, _, tok = load_models(args, need_assistant=False)
        other = load_target(target.name_or_path, dtype=args.engine_dtype)
        s = expected.get("settings", {})
        params = SamplingParams(s.get("temperature", 0.0), s.get("top_k"), s.get("top_p"), s.get("min_p"))
        ids = prompt_ids(read_prompts(args.prompts), tok)
        gap = precision_gap(target, other, ids, params, s.get("max_new_tokens", args.max_new_tokens), args.seed)
        res["precision"] = {"dtype": args.engine_dtype, **gap}
    return res


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        res = run(args)
    except MinimtpError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(res, indent=2) if args.json else format_report(res, args.url))
    return 1 if res["flagged"] else 0
