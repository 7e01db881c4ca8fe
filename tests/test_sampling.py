"""Tests of minimtp/sampling.py: processors against hand-computed cases, the documented order, combinations,
the exponential race, seeded generators, and refusing bad input."""

from __future__ import annotations

import math
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minimtp.errors import GenerationError
from minimtp.sampling import (
    SamplingParams,
    apply_min_p,
    apply_temperature,
    apply_top_k,
    apply_top_p,
    draw_exponentials,
    draw_uniforms,
    make_generators,
    process_logits,
    sample,
)

P4 = [0.5, 0.3, 0.15, 0.05]  # a hand-friendly distribution


def logits_of(probs) -> torch.Tensor:
    return torch.tensor([probs], dtype=torch.float64).log()


def proc(x, **kw) -> torch.Tensor:
    kw.setdefault("temperature", 1.0)
    return process_logits(x, SamplingParams(**kw))


def renorm(values) -> torch.Tensor:
    t = torch.tensor([values], dtype=torch.float64)
    return t / t.sum()


def close(a, b, tol=1e-12) -> bool:
    return torch.allclose(a.double(), b.double(), rtol=0, atol=tol)


# ---------------------------------------------------------------------------------------------------------
# Each processor against a hand-computed case.
# ---------------------------------------------------------------------------------------------------------


def test_temperature():
    # logits [1, 2, 3] / 0.5 = [2, 4, 6] -> softmax = [e^-4, e^-2, 1] / (e^-4 + e^-2 + 1)
    expected = renorm([math.exp(-4), math.exp(-2), 1.0])
    assert close(proc(torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.float64), temperature=0.5), expected)
    # float32 path: same to float32 precision, and the output dtype is float32
    out = proc(torch.tensor([[1.0, 2.0, 3.0]]), temperature=0.5)
    assert out.dtype == torch.float32 and close(out, expected, 1e-7)


def test_top_k_keeps_ties():
    x = torch.tensor([[1.0, 3.0, 3.0, 2.0]], dtype=torch.float64)
    assert close(proc(x, top_k=1), renorm([0, 1, 1, 0]))  # the 2nd 3.0 ties with the 1st: kept
    assert close(proc(x, top_k=2), renorm([0, 1, 1, 0]))
    assert close(proc(x, top_k=3), renorm([0, math.e, math.e, 1]))
    y = torch.tensor([[1.0, 2.0, 2.0, 2.0, 0.0]], dtype=torch.float64)
    assert close(proc(y, top_k=2), renorm([0, 1, 1, 1, 0]))  # k-th value 2.0 is tied three ways


def test_top_p():
    x = logits_of(P4)
    assert close(proc(x, top_p=0.45), renorm([1, 0, 0, 0]))  # 0.5 >= 0.45
    assert close(proc(x, top_p=0.7), renorm([0.5, 0.3, 0, 0]))  # 0.5 < 0.7 <= 0.8
    assert close(proc(x, top_p=0.81), renorm([0.5, 0.3, 0.15, 0]))  # 0.8 < 0.81 <= 0.95
    assert close(proc(x, top_p=1e-9), renorm([1, 0, 0, 0]))  # always at least one token
    # the order of tokens does not matter
    perm = [2, 0, 3, 1]
    assert close(proc(x[:, perm], top_p=0.7), renorm([0.5, 0.3, 0, 0])[:, perm])


def test_top_p_ties_broken_by_token_id():
    """Four equal tokens, top_p = 0.5: the smallest set with mass >= 0.5 has two tokens, the lowest ids."""
    assert close(proc(torch.zeros(1, 4, dtype=torch.float64), top_p=0.5), renorm([1, 1, 0, 0]))


def test_min_p():
    x = logits_of(P4)
    assert close(proc(x, min_p=0.25), renorm([0.5, 0.3, 0.15, 0]))  # threshold 0.125
    assert close(proc(x, min_p=0.55), renorm([0.5, 0.3, 0, 0]))  # threshold 0.275
    assert close(proc(x, min_p=1.0), renorm([1, 0, 0, 0]))
    assert close(proc(torch.tensor([[2.0, 2.0, 1.0]], dtype=torch.float64), min_p=1.0), renorm([1, 1, 0]))


def test_greedy_is_one_hot_argmax_lowest_id_on_ties():
    x = torch.tensor([[0.0, 5.0, 5.0, 1.0], [9.0, 0.0, 0.0, 0.0]])
    out = process_logits(x, SamplingParams(temperature=0.0, top_k=3, top_p=0.5))
    assert torch.equal(out, torch.tensor([[0.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]]))
    assert SamplingParams().is_greedy and not SamplingParams(temperature=0.5).is_greedy


# ---------------------------------------------------------------------------------------------------------
# The documented order: temperature -> top-k -> top-p -> min-p -> renormalise.
# ---------------------------------------------------------------------------------------------------------


def test_temperature_comes_before_top_p_and_min_p():
    x = logits_of(P4)
    # T = 2: p ~ sqrt(P4) = [.7071, .5477, .3873, .2236] / 1.8657 = [.379, .294, .208, .120]
    flat = renorm([math.sqrt(v) for v in P4])
    assert close(proc(x, temperature=2.0, top_p=0.7), flat * torch.tensor([[1, 1, 1, 0]]) / flat[0, :3].sum())
    # min-p 0.5 on the T = 2 distribution keeps p >= 0.354: three tokens (on T = 1 only two would survive)
    assert close(proc(x, temperature=2.0, min_p=0.5), renorm([math.sqrt(v) for v in P4[:3]] + [0]))


def test_top_k_comes_before_top_p():
    # top-k 2 -> [4/7, 3/7]; then top-p 0.5 keeps only token 0 (4/7 >= 0.5).
    # (top-p first would keep {0.4, 0.3} and top-k 2 would keep both.)
    assert close(proc(logits_of([0.4, 0.3, 0.2, 0.1]), top_k=2, top_p=0.5), renorm([1, 0, 0, 0]))


def test_top_p_comes_before_min_p():
    # top-p 0.82 on [.45, .35, .14, .06] keeps 3 (0.80 < 0.82); min-p 0.2 (threshold 0.09) keeps those 3.
    # (min-p first renormalises to [.479, .372, .149] and top-p 0.82 would then keep only 2.)
    out = proc(logits_of([0.45, 0.35, 0.14, 0.06]), top_p=0.82, min_p=0.2)
    assert close(out, renorm([0.45, 0.35, 0.14, 0]))


def test_full_combination_by_hand():
    # T = 0.5: p ~ P4^2 = [.25, .09, .0225, .0025] / .365 = [.685, .247, .0616, .0068]
    # top-k 3 -> [.25, .09, .0225] / .3625 = [.690, .248, .062]; top-p 0.9 -> keep 2 (0.938 >= 0.9)
    # min-p 0.3 -> threshold 0.3 * 0.735 = 0.22 on [.735, .265]: keeps both.
    out = proc(logits_of(P4), temperature=0.5, top_k=3, top_p=0.9, min_p=0.3)
    assert close(out, renorm([0.25, 0.09, 0, 0]))
    # a stronger min-p removes the second token
    assert close(proc(logits_of(P4), temperature=0.5, top_k=3, top_p=0.9, min_p=0.4), renorm([1, 0, 0, 0]))


def test_off_values_are_identity():
    g = torch.Generator().manual_seed(0)
    x = 3 * torch.randn(6, 50, generator=g)
    base = proc(x, temperature=0.8)
    for kw in [dict(top_p=1.0), dict(min_p=0.0), dict(top_k=0), dict(top_k=50), dict(top_k=1000)]:
        assert torch.equal(proc(x, temperature=0.8, **kw), base), kw
    assert torch.equal(proc(x, temperature=0.8, top_p=1.0, min_p=0.0, top_k=0), base)


@settings(max_examples=200, deadline=None)
@given(
    V=st.integers(1, 40),
    seed=st.integers(0, 2**31),
    T=st.floats(0.05, 5.0),
    top_k=st.none() | st.integers(0, 45),
    top_p=st.none() | st.floats(0.01, 1.0),
    min_p=st.none() | st.floats(0.0, 1.0),
)
def test_combination_properties(V, seed, T, top_k, top_p, min_p):
    """Any combination: a distribution; every processor only removes tokens (support within each one's own
    support); the kept tokens keep their tempered relative weights; the most likely token is always kept."""
    g = torch.Generator().manual_seed(seed)
    x = torch.round(2 * torch.randn(3, V, generator=g, dtype=torch.float64)) / 2  # ties are common
    out = proc(x, temperature=T, top_k=top_k, top_p=top_p, min_p=min_p)
    assert close(out.sum(-1), torch.ones(3), 1e-12) and bool((out >= 0).all())
    for kw in [dict(top_k=top_k), dict(top_p=top_p), dict(min_p=min_p)]:
        assert not bool(((out > 0) & (proc(x, temperature=T, **kw) == 0)).any())
    tempered = torch.softmax(x / T, -1)
    kept = out > 0
    assert close(out, torch.where(kept, tempered, 0) / (tempered * kept).sum(-1, keepdim=True), 1e-12)
    assert bool(kept.gather(-1, x.argmax(-1, keepdim=True)).all())
    if top_k:
        kth = torch.topk(x, min(top_k, V), -1).values[:, -1:]
        assert bool((kept.sum(-1) <= (x >= kth).sum(-1)).all())


def test_infinities():
    out = proc(torch.tensor([[1.0, -math.inf, 2.0, -math.inf]]), temperature=0.7)
    assert out[0, 1] == 0 and out[0, 3] == 0 and close(out.sum(), torch.tensor(1.0), 1e-6)
    # +inf logits share the mass; the finite ones get nothing
    assert torch.equal(proc(torch.tensor([[1.0, math.inf, 3.0, math.inf]])), torch.tensor([[0, 0.5, 0, 0.5]]))
    # extreme values and tiny temperatures never produce NaN
    x = torch.tensor([[1e4, -1e4, 1e4 - 1, 0.0]])
    for T in (1e-30, 1e-3, 1.0, 1e6):
        out = proc(x, temperature=T)
        assert not bool(out.isnan().any()) and close(out.sum(), torch.tensor(1.0), 1e-6)
    assert torch.equal(proc(x, temperature=1e-30), torch.tensor([[1.0, 0, 0, 0]]))


def test_bf16_logits_are_upcast():
    x = torch.randn(4, 33).to(torch.bfloat16)
    out = proc(x, temperature=0.7, top_k=5)
    assert out.dtype == torch.float32 and torch.equal(out, proc(x.float(), temperature=0.7, top_k=5))


# ---------------------------------------------------------------------------------------------------------
# The exponential race and the generators.
# ---------------------------------------------------------------------------------------------------------


def test_sample_frequencies_chi_square():
    """N = 200,000 draws at a fixed seed; chi-square over the 4 supported tokens (3 degrees of freedom)
    against the 0.999 quantile 16.266, i.e. significance level 0.001. The zero-probability token never wins."""
    probs = torch.tensor([0.1, 0.2, 0.0, 0.3, 0.4])
    N = 200_000
    g = torch.Generator().manual_seed(2024)
    noise = torch.empty(N, 5, dtype=torch.float64).exponential_(generator=g).float()
    counts = torch.bincount(sample(probs.expand(N, 5), noise), minlength=5).double()
    assert counts[2] == 0
    expected = N * probs[[0, 1, 3, 4]].double()
    assert float(((counts[[0, 1, 3, 4]] - expected) ** 2 / expected).sum()) < 16.266


def test_sample_unnormalised_and_tiny_masses():
    noise = torch.tensor([[1.0, 1e-30, 50.0, 1.0]])
    # scaling probs does not change the winner; zero entries cannot win even against a tiny noise
    assert int(sample(torch.tensor([[0.2, 0.0, 0.5, 0.3]]), noise)[0]) == 3
    assert int(sample(torch.tensor([[2.0, 0.0, 5.0, 3.0]]), noise)[0]) == 3
    # all ratios underflow to 0: still a supported token, never token 1 (p = 0)
    t = int(sample(torch.tensor([[1e-45, 0.0, 1e-45, 0.0]]), torch.tensor([[3e38, 1.0, 3e38, 1.0]]))[0])
    assert t in (0, 2)


def test_draw_shapes_dtypes_ranges():
    gens = make_generators(0, 3)
    u = draw_uniforms(gens, 5)
    e = draw_exponentials(gens, 1000)
    assert u.shape == (3, 5) and u.dtype == torch.float64 and bool(((u >= 0) & (u < 1)).all())
    assert e.shape == (3, 1000) and e.dtype == torch.float32 and bool(((e > 0) & e.isfinite()).all())
    assert draw_uniforms(gens, 0).shape == (3, 0)
    assert draw_uniforms([], 4).shape == (0, 4) and draw_exponentials([], 7).shape == (0, 7)


def test_seeded_reproducibility():
    def draws(seed):
        gens = make_generators(seed, 2)
        return draw_uniforms(gens, 3), draw_exponentials(gens, 10)

    a, b, c = draws(7), draws(7), draws(8)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    # seed None: nondeterministic seeds, so two calls differ
    assert not torch.equal(draw_uniforms(make_generators(None, 1), 4), draw_uniforms(make_generators(None, 1), 4))


def test_per_sequence_generators_make_batches_independent():
    """Sequence i of a batch with per-prompt seeds [s_0, s_1, ...] draws exactly what a lone sequence seeded s_i
    draws, so its tokens do not depend on which other sequences share the batch."""
    g = torch.Generator().manual_seed(0)
    probs = process_logits(torch.randn(3, 40, generator=g), SamplingParams(temperature=1.0))
    batch = make_generators([100, 7, 100], 3)
    tokens = sample(probs, draw_exponentials(batch, 40))
    u_batch = draw_uniforms(batch, 4)
    for i, s in enumerate([100, 7, 100]):
        alone = make_generators(s, 1)
        assert int(sample(probs[i : i + 1], draw_exponentials(alone, 40))[0]) == int(tokens[i])
        assert torch.equal(draw_uniforms(alone, 4)[0], u_batch[i])
    # a batch with a different composition: seed 7 second, then first
    other = make_generators([5, 7], 2)
    assert int(sample(probs[1:2].expand(2, 40), draw_exponentials(other, 40))[1]) == int(tokens[1])


def test_seeds_give_independent_streams():
    """seed s, sequence i and seed s + 1, sequence i - 1 used to be the same stream (seed + i); now every
    (seed, index) pair has its own. And a seed list must have one seed per prompt, each an integer >= 0."""
    streams = {}
    for seed in range(4):
        for i, u in enumerate(draw_uniforms(make_generators(seed, 4), 8)):
            streams[(seed, i)] = u
    keys = list(streams)
    for a in range(len(keys)):
        for b in range(a + 1, len(keys)):
            assert not torch.equal(streams[keys[a]], streams[keys[b]]), (keys[a], keys[b])
    for bad, msg in (([1, 2], "2 seeds for 3 prompts"), (-1, "seed=-1"), ([0, 1.5, 2], "seed=1.5")):
        with pytest.raises(GenerationError, match=re.escape(msg)):
            make_generators(bad, 3)


# ---------------------------------------------------------------------------------------------------------
# Bad input: one-line GenerationError naming the field and value.
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw, field",
    [
        (dict(temperature=-0.5), "temperature=-0.5"),
        (dict(temperature=math.nan), "temperature=nan"),
        (dict(temperature=math.inf), "temperature=inf"),
        (dict(temperature="hot"), "temperature='hot'"),
        (dict(temperature=1.0, top_p=0.0), "top_p=0.0"),
        (dict(temperature=1.0, top_p=1.5), "top_p=1.5"),
        (dict(temperature=1.0, top_p=-0.1), "top_p=-0.1"),
        (dict(temperature=1.0, top_p=math.nan), "top_p=nan"),
        (dict(temperature=1.0, top_k=-1), "top_k=-1"),
        (dict(temperature=1.0, top_k=2.5), "top_k=2.5"),
        (dict(temperature=1.0, top_k=True), "top_k=True"),
        (dict(temperature=1.0, min_p=-0.1), "min_p=-0.1"),
        (dict(temperature=1.0, min_p=1.1), "min_p=1.1"),
    ],
)
def test_bad_params(kw, field):
    params = SamplingParams(**kw)
    for call in (params.validate, lambda: process_logits(torch.zeros(1, 3), params)):
        with pytest.raises(GenerationError) as err:
            call()
        msg = str(err.value)
        assert msg.startswith(field) and "expected" in msg and "\n" not in msg


def test_valid_edges_accepted():
    for kw in [dict(), dict(temperature=1e-6, top_p=1.0, min_p=0.0, top_k=0), dict(temperature=2, min_p=1)]:
        assert SamplingParams(**kw).validate() == SamplingParams(**kw)


def test_nan_and_all_neg_inf_logits_raise():
    x = torch.zeros(3, 5)
    x[1, 3] = math.nan
    for params in (SamplingParams(temperature=1.0), SamplingParams()):
        with pytest.raises(GenerationError, match=r"^logits row 1 has NaN at token 3"):
            process_logits(x, params)
    with pytest.raises(GenerationError, match=r"^logits row 0 is -inf for every token"):
        process_logits(torch.full((2, 4), -math.inf), SamplingParams(temperature=1.0))


@settings(max_examples=100, deadline=None)
@given(
    seed=st.integers(0, 2**31),
    top_k=st.integers(1, 12),
    top_p=st.none() | st.floats(0.01, 1.0),
    min_p=st.none() | st.floats(0.0, 1.0),
)
def test_top_k_fast_path_equals_full_pipeline(seed, top_k, top_p, min_p):
    """With top_k set, top-p / min-p run on the compact survivor slice; same result as on all V logits."""
    g = torch.Generator().manual_seed(seed)
    x = torch.round(2 * torch.randn(4, 30, generator=g, dtype=torch.float64)) / 2  # ties at the k-th value
    x[0, 5] = -math.inf
    full = apply_top_k(apply_temperature(x, 0.9), top_k)
    if top_p is not None:
        full = apply_top_p(full, top_p)
    if min_p is not None:
        full = apply_min_p(full, min_p)
    out = proc(x, temperature=0.9, top_k=top_k, top_p=top_p, min_p=min_p)
    assert torch.equal(out > 0, torch.softmax(full, -1) > 0)
    assert close(out, torch.softmax(full, -1), 1e-12)
