"""Exact enumeration with controls: under penalties, grammars, token healing and stop strings, the speculative
algorithm's distribution over whole outputs IS plain decoding's under the same controls.

The same enumeration as tests/test_exact_enumeration.py (one round: tests/support/enumeration.py; every draft,
accept/reject and emitted-token branch summed in float64), on 5-token context-dependent toy models with a real
tokenizer (tests/support/tokenizer.py: "<eos>", "a", "b", "ab", "c"), and with every row - target and drafter -
passed through minimtp's own `Controls` for the tokens before it: row j of a round follows the emitted tokens AND
the drafts d_1..d_j (docs: concepts/controls). The target side is plain decoding: prod_t p(y_t | prompt, y_<t)
with the same controls.

Power: the classic mistake of adjusting every verify row with the history of the round's start (ignoring the drafts
before it, so a penalty or grammar state lags behind) must be detected by the same comparison.
"""

from __future__ import annotations

import functools
import itertools
from collections import defaultdict

import pytest
import torch
from support.enumeration import Rule, accept_onehot, accept_ratio, recover_argmax, recover_sample
from support.enumeration import round_outcomes as enumerate_round
from support.tokenizer import char_tokenizer
from support.toy_models import make_pair

from minimtp.controls import Controls, Penalties, make_controls
from minimtp.controls.grammar import grammar_source
from minimtp.controls.stop_strings import StopStrings
from minimtp.sampling import SamplingParams, process_logits

TOKENS = ["<eos>", "a", "b", "ab", "c"]
V, N_TOKENS, PROMPT = len(TOKENS), 3, (1, 3)
TARGET, DRAFTER = make_pair(V, seed=11)
TOK = char_tokenizer(TOKENS)

PARAMS = {
    "T1": SamplingParams(temperature=1.0),
    "T0.7-k3": SamplingParams(temperature=0.7, top_k=3),
    "T1.2-p0.8": SamplingParams(temperature=1.2, top_p=0.8),
}
CONTROLS = {
    "repetition1.8": dict(penalties=Penalties(repetition=1.8)),
    "presence1": dict(penalties=Penalties(presence=1.0)),
    "frequency0.7": dict(penalties=Penalties(frequency=0.7)),
    "regex": dict(regex="(ab|c)+"),
    "lark": dict(grammar='start: ("a" | "b")* "c"'),
    "regex+repetition": dict(regex="[abc]*c", penalties=Penalties(repetition=1.5, presence=0.5)),
    "healing": dict(token_healing=True),
}


def build(control: str, prompt=PROMPT):
    """(prompt as run, Controls) for a named control; token healing re-spells the prompt's last token "ab"."""
    kw = CONTROLS[control]
    src = grammar_source(regex=kw.get("regex"), grammar=kw.get("grammar"))
    [(run_prompt, ctl, _)] = make_controls([list(prompt)], TOK, V, [0], kw.get("penalties", Penalties()), src,
                                           kw.get("token_healing", False))  # fmt: skip
    return tuple(run_prompt), ctl


def row(lm, prompt: tuple, g: tuple, ctl: Controls, params: SamplingParams, logits=False) -> torch.Tensor:
    """[V] float64: the lm's processed row after prompt + g with the controls of g (or the controlled logits).
    The toy models' bans (-inf) become -4 so that a grammar never leaves a row with no token."""
    x = torch.nan_to_num(lm.logits(prompt + g), neginf=-4.0)[None]
    x = ctl(x, [list(g)])
    return x[0] if logits else process_logits(x, params)[0]


def round_outcomes(prompt, gen, k, mode, params, ctl, lag=False) -> dict[tuple, float]:
    """{emitted chunk: probability} of one round from prompt + gen: tests/test_exact_enumeration.py's enumeration,
    with every target and drafter row passed through the controls. ``lag``: the bug - every verify row adjusted
    with the history of the round's start, not including the drafts before it."""

    def target(c: tuple, params) -> torch.Tensor:
        if lag:  # the row's own logits, the controls of the round's start
            x = ctl(torch.nan_to_num(TARGET.logits(c), neginf=-4.0)[None], [list(gen)])
            return process_logits(x, params)[0]
        return row(TARGET, prompt, c[len(prompt) :], ctl, params)

    def proposals(c: tuple, params):
        g = c[len(prompt) :]
        if mode == "argmax":
            return [(int(row(DRAFTER, prompt, g, ctl, params, logits=True).argmax()), 1.0, None)]
        q = row(DRAFTER, prompt, g, ctl, params)
        return [(x, float(q[x]), q) for x in range(V) if q[x] > 0]

    rule = Rule(proposals, *((accept_ratio, recover_sample) if mode == "sample" else (accept_onehot, recover_argmax)))
    return enumerate_round(prompt + gen, k, rule, params, target)


def speculative_distribution(control, k, mode, params, lag=False, stop=None, n=N_TOKENS) -> dict:
    """{output: probability} of the whole speculative algorithm (n tokens, or fewer when a stop string ends it,
    checked token by token as Engine._emit does, also inside an accepted block)."""
    prompt, ctl = build(control)
    stops = StopStrings(TOK, [stop]) if stop else None
    final: dict[tuple, float] = defaultdict(float)
    frontier = {(): 1.0}
    while frontier:
        nxt: dict[tuple, float] = defaultdict(float)
        for gen, prob in frontier.items():
            for chunk, pc in round_outcomes(prompt, gen, k, mode, params, ctl, lag).items():
                seq, ended = gen, False
                for t in chunk:
                    seq += (t,)
                    if len(seq) == n or (stops and stops.find(stops.text(list(seq)))):
                        ended = True
                        break
                (final if ended else nxt)[seq] += prob * pc
        frontier = nxt
    return final


def target_distribution(control, params, stop=None, n=N_TOKENS) -> dict:
    """{output: probability} of plain decoding with the controls, cut after the token completing a stop string."""
    prompt, ctl = build(control)
    stops = StopStrings(TOK, [stop]) if stop else None
    out: dict[tuple, float] = {}

    def walk(seq: tuple, prob: float):
        if len(seq) == n or (seq and stops and stops.find(stops.text(list(seq)))):
            out[seq] = prob
            return
        p = row(TARGET, prompt, seq, ctl, params)
        for y in range(V):
            if p[y] > 0:
                walk(seq + (y,), prob * float(p[y]))

    walk((), 1.0)
    return out


@functools.cache
def _target(control, setting, stop=None):
    return target_distribution(control, PARAMS[setting], stop)


def max_abs_diff(a: dict, b: dict) -> float:
    return max(abs(a.get(s, 0.0) - b.get(s, 0.0)) for s in set(a) | set(b))


def test_controls_change_the_distribution():
    """Each control really acts on this model (a test that passes with the controls ignored proves nothing)."""
    none = {}
    for seq in itertools.product(range(V), repeat=N_TOKENS):
        prob = 1.0
        for t in range(N_TOKENS):
            prob *= float(row(TARGET, PROMPT, seq[:t], Controls(list(PROMPT)), PARAMS["T1"])[seq[t]])
        none[seq] = prob
    for control in CONTROLS:
        assert abs(sum(_target(control, "T1").values()) - 1) < 1e-12
        assert max_abs_diff(_target(control, "T1"), none) > 0.01, control


@pytest.mark.parametrize("control", list(CONTROLS))
@pytest.mark.parametrize("mode, k, setting", [("sample", 2, "T1"), ("argmax", 2, "T1"), ("sample", 3, "T0.7-k3"),
                                              ("argmax", 1, "T1.2-p0.8")])  # fmt: skip
def test_speculative_equals_plain_exactly(control, mode, k, setting):
    spec = speculative_distribution(control, k, mode, PARAMS[setting])
    assert max_abs_diff(spec, _target(control, setting)) < 1e-9


def test_grammar_outputs_are_in_the_language():
    """Every output with positive probability is a prefix of the regex's language (nothing outside the support)."""
    import re

    for seq, prob in speculative_distribution("regex", 2, "sample", PARAMS["T1"]).items():
        text = TOK.decode(list(seq), skip_special_tokens=False).split("<eos>")[0]
        assert prob > 0 and any(re.fullmatch("(ab|c)+", text + tail) for tail in ("", "c", "ab", "b")), text


@pytest.mark.parametrize("stop", ["b", "ca"])
@pytest.mark.parametrize("mode", ["sample", "argmax"])
def test_stop_strings_exact(stop, mode):
    """Stop strings end the output at the same token as plain decoding, also when the string spans tokens or ends
    inside an accepted block of drafts (k = 3 > the 3-token budget's remainder)."""
    spec = speculative_distribution("presence1", 3, mode, PARAMS["T1"], stop=stop)
    plain = _target("presence1", "T1", stop)
    assert any(len(s) < N_TOKENS for s in plain), "the stop string never ends an output early"
    assert max_abs_diff(spec, plain) < 1e-9


@pytest.mark.parametrize("control", ["frequency0.7", "repetition1.8", "regex"])
def test_lagging_controls_are_detected(control):
    """Power: verify rows adjusted without the drafts before them give a different distribution."""
    spec = speculative_distribution(control, 2, "sample", PARAMS["T1"], lag=True)
    assert max_abs_diff(spec, _target(control, "T1")) > 1e-3
