"""Exact enumeration: the speculative algorithm's output distribution over whole sequences IS the target's.

On a 5-token vocabulary with context-dependent toy models (tests/support/toy_models.py) we compute, in float64,
the probability of every n-token output of the full algorithm: round after round, draft k tokens from the
drafter, verify them against the target rows conditioned on the drafts, emit the accepted prefix plus one
token, continue from the new prefix until >= n tokens, truncate to n. Every draft, accept/reject and
emitted-token branch is summed exactly (integrating u ~ U[0,1) gives P(accept) = min(1, ratio); the
exponential race picks y with probability resid(y) / sum(resid)). The result must equal the target's own
sequence probability prod_t p(y_t | prefix) to 1e-9.

The branch probabilities come from minimtp's own rule functions (process_logits, acceptance_ratio,
acceptance_probability, residual_sample, residual_argmax, residual_or_target), called on float64 tensors:
the same functions `verify` calls on float32 ones (tests/test_speculative.py checks verify against them).

The same harness must DETECT the classic bugs (docs: concepts/speculative-decoding, "Three rules that look right and
are not"):
  (a) transformers: argmax drafts verified as if sampled from q (accept min(1, p/q), residual (p - q)^+);
  (b) token matching: draw t ~ p, accept iff t == draft, and on a mismatch sample the correction again;
  (c) sample mode with the draft drawn from the raw drafter softmax while the ratio uses the processed q';
  (d) xllm (xLLM PR #2175): residual with q subtracted only at the drafted token.
It also shows that faithful token matching (emit the mismatching t itself) is exact - just slow.
"""

from __future__ import annotations

import itertools
from collections import defaultdict

import pytest
import torch
from support.enumeration import Rule, accept_onehot, accept_ratio, recover_argmax, recover_sample, round_outcomes
from support.toy_models import make_pair

from minimtp.sampling import SamplingParams

V, N_TOKENS, PROMPT = 5, 3, (1, 3)
TARGET, DRAFTER = make_pair(V, seed=7)

SETTINGS = {
    "T1": SamplingParams(temperature=1.0),
    "T0.7": SamplingParams(temperature=0.7),
    "topk2": SamplingParams(temperature=1.0, top_k=2),
    "topp0.8": SamplingParams(temperature=1.0, top_p=0.8),
    "minp0.3": SamplingParams(temperature=1.0, min_p=0.3),
    "T0.8-k3-p0.9-m0.1": SamplingParams(temperature=0.8, top_k=3, top_p=0.9, min_p=0.1),
    "T1.5-k4-m0.2": SamplingParams(temperature=1.5, top_k=4, min_p=0.2),
}


# ---------------------------------------------------------------------------------------------------------
# A rule = how drafts are proposed + P(accept) + the distribution emitted on rejection (support/enumeration.py).
# ---------------------------------------------------------------------------------------------------------


def _sampled_from(q_of):
    def proposals(ctx, params):
        q = q_of(ctx, params)
        return [(x, float(q[x]), DRAFTER.probs(ctx, params)) for x in range(V) if q[x] > 0]

    return proposals


def _argmax_draft(ctx, params):
    return [(int(DRAFTER.logits(ctx).argmax()), 1.0, None)]


# The two exact rules, as minimtp's verify implements them.
SAMPLE = Rule(_sampled_from(DRAFTER.probs), accept_ratio, recover_sample)
ARGMAX = Rule(_argmax_draft, accept_onehot, recover_argmax)

# (a) transformers: argmax drafts, but verified with the raw drafter softmax q as if x ~ q.
_raw_q = lambda ctx: torch.softmax(DRAFTER.logits(ctx), -1)
BUG_HF = Rule(
    lambda ctx, params: [(int(DRAFTER.logits(ctx).argmax()), 1.0, _raw_q(ctx))],
    accept_ratio,
    recover_sample,
)
# (b) token matching: t ~ p, accept iff t == x (probability p(x)); on mismatch sample a fresh token from p.
BUG_MATCH_RESAMPLE = Rule(_sampled_from(DRAFTER.probs), accept_onehot, lambda p, q, x: p)
# faithful token matching: the mismatching t itself is emitted, i.e. t ~ p conditioned on t != x. Exact.
MATCH_FAITHFUL = Rule(_sampled_from(DRAFTER.probs), accept_onehot, recover_argmax)
# (c) sample mode, drafts drawn from the unprocessed drafter softmax, verified against the processed q'.
BUG_RAW_DRAFT = Rule(_sampled_from(lambda ctx, params: _raw_q(ctx)), accept_ratio, recover_sample)
# (d) xllm: the residual subtracts q only at the drafted token: p with p(x) -> (p(x) - q(x))^+.
BUG_XLLM = Rule(
    _sampled_from(DRAFTER.probs),
    accept_ratio,
    lambda p, q, x: torch.where(torch.arange(V) == x, (p - q).clamp_min(0), p),
)


# ---------------------------------------------------------------------------------------------------------
# The enumeration, round after round (one round: support/enumeration.py).
# ---------------------------------------------------------------------------------------------------------


def speculative_distribution(k: int, rule: Rule, params: SamplingParams, n: int = N_TOKENS) -> dict:
    """{n-token output: probability} of the whole speculative algorithm, summed over every path."""
    final: dict[tuple, float] = defaultdict(float)
    frontier = {(): 1.0}
    while frontier:
        nxt: dict[tuple, float] = defaultdict(float)
        for gen, prob in frontier.items():
            for chunk, pc in round_outcomes(PROMPT + gen, k, rule, params, TARGET.probs).items():
                seq = gen + chunk
                (final if len(seq) >= n else nxt)[seq[:n]] += prob * pc
        frontier = nxt
    return final


def target_distribution(params: SamplingParams, n: int = N_TOKENS) -> dict:
    """{n-token sequence: prod_t p(y_t | prompt, y_<t)} - plain sampling from the processed target."""
    out = {}
    for seq in itertools.product(range(V), repeat=n):
        prob = 1.0
        for t in range(n):
            prob *= float(TARGET.probs(PROMPT + seq[:t], params)[seq[t]])
        out[seq] = prob
    return out


def max_abs_diff(a: dict, b: dict) -> float:
    return max(abs(a.get(s, 0.0) - b.get(s, 0.0)) for s in set(a) | set(b))


# ---------------------------------------------------------------------------------------------------------
# Tests.
# ---------------------------------------------------------------------------------------------------------


def test_toy_models_are_context_dependent():
    rows = {tuple(TARGET.probs(PROMPT + (t,), SETTINGS["T1"]).tolist()) for t in range(V)}
    assert len(rows) == V
    assert any(bool(torch.isinf(TARGET.logits(PROMPT + s)).any()) for s in itertools.product(range(V), repeat=2))


@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("mode", ["sample", "argmax"])
def test_speculative_equals_target_exactly(mode, k, setting):
    params = SETTINGS[setting]
    spec = speculative_distribution(k, SAMPLE if mode == "sample" else ARGMAX, params)
    target = target_distribution(params)
    assert abs(sum(spec.values()) - 1.0) < 1e-12
    assert max_abs_diff(spec, target) <= 1e-9


@pytest.mark.parametrize("mode", ["sample", "argmax"])
def test_longer_sequences_exact(mode):
    params = SETTINGS["T0.8-k3-p0.9-m0.1"]
    spec = speculative_distribution(2, SAMPLE if mode == "sample" else ARGMAX, params, n=4)
    assert max_abs_diff(spec, target_distribution(params, n=4)) <= 1e-9


@pytest.mark.parametrize(
    "rule, setting",
    [
        (BUG_HF, "T1"),
        (BUG_HF, "topk2"),
        (BUG_MATCH_RESAMPLE, "T1"),
        (BUG_MATCH_RESAMPLE, "T0.7"),
        (BUG_RAW_DRAFT, "T0.7"),
        (BUG_RAW_DRAFT, "T0.8-k3-p0.9-m0.1"),
        (BUG_XLLM, "T1"),
    ],
    ids=["a-hf-T1", "a-hf-topk", "b-match-T1", "b-match-T0.7", "c-raw-q-T0.7", "c-raw-q-combo", "d-xllm"],
)
@pytest.mark.parametrize("k", [1, 3])
def test_harness_detects_classic_bugs(rule, setting, k):
    params = SETTINGS[setting]
    spec = speculative_distribution(k, rule, params)
    assert abs(sum(spec.values()) - 1.0) < 1e-12  # still a distribution, just the wrong one
    assert max_abs_diff(spec, target_distribution(params)) > 1e-2  # measured 0.04-0.26; tolerance is 1e-9


def test_faithful_token_matching_is_exact_but_accepts_less():
    """Drawing t ~ p and emitting t (accepting iff t == draft) outputs t ~ p at every step: exact. It only
    accepts with probability sum_x q(x) p(x) <= sum_x min(p(x), q(x)). The bias reported for token matching
    comes from re-sampling the correction (bug b) or from matching the argmax, not from the match itself."""
    params = SETTINGS["T1"]
    assert max_abs_diff(speculative_distribution(2, MATCH_FAITHFUL, params), target_distribution(params)) <= 1e-9
    p, q = TARGET.probs(PROMPT, params), DRAFTER.probs(PROMPT, params)
    assert float((p * q).sum()) < float(torch.minimum(p, q).sum())


def test_greedy_setting_is_exact_too():
    """temperature 0: process_logits is the one-hot argmax, both rules reduce to greedy verification."""
    params = SamplingParams(temperature=0.0)
    target = target_distribution(params)
    assert max(target.values()) == 1.0
    for rule in (SAMPLE, ARGMAX):
        assert max_abs_diff(speculative_distribution(2, rule, params), target) <= 1e-12


def test_toy_drafter_is_imperfect():
    """Sanity: acceptance is neither 0 nor 1, so both branches are exercised."""
    params = SETTINGS["T1"]
    acc = [
        float(torch.minimum(TARGET.probs(PROMPT + s, params), DRAFTER.probs(PROMPT + s, params)).sum())
        for s in itertools.product(range(V), repeat=2)
    ]
    assert 0.2 < min(acc) and max(acc) < 0.999
