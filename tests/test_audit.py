"""``python -m minimtp.audit`` (minimtp/audit/): the oracle checked against minimtp's engine, its server, biased rules
and transformers, on the embedded pair (docs: guides/audit).

1. expected: given the tokens an engine emitted, the expected counters of argmax drafts are exactly the engine's
   (a is 0 or 1); on its own plain-decoded continuations the expectation matches the engine's measured per-position
   acceptance within 4 standard errors (sampled and argmax drafts).
2. sampling: minimtp's own server passes; argmax drafts verified as if sampled, penalties that lag the drafts, and
   transformers' ``generate(assistant_model=)`` at T > 0 are rejected with p < 1e-6, while the exact rule run by the
   same test endpoint passes (so the rejections come from the rules, not the harness).
3. metrics: a drafter that reads the wrong target layer's K/V is flagged, with the KV-sharing cause; the correct
   engine (vLLM's metric names) and minimtp's server (its own names, with a baseline scrape) are not.
4. golden: the traces are the reference's tensors, and their round is the engine's first greedy round.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from support.audit_endpoints import RuleEndpoint, TransformersEndpoint
from support.common import ASSISTANT_DIR, TARGET_DIR, default_pair
from support.server import Server
from support.vllm_metrics import vllm_metrics_text

import minimtp
from minimtp.attention import DraftPagedContext
from minimtp.audit import __main__ as audit_main
from minimtp.audit import golden
from minimtp.audit.endpoint import OpenAIEndpoint
from minimtp.audit.expected import expected, sequence_counts
from minimtp.audit.inputs import DEFAULT_PROMPTS, prompt_ids
from minimtp.audit.sampling import audit_sampling
from minimtp.audit.stats import detectable_tv, ratio_se
from minimtp.config import SLIDING
from minimtp.controls.penalties import Penalties
from minimtp.sampling import SamplingParams

K = 4
Z = 4.0  # two-sided 4 sigma: P(|z| > 4) = 6.3e-5 per comparison, < 1e-3 over the 10 comparisons of a test below
TOP4 = SamplingParams(1.0, top_k=4)


@pytest.fixture(scope="module")
def pair():
    return default_pair()


@pytest.fixture(scope="module")
def server():
    s = Server("--dtype", "float32", "--max-num-seqs", "16", "--max-model-len", "256")
    yield s
    s.close()


def _ids(tok, n=None):
    return prompt_ids(DEFAULT_PROMPTS[:n], tok)


# ---- 1. expected ------------------------------------------------------------------------------------------------


def test_expected_counts_given_the_tokens_are_the_engines(pair):
    """Argmax drafts at T = 1: given the emitted tokens, which rounds accepted what is determined (an accepted draft
    IS the next token, a rejection emits another), so the audit's expected counters must equal the engine's own, per
    sequence and per position. Only a drafter near-tie could flip an argmax between the dense and the paged
    attention: the smallest top-1 minus top-2 drafter logit is checked to be far above float32 rounding."""
    target, assistant, tok = pair
    ids = _ids(tok) * 2
    eng = minimtp.Engine(target, assistant, tokenizer=tok)
    res = eng.generate(ids, max_new_tokens=24, temperature=1.0, seed=5, num_speculative_tokens=K, stop_token_ids=[])
    with torch.inference_mode():
        for p, toks, st in zip(ids, res.tokens, res.seq_stats):
            c = sequence_counts(target, assistant, p, toks, K, SamplingParams(1.0), "argmax")
            assert c.min_margin > 1e-4  # no near-tie (float32 logits of a few units agree to ~1e-6)
            assert c.rounds == st.draft_rounds and c.draft_tokens == st.drafted
            assert c.accepted_pos == [float(a) for a in st.accepted_per_position]
            assert c.drafted_pos == [float(d) for d in st.drafted_per_position]


@pytest.mark.parametrize(
    "mode,params",
    [("argmax", SamplingParams(1.0)), ("sample", SamplingParams(0.8, top_k=20))],
    ids=["argmax", "sample"],
)
def test_expected_matches_the_engines_measured_acceptance(pair, mode, params):
    """The audit's expectation on its own plain-decoded continuations (seed 0) against the engine's counters on
    other draws (seed 12345) of the same 48 requests: both are ratio estimates over independent sequences, so
    z = (measured - expected) / sqrt(se_engine² + se_audit²) with delta-method standard errors is ~N(0, 1) for an
    exact engine and a correct audit; every position and the mean acceptance length stay within 4 sigma."""
    target, assistant, tok = pair
    ids = _ids(tok) * 6
    n = 24
    exp = expected(target, assistant, ids, k=K, params=params, draft_mode=mode, max_new_tokens=n, seed=0)
    eng = minimtp.Engine(target, assistant, tokenizer=tok, draft_mode=mode)
    res = eng.generate(
        ids,
        max_new_tokens=n,
        temperature=params.temperature,
        top_k=params.top_k,
        seed=12345,
        num_speculative_tokens=K,
        stop_token_ids=[],
    )
    rounds = [s.draft_rounds for s in res.seq_stats]
    for j in range(K):
        acc = [s.accepted_per_position[j] for s in res.seq_stats]
        e = exp["per_position"][j]
        z = (sum(acc) / sum(rounds) - e["rate"]) / math.hypot(ratio_se(acc, rounds), e["se"])
        assert abs(z) < Z, (j, z, e)
    acc = [s.accepted for s in res.seq_stats]
    mal = 1 + sum(acc) / sum(rounds)
    z = (mal - exp["mean_acceptance_length"]) / math.hypot(ratio_se(acc, rounds), exp["mean_acceptance_length_se"])
    assert abs(z) < Z, (z, mal, exp["mean_acceptance_length"])
    assert exp["per_position"][0]["rate"] > 0.1  # a test with something to measure


def test_expected_cli(tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "def f(x):\\n    "}\n"import os\\n"\n', encoding="utf-8")
    argv = ["expected", "--prompts", str(prompts), "--max-new-tokens", "10", "--k", "3", "--cost", "0.1"]
    assert audit_main.main([*argv, "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert len(res["per_position"]) == 3 and res["settings"]["prompts"] == 2
    rates = [r["rate"] for r in res["per_position"]]
    assert all(0 <= b <= a <= 1 for a, b in zip(rates, rates[1:]))  # reaching j+1 needs j accepted
    sp = res["speedup"]
    assert sp["from_profile"] == pytest.approx(res["mean_acceptance_length"] / (0.1 * 3 + 1))
    assert audit_main.main(argv) == 0
    assert "teacher-forced" in capsys.readouterr().out
    assert audit_main.main(["expected", "--k", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and "--k" in err
    assert audit_main.main(["nope"]) == 2


# ---- 2. sampling ------------------------------------------------------------------------------------------------


def test_sampling_passes_minimtp_server(pair, server):
    target, _, tok = pair
    ep = OpenAIEndpoint(server.url + "/v1", "minimtp-default", concurrency=16)
    res = audit_sampling(ep, target, tok, DEFAULT_PROMPTS[:2], m=3, n=300, params=TOP4)
    assert res["verdict"] == "pass" and res["outside_support"] == 0, res["p_value"]
    assert res["df"] > 10  # many cells: a test with something to test
    assert 0 < res["power"]["tv_every_prompt"] < res["power"]["tv_one_prompt"] < 0.5


@pytest.mark.parametrize(
    "rule,penalties,m",
    [("argmax-as-sampled", Penalties(), 3), ("lagging-penalty", Penalties(presence=2.0), 4)],
    ids=["argmax-as-sampled", "lagging-penalty"],
)
def test_sampling_rejects_biased_rules(pair, rule, penalties, m):
    """The same test endpoint, the same model and seeds: the exact rule passes, the biased one fails (p < 1e-6)."""
    target, assistant, tok = pair
    kw = dict(m=m, n=400, params=TOP4, penalties=penalties, send_ids=True)
    exact = audit_sampling(RuleEndpoint(target, assistant, "exact", k=3), target, tok, DEFAULT_PROMPTS[:2], **kw)
    assert exact["verdict"] == "pass", exact["p_value"]
    biased = audit_sampling(RuleEndpoint(target, assistant, rule, k=3), target, tok, DEFAULT_PROMPTS[:2], **kw)
    assert biased["verdict"] == "fail" and biased["p_value"] < 1e-6, biased["p_value"]


def test_sampling_rejects_transformers_assisted_generation(pair):
    """transformers' generate(assistant_model=) with the embedded pair's Gemma 4 assistant at T = 1 drafts argmax
    tokens and verifies them with its sampled-draft rule (generation/utils.py, _speculative_sampling)."""
    from transformers import Gemma4AssistantForCausalLM, Gemma4ForCausalLM

    from minimtp.hf_compat import patch_transformers

    patch_transformers()
    target, _, tok = pair
    hf = Gemma4ForCausalLM.from_pretrained(TARGET_DIR, dtype=torch.float32).eval()
    hf_assistant = Gemma4AssistantForCausalLM.from_pretrained(ASSISTANT_DIR, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None
    hf_assistant.generation_config.num_assistant_tokens = 2
    ep = TransformersEndpoint(hf, hf_assistant)
    res = audit_sampling(ep, target, tok, DEFAULT_PROMPTS[:2], m=3, n=120, params=TOP4, send_ids=True)
    assert res["verdict"] == "fail" and res["p_value"] < 1e-6, res["p_value"]


def test_detectable_tv_is_the_power_statement():
    """Bisection inverts the noncentral chi-square power: at the returned TV the lower bound on the noncentrality
    (4 N TV²) gives the stated power, and more samples detect a smaller bias (as 1 / sqrt(N))."""
    a = detectable_tv(1000, 20, 1e-3)
    b = detectable_tv(4000, 20, 1e-3)
    assert b == pytest.approx(a / 2, rel=1e-6)
    assert detectable_tv(1000, 20, 1e-6) > a  # a stricter level needs a larger bias


# ---- 3. metrics -------------------------------------------------------------------------------------------------


class WrongLayerContext(DraftPagedContext):
    """A broken drafter: its full-attention layer reads the K/V of the target's FIRST full layer (2), not of the
    store layer its KV sharing names (5) - the wrong KV group, as in vllm-ascend#16980."""

    def attend(self, i, q, window):
        t = self.dcfg.layer_types[i]
        wrong = self.cache.cfg.layer_types.index(t)
        assert wrong != self.cache.cfg.store_layer(t)
        kc, vc = self.cache.k[wrong], self.cache.v[wrong]
        w = self.dcfg.sliding_window + 1 if t == SLIDING else 0
        return self.backend(q.to(kc.dtype), kc, vc, self.block_tables[t], self.seq_lens, self.cu_q_lens, w, 1.0)


def test_metrics_flags_a_drafter_reading_the_wrong_kv_layer(pair, tmp_path, capsys):
    target, assistant, tok = pair
    ids = _ids(tok)
    n = 32
    exp = expected(target, assistant, ids, k=K, params=SamplingParams(0.0), draft_mode="argmax", max_new_tokens=n)
    exp_file = tmp_path / "expected.json"
    exp_file.write_text(json.dumps(exp), encoding="utf-8")
    for broken in (False, True):
        eng = minimtp.Engine(target, assistant, tokenizer=tok)
        if broken:
            eng.draft_context = WrongLayerContext
        res = eng.generate(ids, max_new_tokens=n, temperature=0.0, num_speculative_tokens=K, stop_token_ids=[])
        scrape = tmp_path / f"vllm-{broken}.txt"
        scrape.write_text(vllm_metrics_text(res.stats, K), encoding="utf-8")
        code = audit_main.main(["metrics", "--url", str(scrape), "--expected", str(exp_file), "--json"])
        report = json.loads(capsys.readouterr().out)
        assert report["drafts"] == res.stats.draft_rounds  # the two engines' halves summed
        assert code == int(broken), report
        if broken:
            assert report["per_position"][1]["flag"] == "low"
            assert any("KV sharing" in c for c in report["causes"]), report["causes"]


def test_metrics_reads_minimtp_server_with_a_baseline(pair, server, tmp_path, capsys):
    """Greedy requests through the server (its default k = the assistant's 5), scraped before and after: the delta
    matches the expectation of the same workload computed from the flags."""
    target, assistant, tok = pair
    before = tmp_path / "before.txt"
    before.write_text(server.http.get("/metrics").text, encoding="utf-8")
    ep = OpenAIEndpoint(server.url + "/v1", None, concurrency=8)
    for p in DEFAULT_PROMPTS[:4]:
        ep.complete(p, [0], 24, {"temperature": 0.0})
    prompts = tmp_path / "p.json"
    prompts.write_text(json.dumps(DEFAULT_PROMPTS[:4]), encoding="utf-8")
    argv = ["metrics", "--url", server.url + "/metrics", "--baseline", str(before), "--prompts", str(prompts)]
    code = audit_main.main([*argv, "--k", "5", "--max-new-tokens", "24", "--temperature", "0"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "consistent with the reference" in out


def test_metrics_refuses_text_without_counters(tmp_path, capsys):
    bad = tmp_path / "m.txt"
    bad.write_text("# TYPE up gauge\nup 1\n", encoding="utf-8")
    assert audit_main.main(["metrics", "--url", str(bad), "--expected", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and "spec_decode" in err


# ---- 4. golden --------------------------------------------------------------------------------------------------


def test_golden_traces_are_the_reference(pair, tmp_path, capsys):
    target, assistant, tok = pair
    out = tmp_path / "golden"
    assert audit_main.main(["golden", "--out", str(out), "--k", "3"]) == 0
    capsys.readouterr()
    t = load_file(str(out / "golden.safetensors"))
    mf = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert set(t) == set(mf["tensors"])
    ids = mf["prompt_ids"]
    assert ids == _ids(tok, 1)[0] and mf["position"] == len(ids)
    with torch.inference_mode():
        torch.testing.assert_close(t["target.logits"], target(torch.tensor([ids]))[0])
        full = ids + [mf["first_token"]] + mf["drafts"]
        torch.testing.assert_close(t["verify.logits"], target(torch.tensor([full]))[0, len(ids) :])
    assert [f"target.layer.{i}" in t for i in range(target.config.num_layers)] == [True] * target.config.num_layers
    assert not mf["centroid_head"] and "draft.0.centroid_top" not in t  # the embedded assistant has a dense head
    [read] = mf["kv_reads"]
    assert read["target_layer"] == target.config.store_layer(read["type"]) and read["positions"] == [0, len(ids)]
    # the manifest's round is the engine's first greedy round: t0, the accepted drafts, then the correction
    eng = minimtp.Engine(target, assistant, tokenizer=tok)
    chunks = []
    eng.generate(
        [ids], max_new_tokens=8, num_speculative_tokens=3, stop_token_ids=[], on_tokens=lambda i, t: chunks.append(t)
    )
    assert chunks[0] + chunks[1] == mf["emitted"]


def test_golden_records_the_centroid_selection(saved, tmp_path):
    """The e2b-shaped tiny pair has an ordered-embedding (centroid) head: the selected tokens are the kept
    centroids' rows of token_ordering, and the step's logits take their values there and min - 1 elsewhere."""
    tdir, adir = saved("e2b")
    target = minimtp.load_target(tdir)
    assistant = minimtp.load_assistant(adir, target)
    t, mf = golden.golden(target, assistant, [2, 17, 33, 101, 7, 9], 2)
    assert mf["centroid_head"]
    head = assistant.masked_embedding
    for j in range(2):
        top = t[f"draft.{j}.centroid_top"]
        assert top.shape == (1, head.K)
        assert torch.equal(t[f"draft.{j}.selected_tokens"], head.token_ordering.view(head.C, -1)[top].flatten(1))
        lg = t[f"draft.{j}.logits"][0]
        sel = t[f"draft.{j}.selected_tokens"][0]
        rest = torch.ones_like(lg, dtype=torch.bool)
        rest[sel] = False
        assert torch.all(lg[rest] == lg[sel].min() - 1)
    assert {r["type"] for r in mf["kv_reads"]} == set(assistant.config.text.layer_types)
    sliding = [r for r in mf["kv_reads"] if r["type"] == SLIDING][0]
    assert sliding["positions"] == [max(0, 6 - assistant.config.text.sliding_window - 1), 6]
