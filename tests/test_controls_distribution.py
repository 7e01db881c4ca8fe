"""χ² goodness-of-fit of the REAL engine under controls: penalties, a grammar, stop strings, token healing, and
seeds pooled across calls, against the exact distribution of plain decoding with the same controls.

The pair and the χ² machinery are tests/support/distribution.py's (V = 24); the tokenizer is a 24-token
character-level one (tests/support/tokenizer.py), so grammars and stop strings act on real text. The exact side
walks the tree of continuations with positive probability: each node's raw target logits (one batched full forward
of every continuation, `continuation_logits`) go through a `Controls` built for that prompt with that node's
generated tokens, then `process_logits`. Each run samples N = 3000 outputs of 4 tokens (the prefill token, then a
round of 2 drafts + the bonus at k = 3) and tests the marginals of tokens 1-4 and the joints (1, 2), (2, 3); outputs
that a stop string ends early are compared as whole sequences.

Significance: ALPHA = 1e-4 per test, as tests/test_distribution.py. Power: the same harness rejects (a) controls
that lag one round behind (verify rows adjusted without the drafts before them) and (b) the old seed scheme
(sequence i of seed s used stream s + i), pooled over consecutive seeds.
"""

from __future__ import annotations

import functools
import zlib
from collections import Counter

import pytest
import torch
from support.distribution import PROMPT, V, check_all, chi2_gof, continuation_logits, fmt, make_engine, pair
from support.tokenizer import char_tokenizer

import minimtp.engine as engine_mod
import minimtp.request as request_mod
from minimtp.controls import Penalties, make_controls
from minimtp.controls.grammar import grammar_source
from minimtp.controls.stop_strings import StopStrings
from minimtp.sampling import SamplingParams, process_logits

ALPHA = 1e-4
N = 3000
LENGTH = 4
TOKENS = ["<pad>", "<eos>", "<bos>", "{", "}", '"', ":", ",", "a", "b", "ab", "0", "1", "10", " ", "\n", "\n "]
TOKENS += ["[", "]", "t", "r", "u", "e", "x"]
assert len(TOKENS) == V
TOK = char_tokenizer(TOKENS)
HEAL_PROMPT = PROMPT[:-1] + [8]  # ends in "a": healing removes it, the first token must be "a" or "ab"

CASES = {  # name: (generate keywords, sampling params, draft mode, k)
    "repetition1.5": (dict(repetition_penalty=1.5), SamplingParams(temperature=1.0), "sample", 3),
    "presence-frequency": (
        dict(presence_penalty=1.0, frequency_penalty=0.5),
        SamplingParams(temperature=0.8, top_k=8),
        "argmax",
        3,
    ),
    "frequency2": (dict(frequency_penalty=2.0), SamplingParams(temperature=1.0), "sample", 3),
    "regex": (dict(regex="[ab]+[01]*"), SamplingParams(temperature=1.0), "sample", 3),
    "json-schema": (
        dict(json_schema={"type": "array", "items": {"type": "integer"}}),
        SamplingParams(temperature=1.0, top_p=0.9),
        "argmax",
        1,
    ),
    "stop": (dict(stop=["ab", "1"]), SamplingParams(temperature=1.0), "sample", 3),
    "healing": (dict(token_healing=True), SamplingParams(temperature=1.0), "sample", 3),
}


@functools.cache
def _logits(prompt: tuple):
    return continuation_logits(pair()[0], list(prompt), LENGTH)


@functools.cache
def exact(case: str, prompt=tuple(PROMPT), length: int = LENGTH) -> dict[tuple, float]:
    """{output: probability} of plain decoding under the case's controls (outputs of ``length`` tokens, or cut at
    a stop string)."""
    kw, params, _, _ = CASES[case]
    pen = Penalties(kw.get("repetition_penalty", 1.0), kw.get("presence_penalty", 0.0), kw.get("frequency_penalty", 0))
    src = grammar_source(kw.get("json_schema"), kw.get("regex"))
    [(run_prompt, ctl, healed)] = make_controls([list(prompt)], TOK, V, [1], pen, src, kw.get("token_healing", False))
    logits = _logits(tuple(run_prompt))  # [V^(LENGTH-1), LENGTH, V]
    stops = StopStrings(TOK, kw["stop"], prefix=healed) if "stop" in kw else None
    out: dict[tuple, float] = {}

    def walk(seq: tuple, prob: float):
        if len(seq) == length or (seq and stops and stops.find(stops.text(list(seq)))):
            out[seq] = prob
            return
        c = sum(t * V ** (LENGTH - 2 - i) for i, t in enumerate(seq))  # the continuation seq + (0, 0, ..)
        p = process_logits(ctl(logits[c, len(seq)][None], [list(seq)]), params)[0].double()
        for y in torch.nonzero(p).flatten().tolist():
            walk(seq + (y,), prob * float(p[y]))

    walk((), 1.0)
    return out


def tables_of(dist: dict[tuple, float]) -> list[torch.Tensor]:
    """The harness's [P_1, ..., P_LENGTH] tables (P_d[t1..td] = P(first d tokens)) from whole-output probabilities."""
    tables = [torch.zeros([V] * d, dtype=torch.float64) for d in range(1, LENGTH + 1)]
    for seq, prob in dist.items():
        for d in range(1, len(seq) + 1):
            tables[d - 1][seq[:d]] += prob
    return tables


def sample(case: str, n: int = N, *, prompt=PROMPT, seed=None, engine=None, use_assistant=True) -> list[tuple]:
    kw, params, mode, k = CASES[case]
    eng = engine or make_engine(*pair(), tokenizer=TOK, draft_mode=mode)
    seed = zlib.crc32(case.encode()) if seed is None else seed
    res = eng.generate([prompt] * n, max_new_tokens=LENGTH, num_speculative_tokens=k, temperature=params.temperature,
                       top_k=params.top_k, top_p=params.top_p, min_p=params.min_p, seed=seed, stop_token_ids=[],
                       use_assistant=use_assistant, **kw)  # fmt: skip
    return [tuple(t) for t in res.tokens]


def gof(samples: list[tuple], dist: dict[tuple, float]) -> dict:
    """χ² of the marginals / joints when every output has LENGTH tokens, else of the whole outputs."""
    if all(len(s) == LENGTH for s in samples) and all(len(s) == LENGTH for s in dist):
        tokens = torch.tensor(samples)
        return check_all(tokens, tables_of(dist), positions=tuple(range(1, LENGTH + 1)), pairs=((1, 2), (2, 3)))
    keys = sorted(set(dist) | set(samples))
    counts, probs = Counter(samples), torch.tensor([dist.get(s, 0.0) for s in keys])
    return {"outputs": chi2_gof(torch.tensor([float(counts[s]) for s in keys]), probs)}


def assert_exact(res: dict) -> None:
    for name, r in res.items():
        assert r.outside_support == 0, f"{name}: {r.outside_support} samples where the exact probability is 0"
        assert r.p_value > ALPHA, f"{name}: {r}"


@pytest.mark.parametrize("case", list(CASES))
def test_speculative_matches_exact_under_controls(case):
    prompt = HEAL_PROMPT if case == "healing" else PROMPT
    dist = exact(case, tuple(prompt))
    res = gof(sample(case, prompt=prompt), dist)
    print(f"\n[{case}] {fmt(res)}")
    assert_exact(res)


def test_plain_matches_exact_under_a_grammar():
    res = gof(sample("regex", use_assistant=False, seed=7), exact("regex"))
    assert_exact(res)


def test_the_exact_side_depends_on_the_controls():
    """Each case's exact distribution differs from the uncontrolled one (the χ² tests have something to see)."""
    base = tables_of(exact("healing", length=2))  # healing on PROMPT (ends in <bos>): nothing to heal, no controls
    for case in CASES:
        prompt = tuple(HEAL_PROMPT if case == "healing" else PROMPT)
        t = tables_of(exact(case, prompt, length=2))
        assert float((t[1] - base[1]).abs().sum()) > 0.02, case


def test_seeds_pooled_across_calls_match_exact():
    """60 calls of a 50-prompt batch with seeds s, s+1, ...: the pooled 3,000 samples are one exact sample."""
    eng = make_engine(*pair(), tokenizer=TOK, draft_mode="sample")
    pooled = [t for s in range(60) for t in sample("repetition1.5", 50, seed=1000 + s, engine=eng)]
    assert_exact(gof(pooled, exact("repetition1.5")))


def _old_generators(seed, n):  # the pre-fix scheme: sequence i of seed s used stream s + i
    gens = []
    for i in range(n):
        gens.append(torch.Generator().manual_seed(seed + i))
    return gens


@pytest.mark.slow  # a check of the harness's power (28 s), not of minimtp: with the slow suite
def test_power_old_seed_scheme_is_rejected(monkeypatch):
    monkeypatch.setattr(request_mod, "make_generators", _old_generators)
    eng = make_engine(*pair(), tokenizer=TOK, draft_mode="sample")
    pooled = [t for s in range(60) for t in sample("repetition1.5", 50, seed=1000 + s, engine=eng)]
    res = gof(pooled, exact("repetition1.5"))
    assert min(r.p_value for r in res.values()) < 1e-8, fmt(res)


@pytest.mark.slow  # a check of the harness's power (50 s), not of minimtp: with the slow suite
@pytest.mark.parametrize("case", ["frequency2", "regex"])
def test_power_lagging_controls_are_rejected(case, monkeypatch):
    """Verify and draft rows adjusted with the emitted tokens only (the drafts before the row ignored)."""

    def fixed_rows(seqs, logits, drafts, first, rows):  # every row adjusted with s.out only
        if not any(s.controls.active for s in seqs):
            return logits
        y = logits.double() if logits.dtype == torch.float64 else logits.float()
        for b, s in enumerate(seqs):
            for r in range(rows[b]):
                y[b, r] = s.controls(y[b, r][None], [list(s.out)])[0]
        return y

    monkeypatch.setattr(engine_mod, "_controlled", fixed_rows)
    res = gof(sample(case, seed=99), exact(case))
    assert min(r.p_value for r in res.values()) < 1e-8, fmt(res)
