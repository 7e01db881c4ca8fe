"""χ² goodness-of-fit of the REAL engine's output against the exact target distribution.

`tests/support/distribution.py` builds a tiny Gemma 4 target (V = 24, sliding window 3 + full layer) and a
correlated assistant with minimtp, enumerates the exact distribution of the first 4 new tokens with the target's
full forward + `process_logits`, and samples N continuations with ONE `Engine.generate` call on N copies of the
prompt (per-sequence generators via `seed=`, `stop_token_ids=[]`). With max_new_tokens = 5 and k = 3 the first
round drafts tokens 2-4 (token 1 comes from the prefill), so tokens 2, 3, 4 are speculative outputs.

Per run we test the marginals of tokens 1-4 and the joints of (1, 2) and (2, 3): six Pearson χ² tests, cells
with expected count < 5 pooled, plus a hard check that no sample lands where the exact probability is 0.

Significance: ALPHA = 1e-4 per χ² test. The default run makes 10 runs · 6 = 60 tests that must pass, the slow
grid 24 · 6 = 144 more; by Bonferroni the chance of ANY false alarm is <= 0.6 % (default) / 1.5 % (slow) for
a fresh seed. Seeds are fixed, so the outcome is reproducible. Power: the same harness must reject (p far below
ALPHA) the engine with `engine.verify` (or its drafting) replaced by the classic bugs (docs:
concepts/speculative-decoding, "Three rules that look right and are not"):
  (a) transformers: argmax drafts verified as if sampled from the raw drafter softmax q (min(1, p/q), (p - q)^+);
  (b) token matching: draw t ~ p, accept iff t == draft, on a mismatch emit a FRESH sample of p;
  (c) sample mode with the ratio/residual computed from the raw drafter softmax (temperature ignored on q).
And faithful token matching (emit the mismatching t itself) is exact, so it must pass: the harness flags wrong
distributions, not merely rules that differ from minimtp's.

Speed: the engine's reference paged attention loops over sequences in Python; the statistical runs swap in
`batched_paged_attention` (one masked SDPA, same semantics), and `test_batched_attention_is_the_reference`
shows the engine emits identical tokens with either. Greedy and one χ² run use the reference attention.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from support.distribution import (
    DEPTH,
    LENGTH,
    PROMPT,
    SETTINGS,
    V,
    batched_paged_attention,
    fmt,
    make_engine,
    min_p_value,
    pair,
    run_and_test,
    tables,
)

from minimtp.sampling import sample
from minimtp.speculative import _assemble, _leading_true

ALPHA = 1e-4  # per χ² test (see the module docstring for the Bonferroni bound)
N_DEFAULT = 3000
N_SLOW = 12000
# Default run: every setting, both draft modes at k = 1 and k = 3, and every configuration a power check uses
# (so each buggy variant is rejected in a configuration where the correct engine is shown to pass).
DEFAULT_GRID = [
    ("T1", "sample", 3),
    ("T1", "argmax", 3),
    ("T0.7", "sample", 3),
    ("topk5", "sample", 1),
    ("topp0.8", "argmax", 1),
    ("minp0.1", "sample", 3),
    ("T0.8-k8-p0.9-m0.05", "argmax", 3),
]
FULL_GRID = [(s, m, k) for s in SETTINGS for m in ("sample", "argmax") for k in (1, 3)]


def _assert_exact(res):
    for name, r in res.items():
        assert r.outside_support == 0, f"{name}: {r.outside_support} samples where the exact probability is 0"
        assert r.p_value > ALPHA, f"{name}: {r} (alpha {ALPHA})"


# ---------------------------------------------------------------------------------------------------------
# The harness itself.
# ---------------------------------------------------------------------------------------------------------


def test_exact_tables_are_distributions_and_context_dependent():
    t = tables("T1")
    for d in range(DEPTH):
        assert abs(float(t[d].sum()) - 1.0) < 1e-5
    # P(token 3 | t1, t2) really depends on t1 (not only on the last token), and is far from uniform
    cond = t[2] / t[1].unsqueeze(-1)
    assert float(0.5 * (cond[0] - cond[1]).abs().sum(-1).mean()) > 0.1
    assert float(t[0].max()) > 3 / V
    # truncation settings do put exact zeros in the table (so the support check has something to check)
    assert bool((tables("topk5")[1] == 0).any()) and bool((tables("minp0.1")[1] == 0).any())


@pytest.mark.parametrize("mode", ["sample", "argmax"])
def test_batched_attention_is_the_reference(mode):
    """The fast attention stand-in changes nothing: identical tokens to the engine's reference attention."""
    target, assistant = pair()
    kw = dict(max_new_tokens=LENGTH + 2, num_speculative_tokens=3, temperature=1.0, top_k=12, seed=5, stop_token_ids=[])
    prompts = [PROMPT, PROMPT[:2], PROMPT * 2] * 40
    ref = make_engine(target, assistant, fast=False, draft_mode=mode).generate(prompts, **kw)
    fast = make_engine(target, assistant, draft_mode=mode).generate(prompts, **kw)
    assert fast.tokens == ref.tokens
    assert ref.stats.accepted > 0


def test_plain_sampling_matches_exact():
    """No assistant: checks the harness (exact tables, counting, χ²) on plain decoding."""
    target, _ = pair()
    res, _ = run_and_test(make_engine(target, None), "T1", N_DEFAULT, use_assistant=False)
    _assert_exact(res)


# ---------------------------------------------------------------------------------------------------------
# The correct engine.
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("setting,mode,k", DEFAULT_GRID, ids=[f"{s}-{m}-k{k}" for s, m, k in DEFAULT_GRID])
def test_speculative_matches_exact(setting, mode, k):
    res, acc = run_and_test(make_engine(*pair()), setting, N_DEFAULT, k=k, mode=mode)
    _assert_exact(res)
    assert acc > (0.3 if mode == "sample" else 0.1), "drafter too weak: the power checks would lose their teeth"


@pytest.mark.parametrize("mode", ["sample", "argmax"])
def test_speculative_matches_exact_int8_drafter(mode):
    """The CLI's CPU default: the FastEngine (fused norms, the round-level draft context) with a weight-only int8
    drafter (bfloat16 activations) under a float32 target. Its q is whatever the quantized drafter computes;
    verifying against that same q keeps the output exact."""
    import copy

    from minimtp.fast import FastEngine, weights_dtype

    target, assistant = (copy.deepcopy(m) for m in pair())  # the fast path rewrites the models in place
    eng = FastEngine(target, assistant, block_size=4, draft_dtype="int8")
    eng.attention = batched_paged_attention  # the target's attention stand-in, as in make_engine
    assert weights_dtype(assistant) == "int8"
    res, acc = run_and_test(eng, "T1", N_DEFAULT, k=3, mode=mode, seed_key=("int8", mode))
    _assert_exact(res)
    assert acc > 0.1


def test_speculative_matches_exact_reference_attention():
    """One run entirely on the engine's own reference attention (no stand-in at all)."""
    res, _ = run_and_test(make_engine(*pair(), fast=False), "T1", 1500, k=3, mode="sample", seed_key=("ref",))
    _assert_exact(res)


@pytest.mark.slow
@pytest.mark.parametrize("setting,mode,k", FULL_GRID, ids=[f"{s}-{m}-k{k}" for s, m, k in FULL_GRID])
def test_speculative_matches_exact_full_grid(setting, mode, k):
    res, _ = run_and_test(make_engine(*pair()), setting, N_SLOW, k=k, mode=mode, seed_key=("slow", setting, mode, k))
    _assert_exact(res)


# ---------------------------------------------------------------------------------------------------------
# Power: the classic bugs must be rejected by the same harness.
# ---------------------------------------------------------------------------------------------------------


def _spy_raw_logits(engine):
    """Wrap ``engine._draft`` so it returns, alongside the real drafts, softmax(RAW drafter logits) as q, and
    ``engine.verify`` so it verifies with that q: what transformers hands to its sampled-draft rule (no temperature /
    top-k on q), also for argmax drafts."""
    orig_draft, orig_verify, assistant, raw_q = engine._draft, engine.verify, engine.assistant, []

    def _draft(run, seqs, ks):
        raw = []
        orig_step = assistant.step

        def step(*a, **kw):
            logits, h = orig_step(*a, **kw)
            raw.append(logits)
            return logits, h

        assistant.step = step
        try:
            drafts, _ = orig_draft(run, seqs, ks)
        finally:
            del assistant.step
        raw_q[:] = [torch.softmax(torch.stack(raw, 1).float(), -1)]
        return drafts, raw_q[0]

    def verify(probs, drafts, _q, *rest):
        return orig_verify(probs, drafts, raw_q[0], *rest)

    engine._draft, engine.verify = _draft, verify


def _inverse_cdf(p: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """t ~ p (rows [.., V]) from u ~ U[0, 1) [..]: the first id whose cumulative mass reaches u · total."""
    cdf = p.double().cumsum(-1)
    return (cdf < u[..., None] * cdf[..., -1:]).sum(-1).clamp(max=p.shape[-1] - 1)


def _token_matching(faithful: bool):
    """A verify-signature rule: t_j ~ p_j (inverse CDF of u_j), accept while t_j == draft_j; on the first
    mismatch emit t_n itself (faithful: exact) or a fresh sample of p_n (the bug); bonus y ~ p_n."""

    def verify(target_probs, draft_ids, draft_probs, num_drafts, uniforms, noise):
        B, K1, _ = target_probs.shape
        K = K1 - 1
        t = _inverse_cdf(target_probs[:, :K], uniforms)  # [B, K]
        valid = torch.arange(K) < num_drafts[:, None]
        n = _leading_true((draft_ids == t) & valid)
        rows = torch.arange(B)
        fresh = sample(target_probs[rows, n], noise)
        if faithful and K > 0:
            fresh = torch.where(n < num_drafts, t[rows, n.clamp(max=K - 1)], fresh)
        return _assemble(draft_ids, n, fresh)

    return verify


def _bug_engine(bug: str):
    engine = make_engine(*pair())
    if bug in ("a-transformers", "c-raw-q"):
        _spy_raw_logits(engine)
    elif bug == "b-match-resample":
        engine.verify = _token_matching(faithful=False)
    elif bug == "match-faithful":
        engine.verify = _token_matching(faithful=True)
    return engine


BUGS = {  # bug -> (setting, draft mode, k)
    "a-transformers": ("T1", "argmax", 3),
    "b-match-resample": ("T1", "argmax", 3),
    "c-raw-q": ("T0.7", "sample", 3),
}


@pytest.mark.parametrize("bug", list(BUGS))
def test_buggy_rules_are_rejected(bug):
    setting, mode, k = BUGS[bug]
    res, _ = run_and_test(_bug_engine(bug), setting, N_DEFAULT, k=k, mode=mode, seed_key=("bug", bug))
    assert min_p_value(res) < ALPHA * 1e-6, fmt(res)


def test_faithful_token_matching_passes():
    """Exact but different from minimtp's rule: the harness must NOT reject it (no false positive by design)."""
    res, acc = run_and_test(_bug_engine("match-faithful"), "T1", N_DEFAULT, k=3, mode="sample", seed_key=("mf",))
    _assert_exact(res)
    assert acc > 0.05  # below the sampled-draft rule's (sum p·q <= sum min(p, q)), but well above 0


# ---------------------------------------------------------------------------------------------------------
# Greedy, and the Triton verifier.
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["argmax", "sample"])
@pytest.mark.parametrize("k", [1, 3])
def test_greedy_speculative_equals_plain_greedy(mode, k):
    target, assistant = pair()
    g = torch.Generator().manual_seed(11)
    prompts = [torch.randint(0, V, (int(n),), generator=g).tolist() for n in torch.randint(1, 9, (24,), generator=g)]
    eng = make_engine(target, assistant, fast=False, draft_mode=mode)
    kw = dict(max_new_tokens=12, num_speculative_tokens=k, temperature=0.0, stop_token_ids=[])
    spec = eng.generate(prompts, **kw)
    plain = eng.generate(prompts, use_assistant=False, **kw)
    assert spec.tokens == plain.tokens
    assert spec.stats.accepted > 0
    # and plain greedy is the argmax of the full forward
    for p, out in zip(prompts[:4], plain.tokens[:4]):
        ids = list(p)
        for tok in out:
            assert int(target(torch.tensor([ids]))[0, -1].argmax()) == tok
            ids.append(tok)


_TRITON_SCRIPT = """
import json, sys, time
sys.path.insert(0, {tests!r})
import torch
torch.set_num_threads(1)
from support.distribution import make_engine, pair, run_and_test
out = {{}}
for setting, mode, k in {grid!r}:
    res, acc = run_and_test(make_engine(*pair(), verify_backend="triton"), setting, {n}, k=k, mode=mode,
                            seed_key=("triton", setting, mode, k))
    out[f"{{setting}}-{{mode}}-k{{k}}"] = dict(p={{n: r.p_value for n, r in res.items()}},
                                                outside=sum(r.outside_support for r in res.values()), acc=acc)
print("RESULT" + json.dumps(out))
"""


def _triton_verify_available() -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec("minimtp.kernels.verify") is not None
    except ModuleNotFoundError:
        return False


@pytest.mark.slow
@pytest.mark.interp
@pytest.mark.skipif(not _triton_verify_available(), reason="kernels/verify.py (minimtp.kernels.verify) not importable")
def test_triton_verifier_matches_exact():
    """The same χ² harness with ``verify_backend="triton"`` (Triton interpreter on CPU, in a subprocess so
    TRITON_INTERPRET=1 is set before triton is imported)."""
    grid = [("T1", "sample", 3), ("T0.8-k8-p0.9-m0.05", "argmax", 3)]
    here = os.path.dirname(os.path.abspath(__file__))
    script = _TRITON_SCRIPT.format(tests=here, grid=grid, n=1500)
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT"))
    out = json.loads(line[len("RESULT") :])
    print(out)
    for name, r in out.items():
        assert r["outside"] == 0, name
        assert min(r["p"].values()) > ALPHA, (name, r)
