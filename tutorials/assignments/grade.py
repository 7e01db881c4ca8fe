#!/usr/bin/env python
"""Grade an assignment with the project's property tests.

    python tutorials/assignments/grade.py <assignment> path/to/student.py
    python tutorials/assignments/grade.py --list

Prints one line per test (PASS / FAIL / WARN), with a hint for every failure, and exits 0 iff every required test
passed. WARN marks an advisory check (it does not fail the grade).

Distribution checks are exact where the randomness can be integrated analytically (acceptance as a function of
u ~ U[0,1): the accepted set must be exactly [0, min(1, p(x)/q(x))) whatever the other random inputs are), and
otherwise seeded Pearson χ² goodness-of-fit tests at significance α = 1e-4 each (cells with expected count < 5
pooled): a correct solution fails one with probability 1e-4, and since the seeds are fixed, the grade of a given
file is deterministic.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import os
import re
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # tutorials/, for _tiny

# Without a GPU the kernel assignment runs under Triton's interpreter, which must be chosen before triton is imported
# (docs: concepts/kernels, "Running the kernels on CPU"): the grader opts in here unless the caller decided.
if not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

from minimtp.sampling import (  # noqa: E402
    SamplingParams,
    draw_exponentials,
    draw_uniforms,
    make_generators,
    process_logits,
    sample,
)

ALPHA = 1e-4  # significance of every χ² test
warnings.filterwarnings("ignore", category=RuntimeWarning)  # the Triton interpreter evaluates masked-off lanes


# ------------------------------------------------------------------------------------------------ registry


@dataclass
class Test:
    name: str
    fn: Callable
    hint: str
    required: bool = True


TESTS: dict[str, list[Test]] = {}
DESCRIPTIONS: dict[str, str] = {}


def test(assignment: str, hint: str, required: bool = True):
    def deco(fn):
        TESTS.setdefault(assignment, []).append(Test(fn.__name__, fn, hint, required))
        return fn

    return deco


def load(path: str):
    """Import a student file as a fresh module (its own name, so several files can be graded in one process)."""
    name = "graded_" + hashlib.sha1(os.path.abspath(path).encode()).hexdigest()[:12]
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    mod.__source__ = open(path, encoding="utf-8").read()
    return mod


def grade(assignment: str, path: str, out=None, fail_fast: bool = False) -> bool:
    """Run every test of ``assignment`` on the file ``path``; print the report to ``out``; True iff all pass."""
    out = out or sys.stdout
    torch.set_num_threads(1)
    print(f"Grading {path} as assignment '{assignment}'", file=out)
    try:
        mod = load(path)
    except Exception as e:  # a syntax error etc.: report, do not crash
        print(f"  [FAIL] import: {type(e).__name__}: {e}", file=out)
        return False
    passed = failed = warned = 0
    for t in TESTS[assignment]:
        t0 = time.perf_counter()
        try:
            t.fn(mod)
            status, msg = "PASS", ""
        except NotImplementedError as e:
            status, msg = "FAIL", f"not implemented yet ({e or 'a TODO is left'})"
        except AssertionError as e:
            status, msg = "FAIL", str(e) or "assertion failed"
        except Exception as e:
            tb = traceback.extract_tb(e.__traceback__)
            where = next((f"{os.path.basename(f.filename)}:{f.lineno}" for f in reversed(tb) if f.filename == path), "")
            status, msg = "FAIL", f"{type(e).__name__}: {e}" + (f" (at {where})" if where else "")
        if status == "FAIL" and not t.required:
            status = "WARN"
        dt = time.perf_counter() - t0
        print(f"  [{status}] {t.name} ({dt:.1f}s)" + (f": {msg}" if msg else ""), file=out)
        if status != "PASS":
            print(f"         hint: {t.hint}", file=out)
        passed += status == "PASS"
        failed += status == "FAIL"
        warned += status == "WARN"
        if failed and fail_fast:
            print("  (stopped at the first failure: --fail-fast)", file=out)
            break
    ok = failed == 0
    print(f"{'PASSED' if ok else 'FAILED'}: {passed} passed, {failed} failed, {warned} advisory warnings", file=out)
    return ok


# ------------------------------------------------------------------------------------------------ statistics


def chi2_sf(x: float, df: int) -> float:
    """P(χ²_df > x) = Q(df/2, x/2) (regularised upper incomplete gamma)."""
    if df <= 0:
        return 1.0
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), torch.tensor(x / 2.0)))


def chi2_test(counts: torch.Tensor, probs: torch.Tensor, what: str) -> None:
    """Pearson χ² goodness of fit at level ALPHA; any count in a zero-probability cell fails outright."""
    counts, probs = counts.flatten().double(), probs.flatten().double()
    n = float(counts.sum())
    support = probs > 0
    outside = int(counts[~support].sum())
    assert outside == 0, f"{what}: {outside} samples are tokens of probability 0"
    c, e = counts[support], probs[support] / probs[support].sum() * n
    order = torch.argsort(e)
    c, e = c[order], e[order]
    small = int((e < 5).sum())
    if small:
        c = torch.cat([c[:small].sum()[None], c[small:]])
        e = torch.cat([e[:small].sum()[None], e[small:]])
        if e[0] < 5 and len(e) > 1:
            c = torch.cat([c[:2].sum()[None], c[2:]])
            e = torch.cat([e[:2].sum()[None], e[2:]])
    stat = float(((c - e) ** 2 / e).sum())
    pv = chi2_sf(stat, len(e) - 1)
    if pv < ALPHA:
        freq = (counts / n).view(-1)[:8].tolist()
        want = (probs / probs.sum()).view(-1)[:8].tolist()
        raise AssertionError(
            f"{what}: χ² = {stat:.1f}, df {len(e) - 1}, p-value {pv:.1e} < α = {ALPHA:g}; "
            f"observed {[round(v, 3) for v in freq]} expected {[round(v, 3) for v in want]}"
        )


# =========================================================================================== spec_sampling

DESCRIPTIONS["spec_sampling"] = "the speculative sampling rule: propose() and verify()"
SP = "spec_sampling"


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


GEMMA_P = torch.tensor([[0.4, 0.3, 0.2, 0.1], [0.25, 0.25, 0.25, 0.25]])
GEMMA_ZQ = torch.tensor([[0.5, 0.3, 0.1, 0.1]]).log()
T1 = SamplingParams(temperature=1.0)
_P1, _P2, _P3 = SamplingParams(0.7, top_k=4), SamplingParams(1.3, top_p=0.9), SamplingParams(0.5)
CASES = {  # name: (P, Zq, params, mode, N)
    # the example of docs: concepts/speculative-decoding, "Three rules that look right and are not"
    "p=[.4,.3,.2,.1] q=[.5,.3,.1,.1], argmax draft": (GEMMA_P, GEMMA_ZQ, T1, "argmax", 4000),
    "p=[.4,.3,.2,.1] q=[.5,.3,.1,.1], sampled draft": (GEMMA_P, GEMMA_ZQ, T1, "sample", 4000),
    "V=6 k=2 T=0.7 top-k 4, sampled": (*_case(6, 2, 1, _P1), _P1, "sample", 4000),
    "V=6 k=2 T=1.3 top-p 0.9, argmax": (*_case(6, 2, 2, _P2), _P2, "argmax", 4000),
    "V=5 k=3 T=0.5, sampled": (*_case(5, 3, 3, _P3), _P3, "sample", 4000),
}


@test(SP, "propose(): 'sample' must return (x, q') with q' = process_logits(draft_logits, params) and x drawn with "
      "sample(q', noise); 'argmax' returns (argmax of the raw logits, None): a one-hot proposal has no q.")  # fmt: skip
def propose_api(mod):
    params = SamplingParams(0.7, top_k=3)
    z = torch.randn(5, 8, generator=torch.Generator().manual_seed(0))
    noise = draw_exponentials(make_generators(0, 5), 8)
    x, q = mod.propose(z.clone(), params, "sample", noise)
    want = process_logits(z, params)
    assert q is not None and tuple(q.shape) == (5, 8), f"'sample' mode returned q of shape {getattr(q, 'shape', q)}"
    assert torch.allclose(torch.as_tensor(q).float(), want, atol=1e-6), "q' is not process_logits(logits, params)"
    assert bool((want.gather(-1, torch.as_tensor(x).long().view(5, 1)) > 0).all()), "a draft outside the support of q'"
    x, q = mod.propose(z.clone(), params, "argmax", noise)
    assert q is None, "'argmax' mode must return None for q (the proposal is a point mass)"
    assert torch.equal(torch.as_tensor(x).long().view(5), z.argmax(-1)), (
        "'argmax' mode must return argmax of the logits"
    )


@test(SP, "the drafts must be SAMPLED FROM THE q' YOU RETURN: drafting from the raw softmax (ignoring temperature / "
      "top-k) while the ratio uses the processed q' biases the output (z-lab/dflash issue #74: temperature never "
      "reached the drafter's sampler; deepseek-ai/DeepSpec issue #31: bf16 draft, float32 ratio).")  # fmt: skip
def drafts_follow_q(mod):
    for name in ("V=6 k=2 T=0.7 top-k 4, sampled", "V=5 k=3 T=0.5, sampled"):
        P, Zq, params, mode, N = CASES[name]
        gens = make_generators(11, N)
        x, q = mod.propose(Zq[0].expand(N, -1).clone(), params, "sample", draw_exponentials(gens, P.shape[1]))
        counts = torch.bincount(torch.as_tensor(x).long().view(-1), minlength=P.shape[1])
        chi2_test(counts, torch.as_tensor(q)[0].double(), f"{name}: draft frequencies vs the returned q'")


@test(SP, "accept x iff u < p(x)/q(x) (sampled drafts) or u < p(x) (argmax drafts, q None): P_u(accept) must be "
      "min(1, ratio) for every noise row. 'Accept iff x equals a token sampled from p' accepts with the wrong "
      "probability, sum p*q (the bug of mlx-swift-lm PR #459).")  # fmt: skip
def acceptance_exact_in_u(mod):
    """Integrate over u analytically: the accepted set must be [0, r) with r = min(1, ratio), for every noise."""
    g = torch.Generator().manual_seed(5)
    V = 6
    for mode in ("sample", "argmax"):
        for trial in range(6):
            p = process_logits(1.5 * torch.randn(2, V, generator=g), T1)
            q = process_logits(1.5 * torch.randn(1, V, generator=g), T1)
            x = int(torch.randint(0, V, (1,), generator=g))
            if trial == 0:
                p[0, x] = 0.0  # p(x) = 0: never accepted
                p[0] /= p[0].sum()
            r = float(p[0, x] if mode == "argmax" else p[0, x] / q[0, x])
            probes = [0.0, 0.999999 * min(r, 1.0), min(1.0000001 * r, 1.0 - 1e-12) if r < 1 else 1 - 1e-12]
            probes = sorted({u for u in probes})
            noise = draw_exponentials(make_generators(trial, 3), V)
            B = len(probes) * 3
            u = torch.tensor([[pr] for pr in probes for _ in range(3)], dtype=torch.float64)
            out, n = mod.verify(
                p.expand(B, 2, V).contiguous(),
                torch.full((B, 1), x, dtype=torch.long),
                None if mode == "argmax" else q.expand(B, 1, V).contiguous(),
                torch.ones(B, dtype=torch.long),
                u,
                noise.repeat(len(probes), 1),
            )
            n = torch.as_tensor(n).view(-1)
            for i in range(B):
                acc, want = int(n[i]) == 2, float(u[i, 0]) < r
                assert acc == want, (
                    f"{mode} draft x={x} with p(x)={float(p[0, x]):.4f}"
                    + ("" if mode == "argmax" else f", q(x)={float(q[0, x]):.4f}")
                    + f": at u={float(u[i, 0]):.6f} the draft was {'accepted' if acc else 'rejected'}; "
                    f"the accepted set must be [0, {min(r, 1):.6f})"
                )


def _dist_test(name):
    def fn(mod):
        P, Zq, params, mode, N = CASES[name]
        out, n, *_ = _round(mod, P, Zq, params, mode, N, seed=1234)
        V = P.shape[1]
        assert out.shape == (N, P.shape[0]) and n.shape == (N,), f"verify returned shapes {out.shape}, {n.shape}"
        chi2_test(torch.bincount(out[:, 0].clamp(0), minlength=V), P[0].double(), f"{name}: first emitted token")
        if P.shape[0] >= 2:  # the second token: emitted by the round, or sampled from p_1 by a plain step
            extra = sample(P[1].expand(N, V), draw_exponentials(make_generators(99, N), V))
            y2 = torch.where(n >= 2, out[:, 1], extra)
            joint = torch.bincount(out[:, 0].clamp(0) * V + y2.clamp(0), minlength=V * V)
            chi2_test(joint, torch.outer(P[0].double(), P[1].double()), f"{name}: first two tokens")

    fn.__name__ = "distribution: " + name
    return fn


_HINTS = {
    "argmax": "argmax drafts are a point mass: accept with p(x) and on rejection sample p with x removed. Returning "
    "the drafter softmax as q for an argmax draft and using min(1, p/q) gives [.8, 0, .2, 0] instead of "
    "[.4, .3, .2, .1] (what transformers' _speculative_sampling does with the assistant's argmax drafts; docs: "
    "concepts/speculative-decoding, 'Three rules that look right and are not', rule 1).",
    "sample": "accept with min(1, p/q'); on the first rejection sample norm((p - q')^+) with the noise row; if all "
    "drafts are accepted sample the bonus from the NEXT row p_n. Row j of p is conditioned on drafts 1..j.",
}
for _name, (_P, _Z, _params, _mode, _N) in CASES.items():
    TESTS.setdefault(SP, []).append(Test("distribution: " + _name, _dist_test(_name), _HINTS[_mode]))


@test(SP, "out_ids [B, K+1]: the accepted drafts, then exactly one more token, then -1; num_emitted = accepted + 1 "
      "<= num_drafts + 1 (num_drafts may be 0, and smaller than K); an id outside [0, V) is never accepted; the "
      "emitted token must have p > 0 in its row.")  # fmt: skip
def invariants(mod):
    g = torch.Generator().manual_seed(7)
    for trial in range(20):
        B, K, V = 3, int(torch.randint(0, 4, (1,), generator=g)), int(torch.randint(2, 9, (1,), generator=g))
        mode = "sample" if trial % 2 else "argmax"
        params = SamplingParams(1.0, top_k=max(1, V // 2))
        p = process_logits(torch.randn(B * (K + 1), V, generator=g), params).view(B, K + 1, V)
        gens = make_generators(trial, B)
        q = process_logits(torch.randn(B * max(K, 1), V, generator=g), T1).view(B, max(K, 1), V)[:, :K]
        if mode == "sample" and K:
            draft = sample(q.reshape(-1, V), draw_exponentials(gens * K, V)).view(B, K)
        else:
            draft = torch.randint(0, V, (B, K), generator=g)
            if K:
                draft[0, 0] = V + 3  # invalid id: must be rejected
        nd = torch.randint(0, K + 1, (B,), generator=g)
        out, n = mod.verify(
            p, draft, q if mode == "sample" else None, nd, draw_uniforms(gens, K), draw_exponentials(gens, V)
        )
        out, n = torch.as_tensor(out), torch.as_tensor(n)
        assert out.shape == (B, K + 1) and n.shape == (B,), f"shapes {tuple(out.shape)}, {tuple(n.shape)}"
        for b in range(B):
            m = int(n[b])
            assert 1 <= m <= int(nd[b]) + 1, f"num_emitted {m} with num_drafts {int(nd[b])}"
            assert out[b, : m - 1].tolist() == draft[b, : m - 1].tolist(), (
                "emitted tokens before the last must be the drafts"
            )
            assert bool((out[b, m:] == -1).all()), f"row {out[b].tolist()}: pad with -1 after the emitted tokens"
            y = int(out[b, m - 1])
            assert 0 <= y < V and float(p[b, m - 1, y]) > 0, (
                f"emitted token {y} has p = 0 in row {m - 1} (or is out of range)"
            )
            if mode == "argmax" and K and b == 0 and int(nd[0]) > 0:
                assert m == 1, "an out-of-range draft id was accepted"


@test(SP, "advisory: minimtp (and its Triton twin) fix the float ops so results are reproducible bit for bit: ratio "
      "p_x / q_x in float32, accept iff float64(u) < float64(ratio), residual max(p - q, 0) (or p with x zeroed), "
      "p if the residual is all 0, token = sample(dist, noise).", required=False)  # fmt: skip
def matches_minimtp_bit_for_bit(mod):
    from minimtp.speculative import verify as ref

    g = torch.Generator().manual_seed(3)
    for trial in range(30):
        B, K, V = 3, int(torch.randint(0, 4, (1,), generator=g)), int(torch.randint(2, 9, (1,), generator=g))
        p = process_logits(torch.randn(B * (K + 1), V, generator=g) * 2, T1).view(B, K + 1, V)
        q = process_logits(torch.randn(B * max(K, 1), V, generator=g) * 2, T1).view(B, max(K, 1), V)[:, :K]
        gens = make_generators(trial, B)
        draft = sample(q.reshape(-1, V), draw_exponentials(gens * K, V)).view(B, K) if K else torch.zeros(B, 0).long()
        nd = torch.randint(0, K + 1, (B,), generator=g)
        u, e = draw_uniforms(gens, K), draw_exponentials(gens, V)
        qq = q if trial % 2 else None
        want = ref(p, draft, qq, nd, u, e)
        got = mod.verify(p, draft, qq, nd, u, e)
        assert torch.equal(torch.as_tensor(got[0]), want[0]) and torch.equal(torch.as_tensor(got[1]), want[1]), (
            f"differs from minimtp.speculative.verify on a random case ({'sample' if qq is not None else 'argmax'} "
            f"mode): got {torch.as_tensor(got[0]).tolist()}, minimtp {want[0].tolist()}"
        )


@test(SP, "write the rule yourself: do not import minimtp.speculative (minimtp.sampling's process_logits and sample "
      "are fine).")  # fmt: skip
def no_library_shortcut(mod):
    pattern = (
        r"^\s*(from\s+minimtp\.speculative\s|import\s+minimtp\.speculative|from\s+minimtp\s+import\s.*speculative)"
    )
    assert not re.search(pattern, mod.__source__, re.M), "the file imports minimtp.speculative"


# =========================================================================================== kv_rollback

DESCRIPTIONS["kv_rollback"] = "append, rollback and window trimming on a paged KV cache (class PagedKV)"
KV = "kv_rollback"


def _conserved(cache, num_blocks: int) -> None:
    used = [b for t in cache.tables.values() for b in t if b is not None]
    assert len(used) == len(set(used)), f"a block id is in two tables (or twice in one): {cache.tables}"
    assert not set(used) & set(cache.free), f"block(s) {sorted(set(used) & set(cache.free))} are both used and free"
    assert sorted(used + list(cache.free)) == list(range(num_blocks)), (
        f"blocks leaked or duplicated: used {sorted(used)}, free {sorted(cache.free)}"
    )


def _rows(T: int, dim: int, g: torch.Generator):
    return torch.randn(T, dim, generator=g), torch.randn(T, dim, generator=g)


def _check_gather(cache, seq: int, dense: list, start: int = 0, what: str = "") -> None:
    k, v = cache.gather(seq, start)
    want_k = torch.stack([r[0] for r in dense[start:]]) if dense[start:] else torch.zeros(0, k.shape[-1])
    want_v = torch.stack([r[1] for r in dense[start:]]) if dense[start:] else torch.zeros(0, v.shape[-1])
    assert cache.lengths[seq] == len(dense), f"{what}: length {cache.lengths[seq]}, expected {len(dense)}"
    assert k.shape == want_k.shape, (
        f"{what}: gather returned {tuple(k.shape)} positions, expected {tuple(want_k.shape)}"
    )
    bad = [i + start for i in range(len(want_k)) if not (torch.equal(k[i], want_k[i]) and torch.equal(v[i], want_v[i]))]
    assert not bad, f"{what}: wrong K/V at positions {bad[:8]}"


@test(KV, "append: grow the table by ceil((length+T)/block_size) - len(table) blocks taken from the pool, write row j "
      "at position length+j (block table[pos // block_size], slot pos % block_size), then length += T.")  # fmt: skip
def append_and_gather(mod):
    g = torch.Generator().manual_seed(0)
    cache = mod.PagedKV(16, 4, 3)
    dense = {0: [], 1: []}
    for s in dense:
        cache.add(s)
    for s, T in [(0, 3), (1, 5), (0, 1), (1, 7), (0, 4), (0, 0), (1, 4)]:
        k, v = _rows(T, 3, g)
        cache.append(s, k, v)
        dense[s] += list(zip(k, v))
        _check_gather(cache, s, dense[s], what=f"after appending {T} to sequence {s}")
        _conserved(cache, 16)
    assert len(cache.tables[1]) == 4 and len(cache.tables[0]) == 2, f"tables {cache.tables}: too many blocks taken"


@test(KV, "rollback(seq, n) must forget EVERY position >= n: set length = n (not the end of n's block) and free the "
      "blocks entirely past n. Otherwise the next verify step attends to the rejected drafts' stale K/V.")  # fmt: skip
def rollback_then_append(mod):
    g = torch.Generator().manual_seed(1)
    for n_keep in (7, 8, 0, 10, 1):
        cache = mod.PagedKV(8, 4, 2)
        cache.add(0)
        k, v = _rows(10, 2, g)
        cache.append(0, k, v)
        cache.rollback(0, n_keep)
        dense = list(zip(k, v))[:n_keep]
        _check_gather(cache, 0, dense, what=f"10 positions rolled back to {n_keep}")
        k2, v2 = _rows(3, 2, g)
        cache.append(0, k2, v2)
        dense += list(zip(k2, v2))
        _check_gather(cache, 0, dense, what=f"10 positions, rolled back to {n_keep}, then 3 appended")
        _conserved(cache, 8)


@test(KV, "after rollback(seq, n) the table holds exactly ceil(n / block_size) blocks; the others are back in the "
      "free pool (a verify step that is mostly rejected must not leak blocks).")  # fmt: skip
def rollback_frees_blocks(mod):
    g = torch.Generator().manual_seed(2)
    cache = mod.PagedKV(10, 4, 2)
    cache.add(0)
    cache.add(1)
    cache.append(1, *_rows(5, 2, g))
    for _ in range(20):  # many verify rounds: +5 then keep 2 of them
        n = cache.lengths[0]
        cache.append(0, *_rows(5, 2, g))
        cache.rollback(0, n + 2)
        assert len(cache.tables[0]) == -(-(n + 2) // 4), f"length {n + 2} but {len(cache.tables[0])} blocks held"
        _conserved(cache, 10)
        if cache.lengths[0] >= 20:
            break


@test(KV, "trim(seq, keep): free the blocks whose positions are ALL < length - keep (table entry -> None, id -> pool);"
      " never a block holding a position >= length - keep.")  # fmt: skip
def trim_window(mod):
    g = torch.Generator().manual_seed(3)
    cache = mod.PagedKV(12, 4, 2)
    cache.add(0)
    k, v = _rows(20, 2, g)
    cache.append(0, k, v)
    cache.trim(0, 5)  # positions >= 15 must stay: blocks 0-2 (positions 0-11) are dead, block 3 (12-15) is not
    t = cache.tables[0]
    assert t[:3] == [None, None, None] and all(b is not None for b in t[3:]), f"table after trim(keep=5): {t}"
    _conserved(cache, 12)
    dense = list(zip(k, v))
    _check_gather(cache, 0, dense, start=12, what="after trim")
    k2, v2 = _rows(6, 2, g)
    cache.append(0, k2, v2)
    dense += list(zip(k2, v2))
    cache.trim(0, 5)
    _check_gather(cache, 0, dense, start=cache.lengths[0] - 5, what="after append + trim")
    _conserved(cache, 12)


@test(KV, "when the pool cannot cover an append, raise minimtp.errors.CacheFullError BEFORE changing anything.")
def pool_full(mod):
    from minimtp.errors import CacheFullError

    g = torch.Generator().manual_seed(4)
    cache = mod.PagedKV(3, 4, 2)
    cache.add(0)
    cache.append(0, *_rows(10, 2, g))
    before = ([list(t) for t in cache.tables.values()], dict(cache.lengths), sorted(cache.free))
    try:
        cache.append(0, *_rows(3, 2, g))
    except CacheFullError:
        pass
    else:
        raise AssertionError("appending 13 positions to a pool of 3 blocks of 4 did not raise CacheFullError")
    after = ([list(t) for t in cache.tables.values()], dict(cache.lengths), sorted(cache.free))
    assert before == after, f"a failed append changed the cache: {before} -> {after}"
    cache.append(0, *_rows(2, 2, g))  # 12 positions still fit


@test(KV, "random append / rollback / trim / release sequences over 3 sequences must always read back what a plain "
      "list would hold, and conserve the pool.")  # fmt: skip
def random_operations(mod):
    g = torch.Generator().manual_seed(5)
    rnd = lambda n: int(torch.randint(0, n, (1,), generator=g))
    cache = mod.PagedKV(40, 3, 2)
    dense: dict[int, list] = {}
    next_id = 0
    for step in range(250):
        op = rnd(10)
        if op == 0 or not dense:
            cache.add(next_id)
            dense[next_id] = []
            next_id += 1
            continue
        s = list(dense)[rnd(len(dense))]
        start = sum(1 for b in cache.tables[s] if b is None) * 3
        if op <= 4:
            T = rnd(6)
            if -(-(len(dense[s]) + T) // 3) - len(cache.tables[s]) > len(cache.free):
                continue
            k, v = _rows(T, 2, g)
            cache.append(s, k, v)
            dense[s] += list(zip(k, v))
        elif op <= 7:
            n = max(start, len(dense[s]) - rnd(5))
            cache.rollback(s, n)
            dense[s] = dense[s][:n]
        elif op == 8:
            before = list(cache.tables[s])
            cache.trim(s, 4)
            new = [j for j, (a, b) in enumerate(zip(before, cache.tables[s])) if a is not None and b is None]
            assert all(3 * (j + 1) <= len(dense[s]) - 4 for j in new), f"step {step}: trim freed a block in the window"
        else:
            cache.release(s)
            del dense[s]
            _conserved(cache, 40)
            continue
        start = sum(1 for b in cache.tables[s] if b is None) * 3
        _check_gather(cache, s, dense[s], start=start, what=f"step {step}")
        _conserved(cache, 40)


# =========================================================================================== paged_attention_kernel

DESCRIPTIONS["paged_attention_kernel"] = "a Triton paged-attention kernel (run by the interpreter on CPU)"
PA = "paged_attention_kernel"


def _attn_case(q_lens, seq_lens, Hq, Hkv, D, bs, seed, nan_below=None):
    """Random q / pool / shuffled tables. ``nan_below[b] = p``: every table entry of sequence b whose block lies
    entirely below position p points at a block full of NaN (a block a sliding-window cache has freed)."""
    g = torch.Generator().manual_seed(seed)
    B = len(seq_lens)
    nb = max(-(-L // bs) for L in seq_lens) + 1
    num_blocks = B * nb + 1
    tables = torch.randperm(num_blocks - 1, generator=g)[: B * nb].view(B, nb).to(torch.int32)
    k = torch.randn(num_blocks, bs, Hkv, D, generator=g)
    v = torch.randn(num_blocks, bs, Hkv, D, generator=g)
    k[-1], v[-1] = float("nan"), float("nan")
    if nan_below is not None:
        for b, p in enumerate(nan_below):
            tables[b, : p // bs] = num_blocks - 1
    q = torch.randn(sum(q_lens), Hq, D, generator=g)
    cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    return q, k, v, tables, torch.tensor(seq_lens, dtype=torch.int32), cu


def _attn_test(name, q_lens, seq_lens, Hq, Hkv, D, bs, window, scale, nan_window=False, hint=""):
    def fn(mod):
        from minimtp.attention import paged_attention as reference

        nan_below = None
        if nan_window:  # positions below the first query's window start are never visible to anyone
            nan_below = [max(0, L - ql - window + 1) for L, ql in zip(seq_lens, q_lens)]
        args = _attn_case(q_lens, seq_lens, Hq, Hkv, D, bs, seed=len(name), nan_below=nan_below)
        want = reference(*args, window=window, scale=scale)
        got = mod.paged_attention(*args, window=window, scale=scale)
        got = torch.as_tensor(got)
        assert got.shape == want.shape, f"output shape {tuple(got.shape)}, expected {tuple(want.shape)}"
        assert not bool(torch.isnan(got).any()), "NaN in the output: the kernel read K/V outside the visible keys"
        err = (got - want).abs().amax(dim=(1, 2))
        bad = (err > 1e-4).nonzero()[:, 0].tolist()
        assert not bad, (
            f"q_lens {q_lens}, seq_lens {seq_lens}, window {window}: query rows {bad} differ from the reference "
            f"(max error {float(err.max()):.2e})"
        )

    fn.__name__ = "kernel: " + name
    TESTS.setdefault(PA, []).append(Test(fn.__name__, fn, hint))


@test(PA, "write the kernel in Triton (@triton.jit), not with torch ops: this assignment is about the kernel.")
def is_a_triton_kernel(mod):
    assert "@triton.jit" in mod.__source__, "no @triton.jit kernel in the file"


_MASK = ("query r of a sequence with seq_len keys and q_len queries sits at position seq_len - q_len + r and sees "
         "keys j <= that position (and j > position - window). An off-by-one here passes decode (q_len = 1) and "
         "fails verify/prefill, where queries must not see the keys of the drafts after them.")  # fmt: skip
_attn_test("decode (q_len 1), GQA 4:2", [1, 1], [5, 19], 4, 2, 8, 4, 0, 1.0,
           hint="decode: one query per sequence at position seq_len - 1 sees every key; check the online softmax "
           "(running max m, denominator l, rescale by exp(m_old - m_new)) and the block-table lookup.")  # fmt: skip
_attn_test("verify (q_len 3)", [3, 3], [7, 12], 4, 2, 8, 4, 0, 0.5, hint=_MASK)
_attn_test("prefill + decode + short prompt", [6, 1, 2], [6, 9, 2], 4, 1, 16, 4, 0, 1.0, hint=_MASK)
_WINDOW = (
    "sliding window W: query i sees keys i-W < j <= i. Never load K/V outside that range (mask the loads or start "
    "the loop at the window): a sliding cache frees old blocks, their table entries are garbage."
)
_attn_test("sliding window 4, freed blocks hold NaN", [3, 1], [14, 11], 4, 2, 8, 4, 4, 1.0, True, _WINDOW)


# =========================================================================================== distil_drafter

DESCRIPTIONS["distil_drafter"] = "distil a drafter that reaches a target acceptance rate"
DD = "distil_drafter"
MIN_ALPHA1, MIN_ALPHA2 = 0.6, 0.58  # untrained drafter: 0.39 / 0.39; reference solution: 0.67 / 0.66


_SETUP: dict = {}


def _distil_setup():
    """The frozen target (tutorial 09's), the data sampled from it (train: 48 sequences, held out: 16; S = 16)."""
    if not _SETUP:
        from _tiny import tiny_target

        import minimtp

        target = tiny_target(seed=0, mix=0.5).requires_grad_(False)
        engine = minimtp.Engine(target)
        g = torch.Generator().manual_seed(0)

        def batch(n, seed):
            starts = [[int(t)] for t in torch.randint(2, target.config.vocab_size, (n,), generator=g)]
            res = engine.generate(starts, max_new_tokens=15, temperature=1.0, seed=seed, stop_token_ids=[])
            return torch.tensor([a + b for a, b in zip(starts, res.tokens)])

        _SETUP.update(target=target, train=batch(48, 1), heldout=batch(16, 2))
    return _SETUP


def _fresh_drafter(seed=3):
    from _tiny import tiny_assistant

    return tiny_assistant(_distil_setup()["target"], seed=seed, correlate=False)


def _ref_loss(target, drafter, x, k):
    from minimtp.attention import DraftDenseContext

    B, S = x.shape
    with torch.no_grad():
        logits, t_hidden, kv = target.forward_with_kv(x)
        t_prob = torch.softmax(logits, -1)
    V, H = t_prob.shape[-1], t_hidden.shape[-1]
    pos = torch.arange(S).repeat(B)
    ctx = DraftDenseContext(drafter.config.text, kv, pos.view(B, S))
    hid = torch.cat([torch.zeros(B, 1, H), t_hidden[:, :-1]], 1).reshape(B * S, H)
    total = 0.0
    for j in range(1, k + 1):
        src = (torch.arange(S) + j - 1).clamp(max=S - 1)
        valid = ((torch.arange(S) >= 1) & (torch.arange(S) + j - 1 <= S - 1)).repeat(B)
        z, hid = drafter.step(target.embed(x[:, src]).reshape(B * S, H), hid, pos, ctx)
        ce = -(t_prob[:, src].reshape(B * S, V) * torch.log_softmax(z, -1)).sum(-1)
        total = total + ce[valid].mean()
    return total / k


@torch.no_grad()
def _alphas(target, drafter, x) -> tuple[float, float]:
    """Exact acceptance of sampled drafts at temperature 1, E[sum_x min(p, q)], for draft steps 1 and 2
    (teacher-forced: step 2 reads the true next token and step 1's hidden state), over all valid positions."""
    from minimtp.attention import DraftDenseContext

    B, S = x.shape
    logits, t_hidden, kv = target.forward_with_kv(x)
    t_prob = torch.softmax(logits, -1)
    V, H = t_prob.shape[-1], t_hidden.shape[-1]
    pos = torch.arange(S).repeat(B)
    ctx = DraftDenseContext(drafter.config.text, kv, pos.view(B, S))
    hid = torch.cat([torch.zeros(B, 1, H), t_hidden[:, :-1]], 1).reshape(B * S, H)
    out = []
    for j in (1, 2):
        src = (torch.arange(S) + j - 1).clamp(max=S - 1)
        valid = ((torch.arange(S) >= 1) & (torch.arange(S) + j - 1 <= S - 1)).repeat(B)
        z, hid = drafter.step(target.embed(x[:, src]).reshape(B * S, H), hid, pos, ctx)
        p, q = t_prob[:, src].reshape(B * S, V)[valid], torch.softmax(z, -1)[valid]
        out.append(float(torch.minimum(p, q).sum(-1).mean()))
    return out[0], out[1]


@test(DD, "distill_loss: step j at position p reads token x[p+j-1] (step 1 with the target's hidden state at p-1, "
      "later steps with the previous step's hidden output), runs at position p (K/V < p) and is scored against "
      "the target's distribution of token p+j = teacher row p+j-1; average over p >= 1 with p+j-1 <= S-1, then "
      "over j.")  # fmt: skip
def loss_matches_definition(mod):
    st = _distil_setup()
    target, x = st["target"], st["train"][:4]
    drafter = _fresh_drafter()
    for k in (1, 2, 3):
        with torch.no_grad():
            got = mod.distill_loss(target, drafter, x, mod.teacher(target, x), k)
            want = _ref_loss(target, drafter, x, k)
        assert torch.is_tensor(got) and got.dim() == 0, "distill_loss must return a scalar tensor"
        assert abs(float(got) - float(want)) <= 1e-4 * abs(float(want)), (
            f"k={k}: loss {float(got):.5f}, expected {float(want):.5f}"
        )


@test(DD, "the loss must be differentiable w.r.t. the drafter's parameters (do not detach the drafter's logits or "
      "hidden states; DO keep the target frozen).")  # fmt: skip
def loss_has_gradients(mod):
    st = _distil_setup()
    target, x = st["target"], st["train"][:4]
    drafter = _fresh_drafter()
    drafter.train()
    loss = mod.distill_loss(target, drafter, x, mod.teacher(target, x), 2)
    loss.backward()
    g1 = drafter.pre_projection.weight.grad
    assert g1 is not None and bool(torch.isfinite(g1).all()) and float(g1.abs().sum()) > 0, "no gradient reached W_pre"
    assert all(p.grad is None for p in target.parameters()), "the target received gradients: it must stay frozen"


@test(DD, f"after train(), exact acceptance (sampled drafts, T = 1) on held-out target samples must reach "
      f"alpha_1 >= {MIN_ALPHA1} (draft step 1) and alpha_2 >= {MIN_ALPHA2} (step 2). Check the loss first; then "
      "steps, learning rate and batch size.")  # fmt: skip
def acceptance_after_training(mod):
    st = _distil_setup()
    target = st["target"]
    drafter = _fresh_drafter()
    before = _alphas(target, drafter, st["heldout"])
    t0 = time.perf_counter()
    trained = mod.train(target, drafter, st["train"].clone())
    drafter = trained if trained is not None else drafter
    dt = time.perf_counter() - t0
    a1, a2 = _alphas(target, drafter.eval(), st["heldout"])
    print(f"         alpha_1 {before[0]:.3f} -> {a1:.3f}, alpha_2 {before[1]:.3f} -> {a2:.3f}, training {dt:.1f}s")
    assert a1 >= MIN_ALPHA1 and a2 >= MIN_ALPHA2, (
        f"alpha_1 = {a1:.3f} (need {MIN_ALPHA1}), alpha_2 = {a2:.3f} (need {MIN_ALPHA2})"
    )


# ------------------------------------------------------------------------------------------------ main


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Grade an assignment with the project's property tests.")
    ap.add_argument("assignment", nargs="?", help="assignment name (--list shows them)")
    ap.add_argument("file", nargs="?", help="the student file to grade")
    ap.add_argument("--list", action="store_true", help="list the assignments")
    ap.add_argument("-x", "--fail-fast", action="store_true", help="stop at the first failing test")
    args = ap.parse_args(argv)
    if args.list or not args.assignment:
        for name, tests in TESTS.items():
            print(f"{name:24s} {DESCRIPTIONS.get(name, '')} ({len(tests)} tests)")
        return 0
    if args.assignment not in TESTS:
        print(f"unknown assignment {args.assignment!r}; expected one of {sorted(TESTS)}", file=sys.stderr)
        return 2
    if not args.file or not os.path.isfile(args.file):
        print(f"no such file: {args.file!r}", file=sys.stderr)
        return 2
    return 0 if grade(args.assignment, os.path.abspath(args.file), fail_fast=args.fail_fast) else 1


if __name__ == "__main__":
    sys.exit(main())
