"""Token logprobs (``GenerationSettings.logprobs``, sampling.token_logprobs): each emitted token's log-probability
under p, the processed distribution it was drawn from, and the top alternatives. Under speculative decoding they
are read off the target's verification rows, so a seeded speculative run reports plain decoding's numbers."""

from __future__ import annotations

import math

import pytest
import torch
from support.common import default_engine

from minimtp.errors import GenerationError
from minimtp.sampling import SamplingParams, process_logits, token_logprobs

PROMPT = "def fibonacci(n):\n    "
CASES = [
    dict(temperature=0.0),
    dict(temperature=0.8, top_k=20, seed=3),
    dict(temperature=1.0, top_p=0.9, seed=5, draft_mode="sample"),
    dict(temperature=0.7, repetition_penalty=1.3, seed=7),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_speculative_logprobs_equal_plain_decodings(case):
    e = default_engine()
    ids = e.tokenizer(PROMPT)["input_ids"]
    spec = e.generate([ids], max_new_tokens=24, num_speculative_tokens=4, logprobs=3, **case)
    if case["temperature"] == 0:  # greedy: plain decoding gives the same tokens
        plain = e.generate([ids], max_new_tokens=24, use_assistant=False, logprobs=3, **case)
        assert plain.tokens == spec.tokens
    else:  # sampled: the same random stream is not plain's, so replay spec's tokens one at a time through plain
        plain = None
    [lp] = spec.logprobs
    assert len(lp) == len(spec.tokens[0]) > 0
    for token, (chosen, top) in zip(spec.tokens[0], lp):
        assert len(top) == 3 and top == sorted(top, key=lambda t: -t[1])
        assert chosen <= top[0][1] + 1e-9 and chosen > -9999.0  # the emitted token had p > 0
        if token in dict(top):
            assert math.isclose(dict(top)[token], chosen, abs_tol=1e-12)
    if plain is not None:  # fp32 logits of a 1-row vs a 5-row forward: equal to ~1e-5 (log p of O(1) values)
        for (a, ta), (b, tb) in zip(plain.logprobs[0], lp):
            assert abs(a - b) < 1e-4 and [i for i, _ in ta] == [i for i, _ in tb]
    else:
        # teacher-force spec's tokens: each prefix run plainly for one token gives the same p row
        out = spec.tokens[0]
        for j in (0, len(out) // 2, len(out) - 1):
            one = e.generate([ids + out[:j]], max_new_tokens=1, use_assistant=False, logprobs=3, **case)
            if one.tokens[0] == [out[j]]:
                assert abs(one.logprobs[0][0][0] - lp[j][0]) < 1e-4
            assert [i for i, _ in one.logprobs[0][0][1]] == [i for i, _ in lp[j][1]]


def test_token_logprobs_is_the_log_of_p():
    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    params = SamplingParams(0.7, top_k=5)
    p = process_logits(logits, params)
    tokens = p.argmax(-1).tolist()
    got = token_logprobs(logits, params, tokens, 6)
    for i, (chosen, top) in enumerate(got):
        assert math.isclose(chosen, math.log(p[i, tokens[i]].item()), rel_tol=1e-6)
        assert len(top) == 6 and top[-1][1] == -9999.0  # top_k=5: the sixth has p = 0
    greedy = token_logprobs(logits, SamplingParams(0.0), tokens, 1)  # greedy: reported at temperature 1
    assert math.isclose(greedy[0][0], torch.log_softmax(logits[0], -1)[tokens[0]].item(), rel_tol=1e-5)


def test_logprobs_out_of_range_is_one_line():
    e = default_engine()
    with pytest.raises(GenerationError, match=r"logprobs=21 is invalid: expected an integer in 0..20"):
        e.generate([[2, 3]], max_new_tokens=2, logprobs=21)
