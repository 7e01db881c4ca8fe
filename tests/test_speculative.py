"""Property tests of the verification rules (minimtp/speculative.py).

1. The rule pieces give EXACTLY p for the first emitted token (float64, integrated over u and the race).
2. `verify` is bit-identical to a plain per-sequence loop built from those same pieces (so (1) and the
   whole-sequence enumeration of test_exact_enumeration.py apply to it), for random u including u exactly at
   the acceptance threshold.
3. Invariants: ids in [0, V) and inside the processed support, layout, num_emitted range, determinism, extreme
   logits. 4. A seeded Monte-Carlo chi-square check of verify's first token. 5. Greedy verification.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from support.verify_cases import PARAMS, STYLES, make_logits, verify_cases

from minimtp.sampling import SamplingParams, draw_exponentials, draw_uniforms, make_generators, process_logits, sample
from minimtp.speculative import (
    acceptance_probability,
    acceptance_ratio,
    residual_argmax,
    residual_or_target,
    residual_sample,
    verify,
    verify_greedy,
)


def reference_verify(target_probs, draft_ids, draft_probs, num_drafts, uniforms, noise):
    """The rules of speculative.py as a plain loop over sequences and draft positions."""
    B, K1, V = target_probs.shape
    out = torch.full((B, K1), -1, dtype=torch.int64)
    emitted = torch.zeros(B, dtype=torch.int64)
    for b in range(B):
        n, j = min(int(num_drafts[b]), K1 - 1), 0
        while j < n:
            x = int(draft_ids[b, j])
            if not 0 <= x < V:
                break
            q_x = None if draft_probs is None else draft_probs[b, j, x]
            if not float(uniforms[b, j]) < float(acceptance_ratio(target_probs[b, j, x], q_x)):
                break
            out[b, j] = x
            j += 1
        p = target_probs[b, j]
        dist = p
        if j < n:
            if draft_probs is None:
                resid = residual_argmax(p, draft_ids[b, j])
            else:
                resid = residual_sample(p, draft_probs[b, j])
            dist = residual_or_target(resid[None], p[None])[0]
        out[b, j] = sample(dist[None], noise[b][None])[0]
        emitted[b] = j + 1
    return out, emitted


# ---------------------------------------------------------------------------------------------------------
# 1. Exactness of the rule pieces (first emitted token), float64.
# ---------------------------------------------------------------------------------------------------------


def first_token_distribution(p: torch.Tensor, q: torch.Tensor | None, x: int | None = None) -> torch.Tensor:
    """P(first emitted token = y), integrating over u (P(u < r) = min(1, r)) and the race (P(y) = r_y / sum r).
    q given: x ~ q ("sample" rule). q None: the fixed draft x ("argmax" rule)."""
    out = torch.zeros_like(p)
    drafts = [(x, 1.0)] if q is None else [(i, float(q[i])) for i in range(len(q)) if q[i] > 0]
    for xi, w in drafts:
        a = float(acceptance_probability(acceptance_ratio(p[xi], None if q is None else q[xi])))
        resid = residual_argmax(p, torch.tensor(xi)) if q is None else residual_sample(p, q)
        resid = residual_or_target(resid[None], p[None])[0]
        out[xi] += w * a
        out += w * (1 - a) * resid / resid.sum()
    return out


@settings(max_examples=200, deadline=None)
@given(
    V=st.integers(2, 12),
    seed=st.integers(0, 2**31),
    style_p=st.sampled_from(STYLES),
    style_q=st.sampled_from(STYLES),
    params_p=PARAMS,
    params_q=PARAMS,
)
def test_first_token_is_exactly_p(V, seed, style_p, style_q, params_p, params_q):
    g = torch.Generator().manual_seed(seed)
    p = process_logits(make_logits(g, (1, V), style_p, torch.float64), params_p)[0]
    q = process_logits(make_logits(g, (1, V), style_q, torch.float64), params_q)[0]
    assert torch.allclose(first_token_distribution(p, q), p, rtol=0, atol=1e-9)  # "sample" rule
    for x in range(V):  # "argmax" rule, whatever the draft
        assert torch.allclose(first_token_distribution(p, None, x), p, rtol=0, atol=1e-9)


def test_first_token_exact_in_float32_too():
    """Same identity with the float32 probabilities verify sees: exact up to float32 rounding."""
    g = torch.Generator().manual_seed(0)
    for params in [SamplingParams(1.0), SamplingParams(0.7, top_k=5, top_p=0.9)]:
        p = process_logits(make_logits(g, (1, 50), "normal"), params)[0]
        q = process_logits(make_logits(g, (1, 50), "normal"), params)[0]
        assert torch.allclose(first_token_distribution(p, q).double(), p.double(), atol=1e-6)
        assert torch.allclose(first_token_distribution(p, None, 3).double(), p.double(), atol=1e-6)


def test_rule_piece_values():
    p = torch.tensor([0.4, 0.3, 0.2, 0.1])
    q = torch.tensor([0.5, 0.3, 0.1, 0.1])
    assert float(acceptance_ratio(p[0], q[0])) == pytest.approx(0.8)
    assert float(acceptance_ratio(p[0])) == pytest.approx(0.4)
    assert float(acceptance_probability(torch.tensor(2.5))) == 1.0
    assert float(acceptance_probability(torch.tensor(0.0) / torch.tensor(0.0))) == 0.0  # 0/0 -> never
    assert torch.allclose(residual_sample(p, q), torch.tensor([0.0, 0.0, 0.1, 0.0]))
    assert torch.equal(residual_argmax(p, torch.tensor(1)), torch.tensor([0.4, 0.0, 0.2, 0.1]))
    assert torch.equal(residual_argmax(p, torch.tensor(-1)), p)  # out-of-range draft removes nothing
    assert torch.equal(residual_or_target(torch.zeros(1, 4), p[None])[0], p)
    # the one-hot rule avoids transformers' bias ([.8, 0, .2, 0] here: `_speculative_sampling` applied to argmax
    # drafts; docs: concepts/speculative-decoding, "Three rules that look right and are not", rule 1):
    assert torch.allclose(first_token_distribution(p.double(), None, 0), p.double(), atol=1e-7)


# ---------------------------------------------------------------------------------------------------------
# 2. verify == the loop over the rule pieces, bit for bit.
# ---------------------------------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(case=verify_cases())
def test_verify_matches_reference_loop(case):
    out, n = verify(*case)
    ref_out, ref_n = reference_verify(*case)
    assert torch.equal(out, ref_out) and torch.equal(n, ref_n)


@settings(max_examples=50, deadline=None)
@given(case=verify_cases(dtype=torch.bfloat16))
def test_verify_matches_reference_loop_bf16_logits(case):
    out, n = verify(*case)
    assert torch.equal(out, reference_verify(*case)[0])


# ---------------------------------------------------------------------------------------------------------
# 3. Invariants.
# ---------------------------------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(case=verify_cases())
def test_verify_invariants(case):
    target_probs, draft_ids, draft_probs, num_drafts, uniforms, noise = case
    B, K1, V = target_probs.shape
    out, n = verify(*case)
    assert out.dtype == torch.int64 and n.dtype == torch.int64 and out.shape == (B, K1)
    assert bool(((n >= 1) & (n <= num_drafts + 1)).all())
    for b in range(B):
        nb = int(n[b])
        assert torch.equal(out[b, : nb - 1], draft_ids[b, : nb - 1])  # accepted prefix = the drafts
        assert bool((out[b, nb:] == -1).all())
        ids = out[b, :nb]
        assert bool(((ids >= 0) & (ids < V)).all())
        assert bool((target_probs[b, torch.arange(nb), ids] > 0).all())  # inside the processed support
    again = verify(*case)
    assert torch.equal(again[0], out) and torch.equal(again[1], n)  # deterministic given the randoms


@pytest.mark.parametrize("style", ["extreme", "equal", "onehot", "neginf"])
@pytest.mark.parametrize(
    "params",
    [SamplingParams(1.0), SamplingParams(0.01), SamplingParams(2.0, top_k=1), SamplingParams(1.0, top_p=1e-6)],
)
def test_extreme_logits_give_valid_ids(style, params):
    g = torch.Generator().manual_seed(1)
    B, K, V = 64, 3, 257
    p = process_logits(make_logits(g, (B * (K + 1), V), style), params).view(B, K + 1, V)
    q = process_logits(make_logits(g, (B * K, V), style), params).view(B, K, V)
    gens = make_generators(5, B)
    drafts = torch.randint(0, V, (B, K), generator=g)
    nd = torch.randint(0, K + 1, (B,), generator=g)
    for dp in (q, None):
        out, n = verify(p, drafts, dp, nd, draw_uniforms(gens, K), draw_exponentials(gens, V))
        emitted = out[torch.arange(B), n - 1]
        assert bool(((emitted >= 0) & (emitted < V)).all())
        assert bool((p[torch.arange(B), n - 1, emitted] > 0).all())


def test_strict_threshold_and_zero_probability():
    p = torch.tensor([[[0.5, 0.5, 0.0], [0.2, 0.3, 0.5]]])
    q = torch.tensor([[[0.25, 0.25, 0.5]]])
    E = torch.ones(1, 3)
    one = torch.ones(1, dtype=torch.int64)
    # argmax mode: ratio = p(x) = 0.5; u = 0.5 rejects, u just below accepts
    below = torch.tensor([[math.nextafter(0.5, 0.0)]], dtype=torch.float64)
    assert int(verify(p, torch.tensor([[0]]), None, one, below, E)[1][0]) == 2
    assert int(verify(p, torch.tensor([[0]]), None, one, torch.tensor([[0.5]], dtype=torch.float64), E)[1][0]) == 1
    # p(x) = 0 is never accepted, even with u = 0, in either mode
    zero = torch.zeros(1, 1, dtype=torch.float64)
    for dp in (None, q):
        out, n = verify(p, torch.tensor([[2]]), dp, one, zero, E)
        assert int(n[0]) == 1 and int(out[0, 0]) != 2


def test_out_of_range_draft_is_rejected():
    p = torch.full((1, 2, 4), 0.25)
    for bad in (-1, 4, 1000):
        out, n = verify(
            p, torch.tensor([[bad]]), None, torch.tensor([1]), torch.zeros(1, 1, dtype=torch.float64), torch.ones(1, 4)
        )
        assert int(n[0]) == 1 and 0 <= int(out[0, 0]) < 4


def test_empty_residual_falls_back_to_p():
    """q >= p everywhere (unnormalised inputs) gives ratio < 1 but (p - q)^+ = 0: the token comes from p."""
    p = torch.tensor([[[0.1, 0.6, 0.3], [1 / 3, 1 / 3, 1 / 3]]])
    q = torch.tensor([[[0.2, 0.9, 0.9]]])
    E = torch.tensor([[1.0, 0.5, 2.0]])
    out, n = verify(p, torch.tensor([[1]]), q, torch.tensor([1]), torch.tensor([[0.99]], dtype=torch.float64), E)
    assert int(n[0]) == 1 and int(out[0, 0]) == int(sample(p[:, 0], E)[0]) == 1


def test_only_first_rejection_matters():
    """u after the first rejection and drafts beyond num_drafts do not change the output."""
    g = torch.Generator().manual_seed(3)
    p = torch.softmax(torch.randn(1, 4, 6, generator=g), -1)
    drafts = torch.tensor([[1, 2, 3]])
    u = torch.tensor([[0.0, 0.999999, 0.5]], dtype=torch.float64)  # accept, reject (ratio < 0.999999), ...
    E = draw_exponentials(make_generators(0, 1), 6)
    base = verify(p, drafts, None, torch.tensor([3]), u, E)
    assert int(base[1][0]) == 2
    u2 = u.clone()
    u2[0, 2] = 0.0
    assert torch.equal(verify(p, drafts, None, torch.tensor([3]), u2, E)[0], base[0])
    # num_drafts = 1 ignores draft 2 and 3 entirely: bonus from row 1
    out, n = verify(p, drafts, None, torch.tensor([1]), u, E)
    assert int(n[0]) == 2 and int(out[0, 1]) == int(sample(p[:, 1], E)[0])


# ---------------------------------------------------------------------------------------------------------
# 4. Monte Carlo: verify's first token at a fixed seed (chi-square, significance level 0.001).
# ---------------------------------------------------------------------------------------------------------

CHI2_999 = {3: 16.266, 4: 18.467}  # 0.999 quantiles of chi-square with 3 and 4 degrees of freedom


@pytest.mark.parametrize("mode", ["sample", "argmax"])
def test_verify_first_token_monte_carlo(mode):
    B, K, V = 40_000, 2, 5
    g = torch.Generator().manual_seed(11)
    params = SamplingParams(0.9, top_k=4)
    p = process_logits(torch.randn(K + 1, V, generator=g) * 2, params)
    q = process_logits(torch.randn(K, V, generator=g) * 2, params)
    r = torch.Generator().manual_seed(123)  # one stream is enough here: rows are i.i.d.
    exp = lambda *shape: torch.empty(shape, dtype=torch.float64).exponential_(generator=r).float()
    if mode == "sample":
        drafts = torch.stack([sample(q[j].expand(B, V), exp(B, V)) for j in range(K)], dim=1)
    else:
        drafts = q.argmax(-1).repeat(B, 1)
    uniforms = torch.rand(B, K, dtype=torch.float64, generator=r)
    dp = q.expand(B, K, V) if mode == "sample" else None
    out, _ = verify(p.expand(B, K + 1, V), drafts, dp, torch.full((B,), K), uniforms, exp(B, V))
    counts = torch.bincount(out[:, 0], minlength=V).double()
    support = p[0] > 0
    assert counts[~support].sum() == 0
    expected = B * p[0, support].double()
    chi2 = float(((counts[support] - expected) ** 2 / expected).sum())
    assert chi2 < CHI2_999[int(support.sum()) - 1]


# ---------------------------------------------------------------------------------------------------------
# 5. Greedy verification.
# ---------------------------------------------------------------------------------------------------------


def greedy_logits(argmaxes, V=6):
    x = torch.zeros(1, len(argmaxes), V)
    x[0, torch.arange(len(argmaxes)), torch.tensor(argmaxes)] = 1.0
    return x


def test_verify_greedy_cases():
    logits = greedy_logits([2, 4, 1, 5])  # the target's greedy continuation is 2 4 1, then 5
    cases = [  # (drafts, num_drafts) -> expected output
        ([2, 4, 1], 3, [2, 4, 1, 5]),  # all accepted + bonus
        ([2, 4, 0], 3, [2, 4, 1, -1]),  # correction at the mismatch
        ([3, 4, 1], 3, [2, -1, -1, -1]),  # first draft wrong
        ([2, 4, 1], 1, [2, 4, -1, -1]),  # only one valid draft: bonus from row 1
        ([2, 4, 1], 0, [2, -1, -1, -1]),  # no drafts: plain greedy step
    ]
    for drafts, nd, expected in cases:
        out, n = verify_greedy(logits, torch.tensor([drafts]), torch.tensor([nd]))
        assert out[0].tolist() == expected and int(n[0]) == sum(e >= 0 for e in expected)


def test_verify_greedy_ties_take_lowest_id():
    logits = torch.tensor([[[1.0, 3.0, 3.0], [0.0, 0.0, 0.0]]])
    out, n = verify_greedy(logits, torch.tensor([[2]]), torch.tensor([1]))
    assert out[0].tolist() == [1, -1] and int(n[0]) == 1
    out, n = verify_greedy(logits, torch.tensor([[1]]), torch.tensor([1]))
    assert out[0].tolist() == [1, 0]


@settings(max_examples=100, deadline=None)
@given(B=st.integers(1, 4), K=st.integers(0, 4), V=st.integers(2, 5), seed=st.integers(0, 2**31))
def test_verify_greedy_matches_loop(B, K, V, seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randint(0, 3, (B, K + 1, V), generator=g).float()  # many ties
    top = logits.argmax(-1)
    drafts = torch.where(torch.rand(B, K, generator=g) < 0.7, top[:, :K], torch.randint(0, V, (B, K), generator=g))
    nd = torch.randint(0, K + 1, (B,), generator=g)
    out, n = verify_greedy(logits, drafts, nd)
    for b in range(B):
        j = 0
        while j < int(nd[b]) and int(drafts[b, j]) == int(top[b, j]):
            j += 1
        assert out[b].tolist() == drafts[b, :j].tolist() + [int(top[b, j])] + [-1] * (K - j)
        assert int(n[b]) == j + 1


def test_verify_greedy_equals_verify_on_one_hot_probs():
    """With T = 0, process_logits is one-hot and the stochastic rules reduce to greedy verification."""
    g = torch.Generator().manual_seed(4)
    B, K, V = 8, 3, 7
    logits = torch.randn(B, K + 1, V, generator=g)
    p = process_logits(logits.view(-1, V), SamplingParams(0.0)).view(B, K + 1, V)
    drafts = torch.where(
        torch.rand(B, K, generator=g) < 0.6, logits[:, :K].argmax(-1), torch.randint(0, V, (B, K), generator=g)
    )
    nd = torch.full((B,), K)
    gens = make_generators(0, B)
    expected = verify_greedy(logits, drafts, nd)
    for dp in (None, p[:, :K]):
        got = verify(p, drafts, dp, nd, draw_uniforms(gens, K), draw_exponentials(gens, V))
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
