"""``python -m minimtp.audit expected``: the acceptance a correct engine must report, computed exactly.

What is computed (docs: guides/audit, "What expected computes"). Each prompt gets a plain-decoded continuation
e_0 .. e_{L-1} (greedy, or seeded sampling from the processed target p; EOS does not stop it, as with vLLM's
``ignore_eos``). A correct engine that emitted exactly these tokens ran rounds whose lengths are random, but their
posterior given the tokens is known in closed form. A round whose pending token is e_t drafts k_t = min(k, L - t - 2)
tokens (never past the budget); its i-th draft (i = 0-based) is verified against p_{t+i} = p(· | prompt, e_0..e_{t+i})
and the drafter's step i is fed the drafts before it, which, if they were accepted, ARE e_{t+1} .. e_{t+i}. So

    sampled drafts (x ~ q'):  P(draft i accepted and equals e) = min(p, q')(e);  P(rejection emits e) = (p - q')^+(e)
    argmax drafts (x = argmax q):  P(accepted and equals e) = p(e)·[e = x];       P(rejection emits e) = p(e)·[e != x]

and the two add up to p(e), the plain probability (Leviathan et al. 2023, Thm 1). Dividing by it,
a_{t,i} = P(draft i was accepted | e) = min(p, q')(e) / p(e), or [e = argmax q]. Given the tokens, the round at t
accepts m drafts with probability  prod_{i<m} a_{t,i} · (1 - a_{t,m})  (m < k_t; all k_t: prod a), and the next
round starts at t + m + 1: a Markov chain over round starts, whose occupancy pi_t a forward pass gives. The expected
counters given the tokens are then

    rounds = sum_t pi_t [k_t > 0],   draft tokens = sum_t pi_t k_t,
    accepted at position j = sum_t pi_t prod_{i<=j} a_{t,i}

with no sampling noise: for argmax drafts a is 0 or 1 and these are exactly the counts an exact engine that emitted
these tokens reports. Averaged over continuations drawn from p (at T > 0 each is one draw; the standard errors say
how much the choice of continuations moves the numbers), they estimate what the engine reports on that workload.

Beside them: the teacher-forced acceptance of step i (sum min(p, q') for sampled drafts, p(argmax q) for argmax
drafts, the drafter fed the continuation), KL(p‖q) of the raw softmaxes, the mean acceptance length
1 + accepted / rounds and the speedup at a drafter/target cost ratio c: (1 + accepted / rounds) / (c·k + 1), which
for a position-independent acceptance a is Leviathan's (1 - a^{k+1}) / ((1 - a)(c·k + 1)).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field

import torch

from minimtp.attention import DraftDenseContext
from minimtp.audit.inputs import (
    add_pair_flags,
    add_sampling_flags,
    load_models,
    prompt_ids,
    read_prompts,
    sampling_params,
)
from minimtp.audit.stats import ratio_se
from minimtp.engine import Engine
from minimtp.errors import MinimtpError
from minimtp.sampling import SamplingParams, process_logits


@dataclass
class SequenceCounts:
    """The expected counters of one request given its tokens, and the per-step diagnostics along it."""

    rounds: float = 0.0
    draft_tokens: float = 0.0
    accepted_pos: list[float] = field(default_factory=list)  # sum_t pi_t P(accepted > j)
    drafted_pos: list[float] = field(default_factory=list)  # sum_t pi_t [k_t > j]
    teacher: list[float] = field(default_factory=list)  # sums over the starts t of the teacher-forced acceptance
    kl: list[float] = field(default_factory=list)  # sums of KL(p || q) of the raw softmaxes
    steps: list[int] = field(default_factory=list)  # how many starts each of those sums has
    min_margin: float = math.inf  # the smallest top-1 minus top-2 drafter logit (argmax drafts: a tie could flip)


def continuations(target, prompts: list[list[int]], n: int, params: SamplingParams, seed: int) -> list[list[int]]:
    """Plain decoding (the reference Engine, no assistant) of n tokens per prompt, EOS ignored, seeded."""
    engine = Engine(target)
    res = engine.generate(
        prompts,
        max_new_tokens=n,
        temperature=params.temperature,
        top_k=params.top_k,
        top_p=params.top_p,
        min_p=params.min_p,
        seed=seed,
        stop_token_ids=[],
        use_assistant=False,
    )
    return res.tokens


def acceptance_given_tokens(target, assistant, prompt, tokens, k: int, params: SamplingParams, draft_mode: str):
    """a [T, k] (P(draft i of the round at t was accepted | the tokens); NaN where the round cannot have a draft i),
    the teacher-forced acceptance [T, k], KL(p || q) [T, k] and the drafter's top-1 minus top-2 logit [T, k], for
    the T = L - 1 round starts t = 0 .. L - 2 of ``tokens`` after ``prompt`` (module docstring). One dense target
    forward over prompt + tokens, then k drafter steps for every start at once (its K/V: the target's)."""
    P0 = len(prompt)
    L = len(tokens)
    T = L - 1
    ids = torch.tensor(prompt + tokens)
    dev = target.model.embed_tokens.weight.device
    logits, hidden, kv = target.forward_with_kv(ids[None].to(dev))
    logits = logits[0].float()
    hidden = hidden[0]
    starts = torch.arange(T)
    qpos = (P0 + starts).to(dev)
    ctx = DraftDenseContext(assistant.config.text, kv, qpos[None])
    rope = assistant.rope(qpos)
    h = hidden[qpos - 1]
    sampled = draft_mode == "sample" and not params.is_greedy
    shape = (T, k)
    a = torch.full(shape, math.nan, dtype=torch.float64)
    teacher = torch.full(shape, math.nan, dtype=torch.float64)
    kl = torch.full(shape, math.nan, dtype=torch.float64)
    margin = torch.full(shape, math.inf, dtype=torch.float64)
    e = torch.tensor(tokens)
    for i in range(k):
        tok = e[(starts + i).clamp(max=L - 1)]  # step i is fed e_{t+i}: the pending token, then the drafts
        q_logits, h = assistant.step(target.embed(tok.to(dev)), h, qpos, ctx, rope)
        valid = starts + i + 1 <= L - 1  # the token this draft is verified on, e_{t+i+1}, exists
        if not bool(valid.any()):
            break
        rows = (P0 + starts + i).clamp(max=P0 + L - 1)
        p = process_logits(logits[rows], params).double()
        nxt = e[(starts + i + 1).clamp(max=L - 1)]
        ql = q_logits.float()
        x = ql.argmax(-1).cpu()
        if sampled:
            q = process_logits(ql, params).double().cpu()
            both = torch.minimum(p, q)
            hit = both.gather(1, nxt[:, None])[:, 0]
            plain = p.gather(1, nxt[:, None])[:, 0]
            a_i = torch.where(plain > 0, hit / plain.clamp_min(1e-300), torch.zeros_like(plain))
            tf = both.sum(-1)
        else:
            a_i = (x == nxt).double()
            tf = p.gather(1, x[:, None])[:, 0]
        top2 = ql.topk(2, -1).values.double().cpu()
        lp = torch.log_softmax(logits[rows].double(), -1)
        lq = torch.log_softmax(ql.double(), -1).cpu()
        kl_i = (lp.exp() * (lp - lq)).sum(-1)
        a[valid, i] = a_i[valid].clamp(0.0, 1.0)
        teacher[valid, i] = tf[valid]
        kl[valid, i] = kl_i[valid]
        margin[valid, i] = (top2[:, 0] - top2[:, 1])[valid]
    return a, teacher, kl, margin


def expected_counts(a: torch.Tensor, L: int, k: int) -> tuple[list[float], SequenceCounts]:
    """The forward pass over round starts (module docstring): occupancy pi [L - 1] and the expected counters of a
    request of L new tokens whose acceptance given the tokens is ``a`` [L - 1, k]."""
    T = L - 1
    pi = [0.0] * (T + 1)
    if T > 0:
        pi[0] = 1.0
    c = SequenceCounts(accepted_pos=[0.0] * k, drafted_pos=[0.0] * k)
    for t in range(T):
        if pi[t] == 0.0:
            continue
        kt = max(0, min(k, L - t - 2))
        c.rounds += pi[t] * (kt > 0)
        c.draft_tokens += pi[t] * kt
        reach = 1.0
        for m in range(kt + 1):
            stop = 1.0 if m == kt else 1.0 - float(a[t, m])
            nxt = t + m + 1
            if nxt < T:
                pi[nxt] += pi[t] * reach * stop
            if m == kt:
                break
            c.drafted_pos[m] += pi[t]
            reach *= float(a[t, m])
            c.accepted_pos[m] += pi[t] * reach
    return pi[:T], c


def sequence_counts(target, assistant, prompt, tokens, k, params, draft_mode) -> SequenceCounts:
    """The expected counters of one request given its prompt and tokens, with the per-step diagnostics."""
    a, teacher, kl, margin = acceptance_given_tokens(target, assistant, prompt, tokens, k, params, draft_mode)
    _, c = expected_counts(a, len(tokens), k)
    ok = ~torch.isnan(teacher)
    c.teacher = torch.where(ok, teacher, 0.0).sum(0).tolist()
    c.kl = torch.where(ok, kl, 0.0).sum(0).tolist()
    c.steps = ok.sum(0).tolist()
    c.min_margin = float(margin.min()) if margin.numel() else math.inf
    return c


def summarize(counts: list[SequenceCounts], k: int, cost: float) -> dict:
    """Totals, rates (the engines' conventions), their standard errors over sequences, and the speedup."""
    rounds = [c.rounds for c in counts]
    R = sum(rounds)
    accepted = [sum(c.accepted_pos) for c in counts]
    drafted = [c.draft_tokens for c in counts]
    per_pos = []
    prev = 1.0
    for j in range(k):
        acc_j = [c.accepted_pos[j] for c in counts]
        rate = sum(acc_j) / R if R else 0.0
        n = sum(c.steps[j] for c in counts)
        per_pos.append(
            {
                "position": j,
                "accepted": sum(acc_j),
                "drafted": sum(c.drafted_pos[j] for c in counts),
                "rate": rate,  # accepted at j / rounds: vLLM's per-position rate
                "se": ratio_se(acc_j, rounds),
                "conditional": rate / prev if prev > 0 else 0.0,
                "teacher_forced": sum(c.teacher[j] for c in counts) / n if n else None,
                "kl_target_drafter": sum(c.kl[j] for c in counts) / n if n else None,
            }
        )
        prev = rate
    mal = 1.0 + sum(accepted) / R if R else 1.0
    a0 = per_pos[0]["rate"] if per_pos else 0.0
    leviathan = _leviathan(a0, k, cost)
    return {
        "rounds": R,
        "draft_tokens": sum(drafted),
        "accepted_tokens": sum(accepted),
        "acceptance_rate": sum(accepted) / sum(drafted) if sum(drafted) else 0.0,
        "acceptance_rate_se": ratio_se(accepted, drafted),
        "mean_acceptance_length": mal,
        "mean_acceptance_length_se": ratio_se(accepted, rounds),
        "per_position": per_pos,
        "speedup": {"cost": cost, "from_profile": mal / (cost * k + 1), "leviathan_a": a0, "leviathan": leviathan},
        "min_drafter_margin": _finite(min((c.min_margin for c in counts), default=math.inf)),
    }


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _leviathan(a: float, k: int, c: float) -> float:
    """(1 - a^{k+1}) / ((1 - a)(c·k + 1)) (Leviathan et al. 2023, eq. 1 and Thm 3.8); a = 1 gives (k + 1)/(ck + 1)."""
    tokens = k + 1 if a >= 1 else (1 - a ** (k + 1)) / (1 - a)
    return tokens / (c * k + 1)


def expected(target, assistant, prompts, *, k, params, draft_mode, max_new_tokens, seed=0, cost=0.0) -> dict:
    """The whole computation for token-id ``prompts``: continuations, expected counters, summary (a dict)."""
    conts = continuations(target, prompts, max_new_tokens, params, seed)
    with torch.inference_mode():
        counts = [sequence_counts(target, assistant, p, e, k, params, draft_mode) for p, e in zip(prompts, conts)]
    out = summarize(counts, k, cost)
    out["settings"] = {
        "k": k,
        "draft_mode": draft_mode if not params.is_greedy else "argmax",
        "temperature": params.temperature,
        "top_k": params.top_k,
        "top_p": params.top_p,
        "min_p": params.min_p,
        "max_new_tokens": max_new_tokens,
        "seed": seed,
        "prompts": len(prompts),
    }
    out["per_sequence"] = [
        {"rounds": c.rounds, "accepted_pos": c.accepted_pos, "draft_tokens": c.draft_tokens} for c in counts
    ]
    return out


def format_table(res: dict) -> str:
    s = res["settings"]
    lines = [
        f"expected acceptance: k={s['k']}, {s['draft_mode']} drafts, T={s['temperature']}, top_k={s['top_k']}, "
        f"top_p={s['top_p']}, {s['prompts']} prompts x {s['max_new_tokens']} tokens (EOS ignored), seed {s['seed']}",
        "",
        "position  accepted/round  (se)     conditional  teacher-forced  KL(p||q)",
    ]
    for r in res["per_position"]:
        tf = "-" if r["teacher_forced"] is None else f"{r['teacher_forced']:.4f}"
        kl = "-" if r["kl_target_drafter"] is None else f"{r['kl_target_drafter']:.3f}"
        lines.append(
            f"{r['position']:>8}  {r['rate']:>14.4f}  ({r['se']:.4f})  {r['conditional']:>11.4f}  {tf:>14}  {kl:>8}"
        )
    sp = res["speedup"]
    lines += [
        "",
        f"acceptance rate {res['acceptance_rate']:.4f} (se {res['acceptance_rate_se']:.4f}), mean acceptance length "
        f"{res['mean_acceptance_length']:.3f} (se {res['mean_acceptance_length_se']:.3f}) over "
        f"{res['rounds']:.1f} expected rounds",
        f"speedup at cost ratio c={sp['cost']}: {sp['from_profile']:.3f} from the profile; Leviathan's formula with "
        f"a={sp['leviathan_a']:.4f}: {sp['leviathan']:.3f}",
    ]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m minimtp.audit expected", description=__doc__.split("\n\n")[0])
    add_pair_flags(p)
    add_sampling_flags(p)
    p.add_argument("--prompts", help="prompts file (.json, .jsonl, or one prompt per line; default: built-in)")
    p.add_argument("--k", type=int, default=None, help="drafts per round (default: the assistant's, else 6)")
    p.add_argument("--draft-mode", choices=["argmax", "sample"], default="argmax")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens per continuation (default 64)")
    p.add_argument("--seed", type=int, default=0, help="seed of the plain-decoded continuations")
    p.add_argument("--cost", type=float, default=0.0, help="drafter step / target forward cost ratio c")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    return p


def run(args) -> dict:
    target, assistant, tok = load_models(args)
    params = sampling_params(args)
    k = args.k if args.k is not None else (assistant.config.num_assistant_tokens or 6)
    if k < 1:
        raise MinimtpError(f"--k {k}: expected an integer >= 1")
    if args.max_new_tokens < 2:
        raise MinimtpError(f"--max-new-tokens {args.max_new_tokens}: expected >= 2 (one round needs two tokens)")
    if args.cost < 0:
        raise MinimtpError(f"--cost {args.cost}: expected a number >= 0")
    ids = prompt_ids(read_prompts(args.prompts), tok)
    return expected(
        target,
        assistant,
        ids,
        k=k,
        params=params,
        draft_mode=args.draft_mode,
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
        cost=args.cost,
    )


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        res = run(args)
    except MinimtpError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(res, indent=2) if args.json else format_table(res))
    return 0
