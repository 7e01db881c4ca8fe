"""minimtp.Engine end to end on the tiny checkpoints (fp32): speculative greedy == plain greedy == transformers,
an oracle assistant whose acceptance follows a plan, sampling smoke, stats, backends, bad input.

What runs where (pytest.ini deselects ``slow`` by default):
* default: greedy equivalence for every family with k in {1, 4}, 200 new tokens, 3 ragged prompts, a stop token
  in the middle of one sequence; transformers' greedy ``generate`` for one prompt per family; oracle plans.
* slow: the rest of the k grid (k in {2, 7}) and the Triton backend under the interpreter (~25 s: a subprocess,
  since TRITON_INTERPRET must be set before triton is imported).
"""

from __future__ import annotations

import functools

import pytest
import torch
from support.hf_models import build_target
from support.untied import PROMPTS, V, untie_hf, untie_minimtp

import minimtp

FAMILIES = ["e2b", "moe", "dense", "unified", "unified_shared"]  # tests/support/hf_models.py
N_NEW = 200  # W = 8: the sliding window wraps ~25 times


@pytest.fixture(scope="module")
def plain(untied_pair):
    """Plain greedy output (no stop tokens) of PROMPTS, 200 tokens, per family."""

    @functools.cache
    def get(family: str) -> tuple[tuple[int, ...], ...]:
        res = minimtp.Engine(untied_pair(family)[0]).generate(PROMPTS, N_NEW, temperature=0.0, stop_token_ids=[])
        assert res.finish_reasons == ["length"] * 3
        assert all(len(t) == N_NEW for t in res.tokens)
        assert all(len(set(t)) >= 50 for t in res.tokens)  # not a degenerate repetition
        return tuple(map(tuple, res.tokens))

    return get


def choose_stop(outs) -> tuple[int, int]:
    """A token of prompt 0's output, first seen at step >= 20, preferably absent from the other outputs (so
    they still run the full 200 tokens). Returns (token, its first index in output 0)."""
    o0 = outs[0]
    candidates = [(i, t) for i, t in enumerate(o0) if 20 <= i < 150 and t not in o0[:i]]
    assert candidates, "plain greedy output 0 has no new token after step 20"
    clean = [(i, t) for i, t in candidates if all(t not in o for o in outs[1:])]
    i, t = (clean or candidates)[0]
    return t, i


def expected_with_stop(outs, stop):
    toks, reasons = [], []
    for o in outs:
        if stop in o:
            toks.append(list(o[: o.index(stop) + 1]))
            reasons.append("stop")
        else:
            toks.append(list(o))
            reasons.append("length")
    return toks, reasons


# ---------------------------------------------------------------------------------------------------------------
# greedy: speculative == plain == transformers
# ---------------------------------------------------------------------------------------------------------------


def check_greedy(untied_pair, plain, family, k):
    target, assistant = untied_pair(family)
    outs = plain(family)
    stop, at = choose_stop(outs)
    want, reasons = expected_with_stop(outs, stop)
    assert reasons[0] == "stop" and len(want[0]) == at + 1
    eng = minimtp.Engine(target, assistant, block_size=4)
    res = eng.generate(PROMPTS, N_NEW, num_speculative_tokens=k, temperature=0.0, stop_token_ids=[stop])
    assert res.tokens == want
    assert res.finish_reasons == reasons
    assert res.tokens[0][-1] == stop and stop not in res.tokens[0][:-1]  # nothing after the stop token
    assert res.stats.drafted > 0
    assert len(res.stats.drafted_per_position) == k
    if k != 1:
        return
    # plain decoding with the same stop token trims the same way
    res_plain = minimtp.Engine(target).generate(PROMPTS, N_NEW, temperature=0.0, stop_token_ids=[stop])
    assert res_plain.tokens == want and res_plain.finish_reasons == reasons
    assert res_plain.stats.drafted == 0


@pytest.mark.parametrize("k", [1, 4])
@pytest.mark.parametrize("family", FAMILIES)
def test_speculative_greedy_equals_plain(untied_pair, plain, family, k):
    check_greedy(untied_pair, plain, family, k)


@pytest.mark.slow
@pytest.mark.parametrize("k", [2, 7])
@pytest.mark.parametrize("family", FAMILIES)
def test_speculative_greedy_equals_plain_full_grid(untied_pair, plain, family, k):
    check_greedy(untied_pair, plain, family, k)


@pytest.mark.smoke
@pytest.mark.parametrize("family", FAMILIES)
def test_plain_greedy_equals_transformers(plain, family):
    hf = untie_hf(build_target(family))
    hf.generation_config.eos_token_id = None
    ids = torch.tensor([PROMPTS[1]])
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=N_NEW)
    assert out[0, ids.shape[1] :].tolist() == list(plain(family)[1])


@pytest.mark.parametrize("draft_dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("family", ["e2b", "dense", "unified"])
def test_greedy_exact_with_cheaper_drafters(saved, plain, family, draft_dtype):
    """A half-precision drafter (fp32 target) changes acceptance, never the tokens (int8: tests/test_fast.py)."""
    target = untie_minimtp(minimtp.load_target(saved(family)[0]))
    assistant = minimtp.load_assistant(saved(family)[1], target, dtype=draft_dtype)
    assert assistant.pre_projection.weight.dtype == getattr(torch, draft_dtype)
    res = minimtp.Engine(target, assistant).generate(
        PROMPTS, N_NEW, num_speculative_tokens=3, temperature=0.0, stop_token_ids=[]
    )
    assert [tuple(t) for t in res.tokens] == list(plain(family))
    assert res.stats.drafted >= 3 * (res.stats.target_steps - 3)  # it really drafted, every round


@pytest.mark.parametrize("chunk", [1, 3, 8, 16])
def test_chunked_prefill_gives_the_same_tokens(untied_pair, plain, chunk):
    """Prompts run in chunks of ``prefill_chunk`` tokens (ragged: 5, 13, 27 tokens; chunk 3 and 8 split them
    mid-window, W = 8, so a chunk's sliding queries see keys of the previous chunk and blocks are freed between
    chunks) give the tokens of a one-forward prefill, plain and speculative; the first token's logits agree to
    fp32 noise (other SDPA shapes: measured 2e-5 on logits up to 12)."""
    target, assistant = untied_pair("e2b")
    for asst in (None, assistant):
        res = minimtp.Engine(target, asst, block_size=4, prefill_chunk=chunk).generate(
            PROMPTS, 40, num_speculative_tokens=3, temperature=0.0, stop_token_ids=[]
        )
        assert [tuple(t) for t in res.tokens] == [o[:40] for o in plain("e2b")]
        assert res.stats.prompt_tokens == sum(map(len, PROMPTS))
    rows = {}
    for n in (chunk, 64):
        eng = minimtp.Engine(target, prefill_chunk=n)
        eng.process_logits = lambda x, params, rows=rows, n=n: rows.setdefault(n, x.clone())
        eng.generate(PROMPTS, 1, temperature=1.0, seed=0)
    torch.testing.assert_close(rows[chunk], rows[64], rtol=0, atol=1e-4)  # |logits| <= 12: fp32 noise ~1e-5


@pytest.mark.parametrize("family", ["e2b", "unified_shared", "dense"])
def test_prefill_runs_kv_shared_layers_on_last_rows(untied_pair, family):
    """``prefill`` (KV-shared layers on each sequence's last row only) gives the hidden states and logits of the
    full forward's (``run``) last rows, and writes the same K/V."""
    from minimtp.attention import PagedContext, paged_attention
    from minimtp.kv_cache import KVCache

    target = untied_pair(family)[0]
    outs, caches = {}, {}
    for rows in ("all", "last"):
        cache = KVCache(target.config, {t: 64 for t in set(target.config.layer_types)}, 4)
        for b, p in enumerate(PROMPTS):
            cache.add(b)
            cache.reserve(b, len(p))
        ctx = PagedContext(cache, paged_attention, [0, 1, 2], [0, 0, 0], [len(p) for p in PROMPTS])
        ids = torch.tensor([t for p in PROMPTS for t in p])
        pos = torch.cat([torch.arange(len(p)) for p in PROMPTS])
        forward = target.run if rows == "all" else target.prefill
        outs[rows], caches[rows] = forward(ids, pos, ctx), cache
    last = torch.tensor([len(p) for p in PROMPTS]).cumsum(0) - 1
    assert outs["last"].hidden.shape[0] == 3
    torch.testing.assert_close(outs["last"].hidden, outs["all"].hidden[last], rtol=0, atol=1e-5)
    torch.testing.assert_close(outs["last"].logits, outs["all"].logits[last], rtol=0, atol=1e-4)
    for i in caches["all"].k:
        assert torch.equal(caches["all"].k[i], caches["last"].k[i]) and torch.equal(
            caches["all"].v[i], caches["last"].v[i]
        )


def test_batching_does_not_change_greedy_output(untied_pair, plain):
    """Each prompt alone gives the same tokens as in the ragged batch (plain and speculative)."""
    target, assistant = untied_pair("e2b")
    for b in (0, 2):
        alone = minimtp.Engine(target, assistant).generate(
            [PROMPTS[b]], 60, num_speculative_tokens=3, temperature=0.0, stop_token_ids=[]
        )
        assert alone.tokens[0] == list(plain("e2b")[b][:60])


# ---------------------------------------------------------------------------------------------------------------
# oracle assistant: acceptance follows a plan
# ---------------------------------------------------------------------------------------------------------------


class Oracle:
    """Replaces ``assistant.step``: draft step j (0-based) of a round at position p (the pending token's position)
    predicts position p + 1 + j. In round r of sequence b the first ``plans[b][r]`` steps force the true greedy
    token (logit +10, rest -10), later steps force a wrong one (true + 1 mod V)."""

    def __init__(self, engine, monkeypatch, prompts, outs, plans):
        self.target = engine.target
        self.full = [list(p) + list(o) for p, o in zip(prompts, outs)]
        self.plans, self.rounds = plans, [0] * len(prompts)
        self.rows: list[tuple[int, int]] = []
        self.j = 0
        self.prev: torch.Tensor | None = None
        original = engine._draft

        def draft(run, seqs, ks):
            self.rows = [(s.index, s.cache_len) for s in seqs]
            self.j = 0
            for s in seqs:
                # the engine hands the drafter the target's hidden state at p - 1
                want = self.target.forward_with_kv(torch.tensor([self.full[s.index][: s.cache_len]]))[1][0, -1]
                assert (s.hidden - want).abs().max().item() <= 1e-4
                assert s.pending == self.full[s.index][s.cache_len]
            out = original(run, seqs, ks)
            for idx, _ in self.rows:
                self.rounds[idx] += 1
            return out

        monkeypatch.setattr(engine, "_draft", draft)
        monkeypatch.setattr(engine.assistant, "step", self.step)

    def step(self, token_emb, hidden, positions, ctx, rope=None):
        j, N = self.j, len(self.rows)
        assert positions.tolist() == [p for _, p in self.rows]  # constant position within the round
        last = [self.full[i][p] for i, p in self.rows] if j == 0 else self.prev.tolist()
        assert torch.equal(token_emb, self.target.embed(torch.tensor(last)))  # scaled target embedding
        logits = torch.full((N, V), -10.0)
        for row, (idx, p) in enumerate(self.rows):
            plan = self.plans[idx]
            pos = p + 1 + j
            true = self.full[idx][pos] if pos < len(self.full[idx]) else 3
            ok = j < plan[self.rounds[idx] % len(plan)]
            logits[row, true if ok else (true + 1) % V] = 10.0
        self.j += 1
        self.prev = logits.argmax(-1)
        return logits, hidden


def simulate(plan, k, max_new):
    """Expected (k_r, n_r) per round for one sequence with no stop token."""
    out, rounds, r = 1, [], 0
    while out < max_new:
        ks = min(k, max_new - out - 1)
        n = min(plan[r % len(plan)], ks) if ks > 0 else 0
        rounds.append((ks, n))
        r += int(ks > 0)
        out += n + 1
    return rounds


def check_stats(st, rounds, k):
    drafted = [(ks, n) for ks, n in rounds if ks > 0]
    assert st.target_steps == len(rounds)
    assert st.draft_rounds == len(drafted)
    assert st.drafted == sum(ks for ks, _ in drafted)
    assert st.accepted == sum(n for _, n in drafted)
    assert st.drafted_per_position == [sum(ks > j for ks, _ in drafted) for j in range(k)]
    assert st.accepted_per_position == [sum(n > j for _, n in drafted) for j in range(k)]
    assert st.acceptance_rate == pytest.approx(st.accepted / st.drafted)
    assert st.mean_acceptance_length == pytest.approx(1 + st.accepted / len(drafted))
    assert st.per_position_acceptance == pytest.approx(
        [a / d if d else 0.0 for a, d in zip(st.accepted_per_position, st.drafted_per_position)]
    )


def run_oracle(untied_pair, plain, monkeypatch, family, plans, k, max_new, idxs):
    target, assistant = untied_pair(family)
    prompts = [PROMPTS[i] for i in idxs]
    outs = [plain(family)[i] for i in idxs]
    eng = minimtp.Engine(target, assistant, block_size=4)
    oracle = Oracle(eng, monkeypatch, prompts, outs, plans)
    emitted = [[] for _ in prompts]
    res = eng.generate(
        prompts,
        max_new,
        num_speculative_tokens=k,
        temperature=0.0,
        stop_token_ids=[],
        on_tokens=lambda i, ids: emitted[i].append(list(ids)),
    )
    for b, o in enumerate(outs):
        assert res.tokens[b] == list(o[:max_new])  # output is still plain greedy
        assert [t for chunk in emitted[b] for t in chunk] == res.tokens[b]  # streaming saw the same tokens
        rounds = simulate(plans[b], k, max_new)
        assert [len(c) - 1 for c in emitted[b]] == [0] + [n for _, n in rounds]  # per-round accepted counts
        check_stats(res.seq_stats[b], rounds, k)
        assert oracle.rounds[b] >= sum(ks > 0 for ks, _ in rounds)
    return res


@pytest.mark.parametrize("family", FAMILIES)
def test_oracle_acceptance_follows_plan(untied_pair, plain, monkeypatch, family):
    plan = [4, 2, 0, 3, 1, 4, 4, 0]
    res = run_oracle(untied_pair, plain, monkeypatch, family, [plan], 4, 60, [1])
    st = res.stats
    # the plan's arithmetic: 60 tokens = 1 (prefill) + Σ (n_r + 1)
    rounds = simulate(plan, 4, 60)
    assert 1 + sum(n + 1 for _, n in rounds) == 60
    assert st.accepted == sum(n for _, n in rounds)
    assert st.mean_acceptance_length == pytest.approx(1 + st.accepted / st.draft_rounds)
    assert st.generated_tokens == 60


def test_oracle_all_accepted_and_none_accepted(untied_pair, plain, monkeypatch):
    res = run_oracle(untied_pair, plain, monkeypatch, "moe", [[7], [0]], 7, 60, [0, 2])
    a, b = res.seq_stats
    assert a.acceptance_rate == 1.0 and a.per_position_acceptance == [1.0] * 7
    # 60 = 1 + 7 rounds of 8 + a last round with only 2 drafts (the budget): 51 accepted in 8 rounds
    assert a.accepted == a.drafted == 51 and a.draft_rounds == 8
    assert a.mean_acceptance_length == pytest.approx(1 + 51 / 8)
    assert b.accepted == 0 and b.mean_acceptance_length == 1.0 and b.acceptance_rate == 0.0
    assert b.target_steps == 59


@pytest.mark.parametrize("k", [4, 7])
def test_oracle_batch_with_different_plans(untied_pair, plain, monkeypatch, k):
    plans = [[0, 1, 2, 3, 4, 5, 6, 7], [3, 3, 0, 7], [1, 6, 2, 0, 5]]
    res = run_oracle(untied_pair, plain, monkeypatch, "e2b", plans, k, 70, [0, 1, 2])
    tot = res.stats
    for f in ("drafted", "accepted", "draft_rounds", "generated_tokens"):
        assert getattr(tot, f) == sum(getattr(s, f) for s in res.seq_stats), f
    assert tot.accepted_per_position == [sum(x) for x in zip(*(s.accepted_per_position for s in res.seq_stats))]


@pytest.mark.parametrize("family", ["dense"])
def test_oracle_long_run_wraps_window(untied_pair, plain, monkeypatch, family):
    """200 tokens of pseudo-random acceptance (rollbacks of every size across ~25 window wraps)."""
    g = torch.Generator().manual_seed(5)
    plans = [torch.randint(0, 6, (37,), generator=g).tolist() for _ in range(3)]
    run_oracle(untied_pair, plain, monkeypatch, family, plans, 5, N_NEW, [0, 1, 2])


# ---------------------------------------------------------------------------------------------------------------
# sampling, stats, backends
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("use_assistant", [False, True])
def test_sampling_smoke(untied_pair, use_assistant):
    target, assistant = untied_pair("e2b")
    eng = minimtp.Engine(target, assistant)
    kw = dict(temperature=0.8, num_speculative_tokens=3, stop_token_ids=[], use_assistant=use_assistant)
    a = eng.generate(PROMPTS, 40, seed=11, **kw)
    b = eng.generate(PROMPTS, 40, seed=11, **kw)
    c = eng.generate(PROMPTS, 40, seed=12, **kw)
    assert a.tokens == b.tokens
    assert a.tokens != c.tokens
    assert all(len(t) == 40 and all(0 <= x < V for x in t) for t in a.tokens)
    assert (a.stats.drafted > 0) == use_assistant
    d = eng.generate(PROMPTS, 20, seed=3, top_k=20, top_p=0.9, min_p=0.01, draft_mode="sample", **kw)
    assert all(len(t) == 20 and all(0 <= x < V for x in t) for t in d.tokens)


def test_stats_fields(untied_pair):
    target, assistant = untied_pair("dense")
    eng = minimtp.Engine(target, assistant)
    forwards = []
    original = eng._target_forward
    eng._target_forward = lambda *a, **kw: forwards.append(1) or original(*a, **kw)
    res = eng.generate([PROMPTS[1]], 30, num_speculative_tokens=3, temperature=0.0, stop_token_ids=[])
    st = res.stats
    d = st.as_dict()
    for f in (
        "target_steps",
        "drafted",
        "accepted",
        "acceptance_rate",
        "mean_acceptance_length",
        "per_position_acceptance",
        "tokens_per_second",
        "ttft_s",
    ):
        assert f in d, f
    assert st.target_steps == len(forwards) - 1  # one forward per round after prefill (batch of 1)
    assert st.generated_tokens == 30 == sum(map(len, res.tokens))
    assert st.prompt_tokens == len(PROMPTS[1])
    assert 0 < st.ttft_s <= st.elapsed_s
    assert st.tokens_per_second == pytest.approx(30 / st.elapsed_s)
    assert 0 <= st.accepted <= st.drafted == sum(st.drafted_per_position)
    assert st.accepted == sum(st.accepted_per_position)
    assert all(0.0 <= x <= 1.0 for x in st.per_position_acceptance)
    acc = st.accepted_per_position
    assert all(acc[j] >= acc[j + 1] for j in range(len(acc) - 1))  # accepting j+1 needs j
    assert st.generated_tokens == 1 + st.target_steps + st.accepted  # prefill token + one per round + drafts
    assert res.seq_stats[0].as_dict()["accepted"] == st.accepted


def test_batch_target_steps_counts_forwards(untied_pair):
    target, assistant = untied_pair("dense")
    eng = minimtp.Engine(target, assistant)
    forwards = []
    original = eng._target_forward
    eng._target_forward = lambda *a, **kw: forwards.append(1) or original(*a, **kw)
    res = eng.generate(PROMPTS, 20, num_speculative_tokens=2, temperature=0.0, stop_token_ids=[])
    assert res.stats.target_steps == len(forwards) - 1


TRITON_SCRIPT = """
import dataclasses, json, sys
import torch
torch.set_num_threads(1)
sys.path.insert(0, sys.argv[1])
from support.untied import untie_minimtp
import minimtp
tdir, adir, prompt, n = sys.argv[2], sys.argv[3], json.loads(sys.argv[4]), int(sys.argv[5])
target = untie_minimtp(minimtp.load_target(tdir))
assistant = minimtp.load_assistant(adir, target)
eng = minimtp.Engine(target, assistant, attention_backend="triton", block_size=4)
res = eng.generate([prompt], n, num_speculative_tokens=2, temperature=0.0, stop_token_ids=[])
print("TOKENS", json.dumps(res.tokens[0]))
"""


@pytest.mark.slow
@pytest.mark.interp
def test_triton_backend_small(saved, plain):
    """Greedy with the Triton paged-attention kernel (interpreter on CPU) gives the torch backend's tokens. Runs
    in a subprocess: TRITON_INTERPRET must be set before triton is first imported (transformers imports it)."""
    import importlib.util
    import json
    import os
    import subprocess
    import sys

    if (
        importlib.util.find_spec("triton") is None
        or importlib.util.find_spec("minimtp.kernels.paged_attention") is None
    ):
        pytest.skip("no Triton / no paged attention kernel")
    tdir, adir = saved("e2b")
    n = 12
    env = dict(os.environ, TRITON_INTERPRET="1")
    here = os.path.dirname(__file__)
    proc = subprocess.run(
        [sys.executable, "-c", TRITON_SCRIPT, here, tdir, adir, json.dumps(PROMPTS[1]), str(n)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("TOKENS "))
    assert json.loads(line[len("TOKENS ") :]) == list(plain("e2b")[1][:n])


# ---------------------------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "prompts, kw, needle",
    [
        ([], {}, "non-empty"),
        ([[5, 6], []], {}, "prompt 1"),
        ([[5] * 4096], {}, "4096"),
        ([[5, 6]], dict(num_speculative_tokens=0), "num_speculative_tokens"),
        ([[5, 6]], dict(num_speculative_tokens=-2), "num_speculative_tokens"),
        ([[5, 6.0]], {}, "6.0"),
        ([[5, "7"]], {}, "'7'"),
        ([[5, True]], {}, "True"),
        ([[5, 512]], {}, "512"),
        ([[5, -1]], {}, "-1"),
        ([5, 6, 7], {}, "flat"),
        ([[5, 6]], dict(draft_mode="beam"), "'beam'"),
        ([[5, 6]], dict(temperature=-0.5), "temperature"),
        ([[5, 6]], dict(max_new_tokens=0), "max_new_tokens"),
        ("5 6 7", {}, "list"),
    ],
)
def test_bad_input(untied_pair, prompts, kw, needle):
    target, assistant = untied_pair("e2b")
    eng = minimtp.Engine(target, assistant)
    with pytest.raises((minimtp.GenerationError, minimtp.CompatibilityError)) as e:
        eng.generate(prompts, **{"max_new_tokens": 4, **kw})
    msg = str(e.value)
    assert msg and "\n" not in msg and needle in msg, msg


def test_bad_engine_settings(untied_pair):
    target, assistant = untied_pair("e2b")
    for kw, err in [
        (dict(draft_mode="beam"), minimtp.GenerationError),
        (dict(attention_backend="cuda"), minimtp.CompatibilityError),
        (dict(verify_backend="x"), minimtp.CompatibilityError),
        (dict(block_size=0), minimtp.GenerationError),
        (dict(prefill_chunk=0), minimtp.GenerationError),
    ]:
        with pytest.raises(err) as e:
            minimtp.Engine(target, assistant, **kw)
        assert "\n" not in str(e.value)


def test_context_limit(saved):
    """A prompt just under max_position_embeddings finishes with "context" instead of overrunning RoPE/cache."""
    import dataclasses

    target = minimtp.load_target(saved("dense")[0])
    target.config = dataclasses.replace(target.config, max_position_embeddings=40)
    eng = minimtp.Engine(target)
    res = eng.generate([PROMPTS[2]], 100, temperature=0.0, stop_token_ids=[])
    assert res.finish_reasons == ["context"]
    assert len(PROMPTS[2]) + len(res.tokens[0]) <= 40
