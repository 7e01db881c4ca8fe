"""spec_sampling: the speculative sampling rule, propose() and verify_one() (bug classes, the first tests)."""

from __future__ import annotations

import dataclasses

import torch

from minimtp.sampling import (
    SamplingParams,
    draw_exponentials,
    draw_uniforms,
    make_generators,
    process_logits,
)

from .core import BUG_HINTS, DESCRIPTIONS, Failure, check, test
from .integrity import _check_imports
from .stats import chi2_test

# =========================================================================================== spec_sampling

DESCRIPTIONS["spec_sampling"] = "the speculative sampling rule: propose() and verify_one()"
SP = "spec_sampling"
T1 = SamplingParams(temperature=1.0)


def _case(V, K, seed, params, agree=1.0):
    """Target rows P [K+1, V] (processed) and raw draft logits Zq [K, V] that roughly agree with them."""
    g = torch.Generator().manual_seed(seed)
    zp = 1.5 * torch.randn(K + 1, V, generator=g)
    zq = agree * zp[:K] + torch.randn(K, V, generator=g)
    return process_logits(zp, params), zq


def _round(mod, P, Zq, params, mode, N, seed):
    """N independent rounds of propose (K positions) + verify, with context-free rows: [N, K+1] ids, [N] emitted."""
    K1, V = P.shape
    K = K1 - 1
    gens = make_generators(seed, N)
    ids, qs = [], []
    for j in range(K):
        x, q = mod.propose(Zq[j].expand(N, V).clone(), params, mode, draw_exponentials(gens, V))
        ids.append(torch.as_tensor(x).long().view(N))
        qs.append(q)
    draft_ids = torch.stack(ids, 1) if K else torch.zeros(N, 0, dtype=torch.long)
    q = None if (K == 0 or qs[0] is None) else torch.stack([torch.as_tensor(t).float() for t in qs], 1)
    out, n = mod.verify(
        P.expand(N, K1, V).contiguous(),
        draft_ids,
        q,
        torch.full((N,), K, dtype=torch.long),
        draw_uniforms(gens, K),
        draw_exponentials(gens, V),
    )
    return torch.as_tensor(out), torch.as_tensor(n), draft_ids, q, gens


def _norm(p: torch.Tensor) -> torch.Tensor:
    p = p.double().clamp_min(0)
    return p / p.sum()


def _residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    r = (p.double() - q.double()).clamp_min(0)
    return _norm(r) if float(r.sum()) > 0 else _norm(p)


GEMMA_P = torch.tensor([[0.4, 0.3, 0.2, 0.1], [0.25, 0.25, 0.25, 0.25]])
GEMMA_ZQ = torch.tensor([[0.5, 0.3, 0.1, 0.1]]).log()
_P1, _P2, _P3 = SamplingParams(0.7, top_k=4), SamplingParams(1.3, top_p=0.9), SamplingParams(0.5)
CASES = {  # name: (P, Zq, params, mode, N)
    # the example of docs: concepts/speculative-decoding, "Three rules that look right and are not"
    "p=[.4,.3,.2,.1] q=[.5,.3,.1,.1], argmax draft": (GEMMA_P, GEMMA_ZQ, T1, "argmax", 4000),
    "p=[.4,.3,.2,.1] q=[.5,.3,.1,.1], sampled draft": (GEMMA_P, GEMMA_ZQ, T1, "sample", 4000),
    "V=6 k=2 T=0.7 top-k 4, sampled": (*_case(6, 2, 1, _P1), _P1, "sample", 4000),
    "V=6 k=2 T=1.3 top-p 0.9, argmax": (*_case(6, 2, 2, _P2), _P2, "argmax", 4000),
    "V=5 k=3 T=0.5, sampled": (*_case(5, 3, 3, _P3), _P3, "sample", 4000),
}

# the bug classes of this assignment (named in the failure messages, and in the fixtures' "Bug class:" lines)
SP_SHORTCUT = "library shortcut"
SP_ARGMAX_Q = "argmax draft verified as sampled"
SP_WRONG_Q = "q' is not process_logits"
SP_PROPOSE = "propose API"
SP_DRAFTS = "drafts not drawn from q'"
SP_NOT_THRESHOLD = "acceptance not a threshold on u"
SP_IGNORES_Q = "acceptance ignores q"
SP_INVERTED = "inverted ratio q/p"
SP_ZERO = "p(x) = 0 accepted"
SP_ACCEPT = "acceptance probability is not min(1, p/q)"
SP_CONTINUE = "verification continues after a rejection"
SP_WRONG_ROW = "accept test on the wrong target row"
SP_TEMP_TWICE = "temperature applied twice"
SP_TEMP_P_ONLY = "temperature on p only"
SP_GREEDY = "greedy match rule for argmax drafts"
SP_ONE_U = "one uniform reused for every draft"
SP_Q_STEP = "q from the wrong step"
SP_RESIDUAL = "residual distribution"
SP_RESIDUAL_P = "residual sampled from p (q not subtracted)"
SP_RESIDUAL_Q = "residual sampled from q"
SP_RESIDUAL_SIGN = "residual (q - p)+ (sign flipped)"
SP_RESIDUAL_ROW = "residual from the wrong row"
SP_ARGMAX_KEEPS_X = "argmax rejection keeps x"
SP_BONUS = "bonus token distribution"
SP_BONUS_ROW = "bonus from the wrong row"
SP_NUM_DRAFTS = "num_drafts ignored"
SP_LAYOUT = "output layout"
SP_INVALID = "invalid draft id accepted"
SP_INVALID_INDEX = "invalid draft id used as an index"
SP_P_ZERO_OUT = "emitted token with p = 0"
SP_EMPTY_RESIDUAL = "empty residual not replaced by p"
SP_OUTPUT = "output distribution is not p"


# fmt: off
BUG_HINTS.update({
    SP_ARGMAX_Q: "an argmax draft is a point mass at x: return (x, None) from propose, accept with probability p(x) "
    "and on rejection sample p with x removed (docs: concepts/speculative-decoding, 'Three rules that look right "
    "and are not', rule 1).",
    SP_WRONG_Q: "q' = process_logits(draft_logits, params): the SAME processing as the target's p (temperature, "
    "top-k, top-p, min-p), and that q' is both sampled from and returned.",
    SP_TEMP_TWICE: "apply the temperature once: process_logits(draft_logits, params) already divides by it.",
    SP_TEMP_P_ONLY: "the drafter's distribution needs the same temperature and filters as the target's: "
    "q' = process_logits(draft_logits, params), not softmax(draft_logits).",
    SP_DRAFTS: "sample x with sample(q', noise) from the very q' you return; drafting from another distribution than "
    "the one in the ratio biases the output (z-lab/dflash issue #74, deepseek-ai/DeepSpec issue #31).",
    SP_NOT_THRESHOLD: "acceptance must be the threshold test u < min(1, p(x)/q(x)) on the given uniform: 'accept iff "
    "x equals a token sampled from p' accepts with probability sum p*q (mlx-swift-lm PR #459).",
    SP_IGNORES_Q: "for a sampled draft the ratio is p(x)/q(x): dividing by q is what makes the output exactly p.",
    SP_INVERTED: "the ratio is p(x)/q(x) (target over draft), not q(x)/p(x).",
    SP_ZERO: "accept iff u < ratio, strictly: with u = 0 a draft of probability p(x) = 0 must still be rejected.",
    SP_WRONG_ROW: "draft j is tested against target row j (the row conditioned on the drafts before it); row j+1 is "
    "the next draft's (or the bonus').",
    SP_CONTINUE: "stop at the first rejection: emit the one residual token and return; later drafts are never used.",
    SP_GREEDY: "'accept iff x is the argmax of p' is the greedy rule (T = 0); at T > 0 accept an argmax draft with "
    "probability p(x), via u < p(x).",
    SP_ONE_U: "draft j uses its own uniform u[j]; reusing u[0] correlates the accept tests.",
    SP_Q_STEP: "draft j's ratio and residual use q_j, the distribution draft j was sampled from, not q_0.",
    SP_RESIDUAL: "on a rejection sample norm((p_j - q_j)^+) (argmax drafts: p_j with x removed; all zeros: p_j).",
    SP_RESIDUAL_P: "the residual is max(p - q, 0), not p: sampling p again double-counts the mass already accepted.",
    SP_RESIDUAL_Q: "the residual is max(p - q, 0), built from the target's p minus the draft's q.",
    SP_RESIDUAL_SIGN: "the residual is max(p - q, 0): the tokens the draft under-proposes, not max(q - p, 0).",
    SP_RESIDUAL_ROW: "the residual of draft j uses p_j and q_j, the rows of the rejected draft.",
    SP_ARGMAX_KEEPS_X: "for an argmax draft the residual is p with x set to 0: x was already offered with p(x).",
    SP_BONUS: "if all n drafts are accepted sample the bonus from p_n, the row after the last draft.",
    SP_BONUS_ROW: "the bonus comes from row n = num_drafts (the row after the last accepted draft), not row n-1.",
    SP_NUM_DRAFTS: "sequence b uses only its first num_drafts[b] drafts: at most num_drafts + 1 tokens, bonus from "
    "row num_drafts.",
    SP_LAYOUT: "out_ids [B, K+1]: accepted drafts, one more token, then -1; num_emitted = accepted + 1.",
    SP_INVALID: "a draft id outside [0, V) is rejected whatever u is: check 0 <= x < V before reading p[x] "
    "(p[-1] is a valid index in Python).",
    SP_INVALID_INDEX: "check 0 <= x < V BEFORE reading p[j, x] or q[j, x]: an id outside [0, V) (a pad, an id from a "
    "drafter with a larger vocabulary) must be rejected, not raise IndexError (and p[j, -1] silently reads the last "
    "token).",
    SP_EMPTY_RESIDUAL: "after a rejection where p <= q everywhere (p and q equal up to rounding) the residual "
    "max(p - q, 0) is all zeros: sample p_j instead (minimtp.speculative.residual_or_target); sampling the zeros emits "
    "token 0 whatever p says.",
    SP_P_ZERO_OUT: "the emitted token must have p > 0 in its row: sample the residual / bonus with "
    "sample(dist, noise).",
})
# fmt: on


@test(SP, "write the rule yourself: import nothing from minimtp but minimtp.sampling (process_logits, sample) and "
      "minimtp.errors; no dynamic imports (importlib, __import__, exec).", bug=SP_SHORTCUT, gate=True)  # fmt: skip
def no_library_shortcut(mod):
    _check_imports(mod, ("minimtp.sampling", "minimtp.errors"), SP_SHORTCUT)


def check_propose(mod, seed: int, V: int, params: SamplingParams) -> None:
    z = torch.randn(5, V, generator=torch.Generator().manual_seed(seed)) * 1.5
    noise = draw_exponentials(make_generators(seed, 5), V)
    x, q = mod.propose(z.clone(), params, "argmax", noise)
    check(q is None, SP_ARGMAX_Q, "'argmax' mode returned a q: an argmax draft is a point mass, it has no q (return "
          "None); verifying it with min(1, p/q) as if x ~ q emits [.8, 0, .2, 0] for p = [.4, .3, .2, .1]")  # fmt: skip
    check(torch.equal(torch.as_tensor(x).long().view(5), z.argmax(-1)), SP_PROPOSE,
          "'argmax' mode must return the argmax of the raw logits")  # fmt: skip
    x, q = mod.propose(z.clone(), params, "sample", noise)
    want = process_logits(z, params)
    check(q is not None and tuple(torch.as_tensor(q).shape) == (5, V), SP_PROPOSE,
          f"'sample' mode returned q of shape {getattr(q, 'shape', q)}, expected (5, {V})")  # fmt: skip
    err = (torch.as_tensor(q).float() - want).abs().amax(-1)
    T = params.temperature
    alts = [
        (SP_TEMP_TWICE, process_logits(z / T, params), f"process_logits with temperature {T * T:g}"),
        (SP_TEMP_P_ONLY, process_logits(z, dataclasses.replace(params, temperature=1.0)), "temperature 1"),
        (SP_TEMP_P_ONLY, torch.softmax(z, -1), "the raw softmax (no temperature, no top-k / top-p)"),
    ]
    for bug, alt, what in alts:
        if bool((err > 1e-6).any()) and bool(((torch.as_tensor(q).float() - alt).abs() <= 1e-6).all()):
            raise Failure(bug, f"V={V}, {params}: q' equals {what}: the drafter's q' must be processed exactly like "
                          "the target's p (one temperature, then top-k / top-p)")  # fmt: skip
    check(bool((err <= 1e-6).all()), SP_WRONG_Q, lambda: f"V={V}, {params}: row {int(err.argmax())} of q' differs "
          f"from process_logits(draft_logits, params) by {float(err.max()):.2e}")  # fmt: skip
    x = torch.as_tensor(x).long().view(5)
    check(bool((want.gather(-1, x.view(5, 1)) > 0).all()), SP_DRAFTS, "a draft outside the support of q'")


@test(SP, "propose(): 'sample' must return (x, q') with q' = process_logits(draft_logits, params) and x drawn with "
      "sample(q', noise); 'argmax' returns (argmax of the raw logits, None): a one-hot proposal has no q.",
      points=8, bug=SP_PROPOSE, library=False)  # fmt: skip
def propose_api(mod):
    check_propose(mod, 0, 8, SamplingParams(0.7, top_k=3))


def check_drafts_follow_q(mod, name: str, Zq: torch.Tensor, params: SamplingParams, N: int, seed: int) -> None:
    V = Zq.shape[-1]
    gens = make_generators(seed, N)
    x, q = mod.propose(Zq[0].expand(N, -1).clone(), params, "sample", draw_exponentials(gens, V))
    counts = torch.bincount(torch.as_tensor(x).long().view(-1), minlength=V)
    raw = torch.softmax(Zq[0].double(), -1)
    chi2_test(counts, torch.as_tensor(q)[0].double(), f"{name}: draft frequencies vs the returned q'", SP_DRAFTS,
              alternatives={f"{SP_DRAFTS} (drawn from the raw softmax: temperature / top-k ignored)": raw})  # fmt: skip


@test(SP, "the drafts must be SAMPLED FROM THE q' YOU RETURN: drafting from the raw softmax (ignoring temperature / "
      "top-k) while the ratio uses the processed q' biases the output (z-lab/dflash issue #74: temperature never "
      "reached the drafter's sampler; deepseek-ai/DeepSpec issue #31: bf16 draft, float32 ratio).",
      points=8, bug=SP_DRAFTS, chi2=2, library=False)  # fmt: skip
def drafts_follow_q(mod):
    for name in ("V=6 k=2 T=0.7 top-k 4, sampled", "V=5 k=3 T=0.5, sampled"):
        P, Zq, params, mode, N = CASES[name]
        check_drafts_follow_q(mod, name, Zq, params, N, 11)


def check_acceptance(mod, g: torch.Generator, V: int, trials: int = 6) -> None:
    """Integrate over u analytically: for every noise row the accepted set must be [0, r), r = min(1, ratio).
    Probes just below / above r, p(x) and q(x)/p(x) tell the classic wrong rules apart."""
    found = []  # (priority, bug, evidence)
    for mode in ("sample", "argmax"):
        for trial in range(trials):
            p = process_logits(1.5 * torch.randn(2, V, generator=g), T1)
            q = process_logits(1.5 * torch.randn(1, V, generator=g), T1)
            x = int(torch.randint(0, V, (1,), generator=g))
            if trial == 0:
                p[0, x] = 0.0  # p(x) = 0: never accepted
                p[0] /= p[0].sum()
            px, qx = float(p[0, x]), float(q[0, x])
            r = float(p[0, x] if mode == "argmax" else p[0, x] / q[0, x])
            r1 = float(p[1, x] if mode == "argmax" else p[1, x] / q[0, x])  # the ratio with the next target row
            marks = [r, px, r1] + ([qx / px] if px > 0 else [])
            probes = {0.0, 0.5, 1 - 1e-12}
            for m in marks:
                probes |= {0.999999 * m, 1.0000001 * m}
            probes = sorted(u for u in probes if 0 <= u < 1)
            R = 5  # noise rows per probe
            noise = draw_exponentials(make_generators(trial, R), V)
            u = torch.tensor([[pr] for pr in probes for _ in range(R)], dtype=torch.float64)
            B = len(u)
            out, n = mod.verify(
                p.expand(B, 2, V).contiguous(),
                torch.full((B, 1), x, dtype=torch.long),
                None if mode == "argmax" else q.expand(B, 1, V).contiguous(),
                torch.ones(B, dtype=torch.long),
                u,
                noise.repeat(len(probes), 1),
            )
            out, n = torch.as_tensor(out), torch.as_tensor(n).view(-1)
            wrong_first = (n == 2) & (out[:, 0] != x)
            if bool(wrong_first.any()):
                i = int(wrong_first.nonzero()[0, 0])
                found.append((0, SP_CONTINUE, f"{mode} draft x={x}, u={float(u[i, 0]):.6f}: emitted "
                              f"{out[i].tolist()} (num_emitted 2): the first token is not the draft, so it was "
                              "rejected, yet the round went on; stop at the first rejection"))  # fmt: skip
                continue
            acc = (n.view(len(probes), R) == 2).tolist()
            want = [pr < r for pr in probes]
            if all(all(a == w for a in row) for row, w in zip(acc, want)):
                continue
            what = f"{mode} draft x={x} with p(x)={px:.4f}" + ("" if mode == "argmax" else f", q(x)={qx:.4f}")
            i = next(i for i, (row, w) in enumerate(zip(acc, want)) if any(a != w for a in row))
            ev = (f"{what}: at u={probes[i]:.6f} the draft was {'accepted' if acc[i][0] else 'rejected'}"
                  f"{' for some noise rows and not others' if len(set(acc[i])) > 1 else ''}; the accepted set must "
                  f"be [0, {min(r, 1):.6f})")  # fmt: skip
            rows = [row[0] for row in acc]
            if any(len(set(row)) > 1 for row in acc):
                found.append((0, SP_NOT_THRESHOLD, ev + " (it depends on the noise, not only on u)"))
            elif px > 0 and rows == [pr < r1 for pr in probes] and abs(r1 - r) > 1e-6:
                found.append(
                    (
                        2,
                        SP_WRONG_ROW,
                        ev + f": the accepted set is [0, {min(r1, 1):.6f}), the ratio with "
                        "target row j + 1; draft j is tested against row j (the row conditioned on drafts < j)",
                    )
                )
            elif mode == "argmax" and len(set(rows)) == 1 and rows[0] == (x == int(p[0].argmax())):
                found.append((1, SP_GREEDY, ev + ": accepted iff x is the argmax of p, whatever u; an argmax draft "
                              "is accepted with probability p(x)"))  # fmt: skip
            elif px == 0 and rows[0]:
                found.append((3, SP_ZERO, ev + ": accept iff u < ratio, strictly"))
            elif mode == "sample" and rows == [pr < px for pr in probes]:
                found.append((2, SP_IGNORES_Q, ev + ": the accepted set is [0, p(x)), q was not divided out"))
            elif mode == "sample" and px > 0 and rows == [pr < min(1.0, qx / px) for pr in probes]:
                found.append((2, SP_INVERTED, ev + ": the accepted set is [0, q(x)/p(x))"))
            elif not all(rows[i] >= rows[i + 1] for i in range(len(rows) - 1)):  # not a prefix [0, c)
                found.append((0, SP_NOT_THRESHOLD, ev))
            else:
                found.append((4, SP_ACCEPT, ev))
    if found:
        _, bug, ev = min(found, key=lambda f: f[0])
        raise Failure(bug, ev)


@test(SP, "accept x iff u < p(x)/q(x) (sampled drafts) or u < p(x) (argmax drafts, q None): P_u(accept) must be "
      "min(1, ratio) for every noise row. 'Accept iff x equals a token sampled from p' accepts with the wrong "
      "probability, sum p*q (the bug of mlx-swift-lm PR #459).", points=14, bug=SP_ACCEPT)  # fmt: skip
def acceptance_exact_in_u(mod):
    check_acceptance(mod, torch.Generator().manual_seed(5), 6)
