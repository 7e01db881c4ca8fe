"""Random-weight checkpoints of the real sizes (``python -m minimtp.bench realsize``; minimtp/bench/realsize.py).

Default run: the sizes counted on the meta device (E2B's 4.63 B text parameters), the depth-reduction rule and the
one-line errors. Slow: a reduced-depth, real-width E2B pair (10 layers, 5 KV-shared; the full 262,144-token
vocabulary, head dims 256 / 512, the per-layer embeddings and the 2,048-centroid head) built in float32 in the
real multimodal sharded layout, then minimtp against transformers' ``Gemma4ForConditionalGeneration`` and
``Gemma4AssistantForCausalLM`` read from the same files: logits, cached vs uncached decode, greedy speculative ==
plain == transformers, the assistant's drafting steps. The two sides are loaded one after the other (about 9 GB
each at most), never together.
"""

from __future__ import annotations

import gc
import json
import os
import shutil

import pytest
import torch
from support.drafting import hf_steps, hf_target_states, mt_steps

import minimtp
from minimtp.bench import realsize as rs
from minimtp.config import FULL, SLIDING

S, NEW, LAYERS = 12, 8, 10  # prompt tokens, new tokens, target depth
TOL = 1e-4


def test_e2b_sizes_as_published():
    (row,) = rs.sizes(["e2b"])
    t, a = row["target"], row["assistant"]
    assert abs(t["params"] / 4.63e9 - 1) < 0.02  # text decoder, tied head counted once
    assert abs(t["ple"] / 2.35e9 - 1) < 0.02
    assert abs(a["params"] / 78e6 - 1) < 0.05
    assert t["bf16"] == pytest.approx(2 * t["params"], rel=1e-3)
    table = rs.sizes_markdown([row], ram=24 * 10**9)
    assert "| E2B | 4.63 B | 2.35 B | 9.3 GB |" in table and "yes, bf16" in table


def test_reduced_depth_keeps_the_pattern_and_scales_sharing():
    kw = rs.text_kwargs("e2b", LAYERS)
    assert kw["layer_types"] == ([SLIDING] * 4 + [FULL]) * 2
    assert kw["num_kv_shared_layers"] == 5  # round(10 · 20 / 35) = 6 would leave no full layer unshared
    assert rs.text_kwargs("e2b")["num_kv_shared_layers"] == 20
    assert rs.text_kwargs("e4b", 12)["num_kv_shared_layers"] == 5  # round(12 · 18 / 42); stores 4 and 5 remain
    assert rs.text_kwargs("e2b", 2)["num_kv_shared_layers"] == 0  # [s, f]: nothing can be shared


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--family", "e9b"], "--family 'e9b': expected one of e2b, e4b"),
        (["--family", "e2b", "--layers", "1"], "--layers 1: expected 2..35"),
        (["--family", "e2b", "--dtype", "int8"], "--dtype 'int8': expected bfloat16 or float32"),
        (["--family", "e2b", "--out", "FILE/sub"], "cannot write the checkpoints there"),
    ],
)
def test_errors_are_one_line(tmp_path, capsys, argv, needle):
    (tmp_path / "FILE").write_text("")
    argv = [a.replace("FILE", str(tmp_path / "FILE")) for a in argv]
    out = [] if "--out" in argv else ["--out", str(tmp_path / "out")]
    assert rs.main(["build", *argv, *out]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and needle in err, err
    assert not (tmp_path / "out" / "target").exists()


# ---------------------------------------------------------------------------------------------------------------
# slow: a real-width E2B, minimtp vs transformers
# ---------------------------------------------------------------------------------------------------------------


def prompt() -> torch.Tensor:
    return torch.randint(3, 262144, (1, S), generator=torch.Generator().manual_seed(5))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("realsize")
    argv = ["build", "--family", "e2b", "--out", str(out), "--layers", str(LAYERS), "--dtype", "float32"]
    assert rs.main([*argv, "--shard-gb", "2", "--no-check"]) == 0
    yield str(out / "target"), str(out / "assistant")
    shutil.rmtree(out, ignore_errors=True)  # ~8.6 GB


@pytest.fixture(scope="module")
def ours(built):
    tdir, adir = built
    target = minimtp.load_target(tdir, dtype="float32")
    assistant = minimtp.load_assistant(adir, target)
    ids = prompt()
    gen = dict(max_new_tokens=NEW, temperature=0.0, stop_token_ids=[])
    with torch.inference_mode():
        plain = minimtp.Engine(target).generate(ids.tolist(), **gen)
        spec = minimtp.Engine(target, assistant).generate(ids.tolist(), num_speculative_tokens=3, **gen)
        full = target(torch.tensor([ids[0].tolist() + plain.tokens[0]]))[0]  # uncached, prompt + continuation
        res = dict(
            config=target.config,
            logits=target(ids)[0],
            plain=plain.tokens[0],
            uncached=full[S - 1 : -1].argmax(-1).tolist(),
            gaps=full[S - 1 : -1].topk(2, -1).values.diff(dim=-1).abs().squeeze(-1),
            spec=spec.tokens[0],
            drafted=spec.stats.drafted,
            steps=mt_steps(assistant, target, ids, S - 1),
            ordered=assistant.config.use_ordered_embeddings,
        )
    del target, assistant, full
    gc.collect()
    return res


@pytest.fixture(scope="module")
def theirs(built, ours):  # after ``ours`` has freed its models
    from transformers import Gemma4AssistantForCausalLM, Gemma4ForConditionalGeneration

    tdir, adir = built
    hf = Gemma4ForConditionalGeneration.from_pretrained(tdir, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None
    ids = prompt()
    out = hf_target_states(hf, ids)
    with torch.no_grad():
        greedy = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=NEW)
    hfa = Gemma4AssistantForCausalLM.from_pretrained(adir, dtype=torch.float32).eval()
    res = dict(logits=out.logits[0].float(), greedy=greedy[0, S:].tolist(), steps=hf_steps(hfa, hf, ids, out, S - 1))
    del hf, hfa, out
    gc.collect()
    return res


@pytest.mark.slow
def test_layout_is_the_published_one(built):
    tdir, adir = built
    index = json.load(open(os.path.join(tdir, "model.safetensors.index.json")))
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert index["metadata"]["total_size"] == sum(os.path.getsize(os.path.join(tdir, s)) for s in shards) - sum(
        8 + int.from_bytes(open(os.path.join(tdir, s), "rb").read(8), "little") for s in shards
    )  # the files are the tensors plus their headers
    keys = index["weight_map"]
    for prefix in ("model.language_model.layers.", "model.vision_tower.", "model.audio_tower.", "model.embed_vision."):
        assert any(k.startswith(prefix) for k in keys), prefix
    assert "lm_head.weight" not in keys and "model.language_model.embed_tokens_per_layer.weight" in keys
    cfg = json.load(open(os.path.join(tdir, "config.json")))
    assert cfg["model_type"] == "gemma4" and {"text_config", "vision_config", "audio_config"} <= set(cfg)
    gen = json.load(open(os.path.join(tdir, "generation_config.json")))
    assert (gen["do_sample"], gen["temperature"], gen["top_k"], gen["top_p"]) == (True, 1.0, 64, 0.95)
    assert os.listdir(adir) and sorted(os.listdir(adir)) == ["config.json", "model.safetensors"]
    assert json.load(open(os.path.join(adir, "config.json")))["model_type"] == "gemma4_assistant"


@pytest.mark.slow
def test_real_width_config(ours):
    c = ours["config"]
    assert (c.vocab_size, c.hidden_size, c.num_layers, c.num_kv_shared_layers) == (262144, 1536, LAYERS, 5)
    assert (c.type_head_dim(SLIDING), c.type_head_dim(FULL), c.hidden_size_per_layer_input) == (256, 512, 256)
    assert c.kv_modes.count("store") == 2 and c.layer_intermediate(LAYERS - 1) == 12288
    assert ours["ordered"]


@pytest.mark.slow
def test_logits_match_transformers(ours, theirs):
    got, want = ours["logits"], theirs["logits"]
    assert got.shape == want.shape == (S, 262144)
    assert (got - want).abs().max().item() <= TOL
    assert 2.0 < want.std(-1).mean().item() < 10.0  # a few nats: not degenerate, not saturated by the softcap


@pytest.mark.slow
def test_cached_decode_equals_uncached_forward(ours):
    assert ours["uncached"] == ours["plain"]
    assert ours["gaps"].min().item() > 1e-3  # no near-tie that float32 rounding could flip


@pytest.mark.slow
def test_greedy_speculative_equals_plain_equals_transformers(ours, theirs):
    assert len(ours["plain"]) == NEW
    assert ours["spec"] == ours["plain"] == theirs["greedy"]
    assert ours["drafted"] > 0


@pytest.mark.slow
def test_assistant_steps_match_transformers(ours, theirs):
    for j, ((gl, gh), (wl, wh)) in enumerate(zip(ours["steps"], theirs["steps"])):
        assert gl.shape == wl.shape == (262144,) and gh.shape == wh.shape == (1536,)
        assert (gl - wl).abs().max().item() <= TOL, j
        assert (gh - wh).abs().max().item() <= TOL, j
    logits = theirs["steps"][0][0]
    assert (logits > logits.min()).sum().item() == 32 * 262144 // 2048  # the centroid head scored 32 clusters
