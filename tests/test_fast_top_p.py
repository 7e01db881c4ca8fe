"""minimtp/fast/top_p.py against the reference: ``torch.equal`` with minimtp.sampling.process_logits on random rows
(float32 / bfloat16 / float64; V = 10 .. 262,144; exact ties; nearly flat rows that double up to the full sort;
-inf entries; min-p), and the hook: FastEngine uses the twin, Engine the reference.

``python tests/test_fast_top_p.py`` prints reference vs twin ms per row (minimtp.bench.timing.top_p_ms, single
thread)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minimtp import sampling
from minimtp.engine import Engine
from minimtp.errors import GenerationError
from minimtp.fast import FastEngine
from minimtp.fast import top_p as fast
from minimtp.sampling import SamplingParams

STYLES = ["normal", "peaked", "grid", "flat", "neginf", "sparse"]


def make_logits(g: torch.Generator, n: int, V: int, style: str, dtype: torch.dtype) -> torch.Tensor:
    z = torch.randn(n, V, generator=g, dtype=torch.float64)
    x = {
        "normal": 3 * z,
        "peaked": 8 * z,
        "grid": (2 * z).round() / 2,  # few distinct values: exact ties at every cut-off
        "flat": 0.01 * z,  # the nucleus covers most of V: the doubling reaches the full sort
        "neginf": (3 * z).masked_fill(torch.rand(n, V, generator=g) < 0.3, -math.inf),
        "sparse": (3 * z).masked_fill(torch.rand(n, V, generator=g) < 0.97, -math.inf),  # fewer p > 0 than m
    }[style]
    x[:, 0] = x[:, 0].clamp(min=-1.0)  # a finite entry in every row
    return x.to(dtype)


class Spy:
    """Counts the rows that reach the reference's full sort from the twin."""

    def __init__(self, monkeypatch):
        self.rows, ref = 0, sampling.apply_top_p

        def counted(x, top_p):
            self.rows += x.shape[0]
            return ref(x, top_p)

        monkeypatch.setattr(sampling, "apply_top_p", counted)


def check(logits: torch.Tensor, params: SamplingParams) -> None:
    want = sampling.process_logits(logits, params)
    got = fast.process_logits(logits, params)
    assert got.dtype == want.dtype and torch.equal(got, want), params


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("V,first_m", [(10, 1), (10, 3), (1000, 16), (5000, 64), (262_144, 1024)])
def test_bit_identical(dtype, style, V, first_m, monkeypatch):
    monkeypatch.setattr(fast, "FIRST_M", first_m)
    g = torch.Generator().manual_seed(hash((str(dtype), style, V)) % 2**31)
    n = 2 if V > 10_000 else 5
    logits = make_logits(g, n, V, style, dtype)
    top_ps = [0.01, 0.5, 0.9, 0.95, 0.999, 1.0] if V < 10_000 else [0.5, 0.95]
    for i, top_p in enumerate(top_ps):
        temperature = [0.3, 0.7, 1.0, 1.3, 2.0][i % 5]
        check(logits, SamplingParams(temperature, top_p=top_p))
        check(logits, SamplingParams(temperature, top_p=top_p, min_p=[0.05, 0.2][i % 2]))


def test_both_paths_are_taken(monkeypatch):
    """Peaked rows are settled by the top-m candidates; flat rows double all the way to the full sort."""
    spy, g = Spy(monkeypatch), torch.Generator().manual_seed(0)
    check(make_logits(g, 3, 262_144, "peaked", torch.float32), SamplingParams(1.0, top_p=0.95))
    assert spy.rows == 0
    check(make_logits(g, 3, 262_144, "flat", torch.float32), SamplingParams(1.0, top_p=0.95))
    assert spy.rows == 3
    monkeypatch.setattr(fast, "FIRST_M", 2)  # a mixed batch: rows leave the loop at different rounds
    check(torch.cat([make_logits(g, 2, 3000, s, torch.float32) for s in STYLES]), SamplingParams(1.0, top_p=0.9))


def test_other_settings_and_special_rows():
    g = torch.Generator().manual_seed(1)
    x = make_logits(g, 4, 3000, "normal", torch.float32)
    for params in [SamplingParams(0.0, top_p=0.9), SamplingParams(1.0), SamplingParams(0.8, top_k=50, top_p=0.9)]:
        check(x, params)
    check(x, SamplingParams(0.8, top_k=3000, top_p=0.9))  # top-k >= V: the twin's top-p
    x[1, 5] = math.inf  # a +inf row
    check(x, SamplingParams(1.0, top_p=0.5))
    check(x[0], SamplingParams(1.0, top_p=0.5))  # one row, 1-D
    x[2, 7] = math.nan
    for f in (sampling.process_logits, fast.process_logits):
        with pytest.raises(GenerationError, match="row 2 has NaN at token 7"):
            f(x, SamplingParams(1.0, top_p=0.5))
        with pytest.raises(GenerationError, match="top_p"):
            f(x, SamplingParams(1.0, top_p=1.5))


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    n=st.integers(1, 4),
    V=st.integers(2, 3000),
    first_m=st.sampled_from([1, 2, 5, 32, 1024]),
    style=st.sampled_from(STYLES),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float64]),
    top_p=st.one_of(st.sampled_from([0.01, 0.5, 0.9, 0.95, 0.999, 1.0]), st.floats(1e-6, 1.0)),
    temperature=st.floats(0.3, 2.0),
    min_p=st.one_of(st.none(), st.floats(0.0, 0.5)),
)
def test_property(seed, n, V, first_m, style, dtype, top_p, temperature, min_p):
    old, fast.FIRST_M = fast.FIRST_M, first_m
    try:
        logits = make_logits(torch.Generator().manual_seed(seed), n, V, style, dtype)
        check(logits, SamplingParams(temperature, top_p=top_p, min_p=min_p))
    finally:
        fast.FIRST_M = old


def test_hook():
    assert FastEngine.process_logits is fast.process_logits
    assert Engine.process_logits is sampling.process_logits


if __name__ == "__main__":
    from minimtp.bench.timing import top_p_ms

    torch.set_num_threads(1)
    for peaked in (False, True):
        for rows in (1, 7):
            ref, twin = top_p_ms(rows=rows, peaked=peaked)  # minimtp/bench/timing.py
            name = "8 * randn (peaked)" if peaked else "3 * randn"
            print(f"{name:20s} rows={rows}: reference {ref:7.2f} ms/row, twin {twin:7.2f} ms/row, x{ref / twin:.1f}")
