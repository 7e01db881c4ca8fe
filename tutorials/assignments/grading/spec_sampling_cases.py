"""spec_sampling, continued: residual, bonus, invariants, output distributions, bit for bit."""

from __future__ import annotations

import torch

from minimtp.sampling import (
    SamplingParams,
    draw_exponentials,
    draw_uniforms,
    make_generators,
    process_logits,
    sample,
)

from .core import TESTS, Failure, Test, _where, check, test
from .spec_sampling import (
    CASES,
    SP,
    SP_ACCEPT,
    SP_ARGMAX_KEEPS_X,
    SP_BONUS,
    SP_BONUS_ROW,
    SP_EMPTY_RESIDUAL,
    SP_INVALID,
    SP_INVALID_INDEX,
    SP_LAYOUT,
    SP_NUM_DRAFTS,
    SP_ONE_U,
    SP_OUTPUT,
    SP_P_ZERO_OUT,
    SP_Q_STEP,
    SP_RESIDUAL,
    SP_RESIDUAL_P,
    SP_RESIDUAL_Q,
    SP_RESIDUAL_ROW,
    SP_RESIDUAL_SIGN,
    T1,
    _norm,
    _residual,
    _round,
)
from .stats import chi2_test


def _rows(g, n, V, params=T1, scale=1.5):
    return process_logits(scale * torch.randn(n, V, generator=g), params)


def check_residual(mod, g: torch.Generator, V: int, N: int, seed: int) -> None:
    """Rejections forced by u: sampled drafts (draft 1 surely accepted, draft 2 surely rejected) must emit from
    norm((p_1 - q_1)^+); an argmax draft surely rejected must emit from p_0 with x removed."""
    while True:
        p, q = _rows(g, 3, V), _rows(g, 2, V)
        x1, x2 = int((p[0] / q[0]).argmax()), int((p[1] / q[1]).argmin())
        if float(p[1, x2] / q[1, x2]) < 0.999 and float(p[0, x1] / q[0, x1]) >= 1:
            break
    gens = make_generators(seed, N)
    out, n = mod.verify(p.expand(N, 3, V).contiguous(), torch.tensor([[x1, x2]]).expand(N, 2).contiguous(),
                        q.expand(N, 2, V).contiguous(), torch.full((N,), 2, dtype=torch.long),
                        torch.tensor([[0.0, 1 - 1e-9]], dtype=torch.float64).expand(N, 2).contiguous(),
                        draw_exponentials(gens, V))  # fmt: skip
    out, n = torch.as_tensor(out), torch.as_tensor(n)
    bug = SP_ACCEPT
    if bool((n == 3).all()):  # draft 2 accepted although u = 1 - 1e-9 > its ratio
        bug = SP_Q_STEP if float(p[1, x2] / q[0, x2]) >= 1 - 1e-9 else SP_ONE_U
    check(bool((n == 2).all()) and bool((out[:, 0] == x1).all()), bug,
          lambda: f"V={V}: draft 1 (ratio {float(p[0, x1] / q[0, x1]):.3f} >= 1, u = 0) must be accepted and draft 2 "
          f"(ratio {float(p[1, x2] / q[1, x2]):.3f}, u = 1 - 1e-9) rejected: num_emitted = 2; got "
          f"{torch.as_tensor(n)[:4].tolist()}...")  # fmt: skip
    alts = {SP_RESIDUAL_P: _norm(p[1]), SP_RESIDUAL_ROW: _residual(p[0], q[0]), SP_RESIDUAL_Q: _norm(q[1]),
            SP_RESIDUAL_SIGN: _residual(q[1], p[1]), f"{SP_RESIDUAL_ROW} (p_2)": _norm(p[2]),
            SP_Q_STEP: _residual(p[1], q[0])}  # fmt: skip
    chi2_test(
        torch.bincount(out[:, 1].clamp(0), minlength=V),
        _residual(p[1], q[1]),
        f"V={V}, sampled drafts, draft 2 rejected: the token emitted instead",
        SP_RESIDUAL,
        alternatives=alts,
    )
    # argmax draft, surely rejected: p with x removed
    x = int(torch.randint(0, V, (1,), generator=g))
    p0 = p[:2].clone()
    out, n = mod.verify(p0.expand(N, 2, V).contiguous(), torch.full((N, 1), x, dtype=torch.long), None,
                        torch.ones(N, dtype=torch.long), torch.full((N, 1), 1 - 1e-9, dtype=torch.float64),
                        draw_exponentials(gens, V))  # fmt: skip
    out = torch.as_tensor(out)
    want = p0[0].double().clone()
    want[x] = 0
    chi2_test(
        torch.bincount(out[:, 0].clamp(0), minlength=V),
        _norm(want),
        f"V={V}, argmax draft x={x} rejected (u = 1 - 1e-9 > p(x) = {float(p0[0, x]):.3f}): the token emitted instead",
        SP_RESIDUAL,
        alternatives={SP_ARGMAX_KEEPS_X: _norm(p0[0]), SP_RESIDUAL_ROW: _norm(p0[1])},
    )


@test(SP, "at the first rejection emit ONE token from norm((p_j - q_j)^+) for a sampled draft (row j: the rejected "
      "draft's), from p_j with x removed for an argmax draft; never from p itself (that double-counts the accepted "
      "mass).", points=5, bug=SP_RESIDUAL, chi2=2)  # fmt: skip
def residual_after_rejection(mod):
    check_residual(mod, torch.Generator().manual_seed(21), 6, 4000, 21)


def check_bonus(mod, g: torch.Generator, V: int, N: int, seed: int) -> None:
    """Drafts whose ratio is >= 1 are surely accepted; the bonus token must come from row num_drafts."""
    p, q = _rows(g, 3, V), _rows(g, 2, V)
    x = torch.stack([(p[j] / q[j]).argmax() for j in range(2)])
    gens = make_generators(seed, N)
    nd = torch.full((N,), 2, dtype=torch.long)
    nd[N // 2 :] = 1  # the second half uses only its first draft: the bonus then comes from row 1
    out, n = mod.verify(p.expand(N, 3, V).contiguous(), x.expand(N, 2).contiguous(), q.expand(N, 2, V).contiguous(),
                        nd, draw_uniforms(gens, 2), draw_exponentials(gens, V))  # fmt: skip
    out, n = torch.as_tensor(out), torch.as_tensor(n)
    check(
        torch.equal(n, nd + 1),
        SP_ACCEPT if bool((n <= nd + 1).all()) else SP_NUM_DRAFTS,
        lambda: (
            f"V={V}: every draft has ratio >= 1 (always accepted): num_emitted must be num_drafts + 1; rows "
            f"with num_drafts {int(nd[(n != nd + 1).nonzero()[0, 0]])} emitted {int(n[(n != nd + 1).nonzero()[0, 0]])}"
        ),
    )
    h = N // 2
    chi2_test(torch.bincount(out[:h, 2].clamp(0), minlength=V), _norm(p[2]),
              f"V={V}, both drafts accepted: the bonus token", SP_BONUS,
              alternatives={f"{SP_BONUS_ROW} (p_1)": _norm(p[1]), f"{SP_BONUS_ROW} (p_0)": _norm(p[0])})  # fmt: skip
    chi2_test(torch.bincount(out[h:, 1].clamp(0), minlength=V), _norm(p[1]),
              f"V={V}, num_drafts 1 of K=2, its draft accepted: the bonus token (row 1)", SP_BONUS,
              alternatives={SP_NUM_DRAFTS: _norm(p[2]), f"{SP_BONUS_ROW} (p_0)": _norm(p[0])})  # fmt: skip


@test(SP, "if all n = num_drafts drafts are accepted emit a bonus token from p_n, the row after the last draft "
      "(num_drafts may be smaller than K: then row num_drafts, not row K).", points=5, bug=SP_BONUS,
      chi2=2)  # fmt: skip
def bonus_after_acceptance(mod):
    check_bonus(mod, torch.Generator().manual_seed(22), 6, 4000, 22)


def _is_index_error(e: BaseException) -> bool:
    """An out-of-range index: Python's / torch's IndexError, or the RuntimeError some torch ops raise for it."""
    return isinstance(e, IndexError) or (
        isinstance(e, RuntimeError) and any(w in str(e).lower() for w in ("out of bounds", "out of range", "index"))
    )


def _verify_invalid_ids(mod, case: str, V: int, args: tuple):
    """``mod.verify(*args)``, whose draft ids ``args[1]`` may include ids outside [0, V). If it raises an index error
    and runs with those ids replaced by valid ones (id mod V), the file reads p[x] before checking 0 <= x < V: name
    that bug class (SP_INVALID_INDEX), not the test's default (the output layout)."""
    invalid = sorted({int(i) for i in args[1].flatten().tolist() if not 0 <= i < V})
    try:
        return mod.verify(*args)
    except Exception as e:
        if not invalid or not _is_index_error(e):
            raise
        try:
            mod.verify(args[0], args[1].remainder(V), *args[2:])
        except Exception:
            raise e from None  # it fails with valid ids too: not the invalid ids' fault
        where = _where(e, getattr(mod, "__file__", "") or "")
        raise Failure(
            SP_INVALID_INDEX,
            f"{case}, draft ids {invalid} outside [0, {V}) in the batch: verify raised {type(e).__name__}: {e}"
            f"{f' (at {where})' if where else ''}; with valid ids in their place it runs: the invalid id was used as "
            "an index before it was rejected",
        ) from None


def check_invariants(mod, g: torch.Generator, trials: int = 20, max_v: int = 9) -> None:
    V = 5  # out-of-range ids, negative ones included, are rejected even at u = 0 (p is uniform: p(id mod V) > 0)
    for q in (None, torch.full((2, 1, V), 1.0 / V)):
        out, n = _verify_invalid_ids(
            mod,
            f"{'argmax' if q is None else 'sampled'} drafts, V={V}",
            V,
            (
                torch.full((2, 2, V), 1.0 / V),
                torch.tensor([[-1], [V]]),
                q,
                torch.ones(2, dtype=torch.long),
                torch.zeros(2, 1, dtype=torch.float64),
                draw_exponentials(make_generators(0, 2), V),
            ),
        )
        n = torch.as_tensor(n).view(-1)
        check(
            bool((n == 1).all()),
            SP_INVALID,
            f"{'argmax' if q is None else 'sampled'} drafts with ids -1 and {V} "
            f"(outside [0, {V})), u = 0: num_emitted {n.tolist()}, expected [1, 1] (an invalid id is rejected)",
        )
    for trial in range(trials):
        B, K, V = 3, int(torch.randint(0, 4, (1,), generator=g)), int(torch.randint(2, max_v, (1,), generator=g))
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
                draft[0, 0] = V + 3 if trial % 4 == 0 else -1  # invalid ids: must be rejected
        nd = torch.randint(0, K + 1, (B,), generator=g)
        args = (p, draft, q if mode == "sample" else None, nd, draw_uniforms(gens, K), draw_exponentials(gens, V))
        out, n = _verify_invalid_ids(mod, f"{mode} drafts, K={K}, V={V}", V, args)
        out, n = torch.as_tensor(out), torch.as_tensor(n)
        case = f"{mode} drafts, K={K}, V={V}"
        check(
            tuple(out.shape) == (B, K + 1) and tuple(n.shape) == (B,),
            SP_LAYOUT,
            f"{case}: out_ids {tuple(out.shape)}, num_emitted {tuple(n.shape)}; expected ({B}, {K + 1}), ({B},)",
        )
        for b in range(B):
            m = int(n[b])
            check(1 <= m, SP_LAYOUT, f"{case}: num_emitted {m}: a round always emits at least one token")
            check(m <= int(nd[b]) + 1, SP_NUM_DRAFTS, f"{case}: num_emitted {m} with num_drafts {int(nd[b])}")
            if mode == "argmax" and K and b == 0 and int(nd[0]) > 0:
                check(m == 1, SP_INVALID, f"{case}: the draft id {int(draft[0, 0])} (outside [0, {V})) was accepted")
            check(out[b, : m - 1].tolist() == draft[b, : m - 1].tolist(), SP_LAYOUT,
                  f"{case}: row {out[b].tolist()}: the tokens before the last emitted one must be the drafts "
                  f"{draft[b, : m - 1].tolist()}")  # fmt: skip
            check(
                bool((out[b, m:] == -1).all()),
                SP_LAYOUT,
                f"{case}: row {out[b].tolist()} with num_emitted {m}: pad with -1 after the emitted tokens",
            )
            y = int(out[b, m - 1])
            check(
                0 <= y < V and float(p[b, m - 1, y]) > 0,
                SP_P_ZERO_OUT,
                f"{case}: emitted token {y} has p = 0 in row {m - 1} (or is out of range)",
            )


@test(SP, "out_ids [B, K+1]: the accepted drafts, then exactly one more token, then -1; num_emitted = accepted + 1 "
      "<= num_drafts + 1 (num_drafts may be 0, and smaller than K); an id outside [0, V) is never accepted; the "
      "emitted token must have p > 0 in its row.", points=10, bug=SP_LAYOUT)  # fmt: skip
def invariants(mod):
    check_invariants(mod, torch.Generator().manual_seed(7))


def check_distribution(mod, name: str, P, Zq, params, mode, N, seed) -> None:
    out, n, *_ = _round(mod, P, Zq, params, mode, N, seed=seed)
    V = P.shape[1]
    check(tuple(out.shape) == (N, P.shape[0]) and tuple(n.shape) == (N,), SP_LAYOUT,
          f"verify returned shapes {tuple(out.shape)}, {tuple(n.shape)}")  # fmt: skip
    chi2_test(torch.bincount(out[:, 0].clamp(0), minlength=V), P[0].double(), f"{name}: first emitted token",
              SP_OUTPUT)  # fmt: skip
    if P.shape[0] >= 2:  # the second token: emitted by the round, or sampled from p_1 by a plain step
        extra = sample(P[1].expand(N, V), draw_exponentials(make_generators(99, N), V))
        y2 = torch.where(n >= 2, out[:, 1], extra)
        joint = torch.bincount(out[:, 0].clamp(0) * V + y2.clamp(0), minlength=V * V)
        chi2_test(joint, torch.outer(P[0].double(), P[1].double()), f"{name}: first two tokens", SP_OUTPUT,
                  label=lambda i: f"tokens ({i // V}, {i % V})")  # fmt: skip


def _dist_test(name):
    def fn(mod):
        check_distribution(mod, name, *CASES[name], seed=1234)

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
    TESTS[SP].append(Test("distribution: " + _name, _dist_test(_name), _HINTS[_mode], points=6, bug=SP_OUTPUT, chi2=2))


def check_empty_residual(mod, g: torch.Generator, trials: int = 6, R: int = 200) -> None:
    """Adversarial state: q' and p equal but for one ulp at the draft x (p(x) just below q(x)), and p(0) = q(0) = 0.
    With u in (p(x)/q(x), 1) the draft is rejected and the residual (p - q)^+ is all zeros: the emitted token must
    come from p (in its support; not always the same token), not from the zeros (which sample() turns into
    token 0)."""
    for trial in range(trials):
        V = int(torch.randint(4, 13, (1,), generator=g))
        q = process_logits(1.5 * torch.randn(1, V, generator=g), T1)[0]
        q[0] = 0.0
        q = q / q.sum()
        x = int(torch.randint(1, V, (1,), generator=g))
        p = q.clone()
        p[x] = torch.nextafter(q[x], torch.tensor(0.0))  # one ulp below: p <= q everywhere, p(x) < q(x)
        ratio = float(p[x] / q[x])
        u = torch.full((R, 1), 1.0 - (1.0 - ratio) / 2, dtype=torch.float64)  # in (ratio, 1): rejected
        P = torch.stack([p, q])
        out, n = mod.verify(P.expand(R, 2, V).contiguous(), torch.full((R, 1), x, dtype=torch.long),
                            q.expand(R, 1, V).contiguous(), torch.ones(R, dtype=torch.long), u,
                            draw_exponentials(make_generators(trial, R), V))  # fmt: skip
        out, n = torch.as_tensor(out), torch.as_tensor(n).view(-1)
        what = (f"V={V}, draft x={x} with p(x) one ulp below q(x) = {float(q[x]):.6f}, p = q elsewhere, u = "
                f"{float(u[0, 0]):.9f} > p(x)/q(x) = {ratio:.9f}: rejected, residual (p - q)^+ all zeros")  # fmt: skip
        check(bool((n == 1).all()), SP_LAYOUT, f"{what}: num_emitted {n.unique().tolist()}, expected 1")
        tok = out[:, 0]
        bad = tok[(tok < 0) | (tok >= V)].unique().tolist()
        check(not bad, SP_LAYOUT, f"{what}: emitted ids {bad} outside [0, {V})")
        zero = tok[p[tok.clamp(0, V - 1)] == 0]
        if zero.numel():
            raise Failure(SP_EMPTY_RESIDUAL, f"{what}: emitted token {int(zero[0])} with p = 0 (in {zero.numel()} of "
                          f"{R} rounds): the empty residual was sampled instead of p")  # fmt: skip
        if len(tok.unique()) == 1 and float(p.max()) <= 0.9:
            raise Failure(SP_EMPTY_RESIDUAL, f"{what}: every one of {R} rounds emitted token {int(tok[0])}, while p = "
                          f"{[round(v, 3) for v in p.tolist()]}")  # fmt: skip


@test(SP, "advisory: minimtp (and its Triton twin) fix the float ops so results are reproducible bit for bit: ratio "
      "p_x / q_x in float32, accept iff float64(u) < float64(ratio), residual max(p - q, 0) (or p with x zeroed), "
      "p if the residual is all 0, token = sample(dist, noise).", required=False, bug="not bit-for-bit")  # fmt: skip
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
        try:
            want = ref(p, draft, qq, nd, u, e)
        except NotImplementedError:
            raise Failure(
                "no reference here",
                "minimtp.speculative.verify is a hole in this copy of minimtp (the "
                "student release): fill it and this compares your two answers",
            ) from None
        got = mod.verify(p, draft, qq, nd, u, e)
        assert torch.equal(torch.as_tensor(got[0]), want[0]) and torch.equal(torch.as_tensor(got[1]), want[1]), (
            f"differs from minimtp.speculative.verify on a random case ({'sample' if qq is not None else 'argmax'} "
            f"mode): got {torch.as_tensor(got[0]).tolist()}, minimtp {want[0].tolist()}"
        )
