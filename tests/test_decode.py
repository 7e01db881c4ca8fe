"""minimtp.decode.speculative_decode (the round in one screen) emits exactly the batched Engine's tokens: greedy,
and seeded sampling with sampled and argmax drafts, on the three target families (fp32)."""

from __future__ import annotations

import pytest
import torch
from support.untied import PROMPTS

import minimtp
from minimtp.decode import speculative_decode

SETTINGS = {
    "greedy": dict(temperature=0.0),
    "T1 sample": dict(temperature=1.0, draft_mode="sample"),
    "T0.8 top-k argmax": dict(temperature=0.8, top_k=40, draft_mode="argmax"),
    "T1.2 top-p min-p sample": dict(temperature=1.2, top_p=0.9, min_p=0.02, draft_mode="sample"),
}


@pytest.mark.parametrize("family", ["e2b", "moe", "dense"])
@pytest.mark.parametrize("setting", list(SETTINGS))
def test_one_screen_round_equals_engine(untied_pair, family, setting):
    target, assistant = untied_pair(family)
    kw = dict(SETTINGS[setting])
    k, n = 3, 40
    for b, prompt in enumerate(PROMPTS):
        seed = 11 + b
        mine = speculative_decode(target, assistant, prompt, n, k, seed=seed, stop_token_ids=[], **kw)
        eng = minimtp.Engine(target, assistant).generate(
            [prompt], n, num_speculative_tokens=k, seed=seed, stop_token_ids=[], **kw
        )
        assert mine == eng.tokens[0], f"prompt {b}: first difference at {_first_diff(mine, eng.tokens[0])}"
        assert len(mine) == n


def test_one_screen_round_stops_like_the_engine(untied_pair):
    """A stop token inside an accepted block of drafts ends the output there (and is included), as in the Engine."""
    target, assistant = untied_pair("e2b")
    ref = minimtp.Engine(target, assistant).generate([PROMPTS[1]], 30, num_speculative_tokens=4, stop_token_ids=[])
    stop = ref.tokens[0][12]
    mine = speculative_decode(target, assistant, PROMPTS[1], 30, 4, stop_token_ids=[stop])
    eng = minimtp.Engine(target, assistant).generate([PROMPTS[1]], 30, num_speculative_tokens=4, stop_token_ids=[stop])
    assert mine == eng.tokens[0] and mine[-1] == stop and len(mine) <= 13


def _first_diff(a, b):
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def test_different_seeds_differ(untied_pair):
    """The sampled path really samples: two seeds give different outputs (a check that can fail)."""
    target, assistant = untied_pair("dense")
    a = speculative_decode(target, assistant, PROMPTS[0], 30, 3, temperature=1.0, seed=1, stop_token_ids=[])
    b = speculative_decode(target, assistant, PROMPTS[0], 30, 3, temperature=1.0, seed=2, stop_token_ids=[])
    assert a != b
    assert torch.tensor(a).unique().numel() > 5
