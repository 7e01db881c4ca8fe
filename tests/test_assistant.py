"""minimtp's Gemma 4 assistant against transformers' Gemma4AssistantForCausalLM (patched by ``minimtp.hf_compat``) and
Gemma4UnifiedAssistantForCausalLM (the 12B's drafter, for the unified families),
fed the same inputs (docs: concepts/gemma4-assistant, "Clean semantics, and transformers' off-by-one"), and
load_assistant's compatibility checks."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from support.drafting import S, hf_pair, hf_steps, hf_target_states, mt_steps, prompt
from support.hf_models import TARGET_KW

import minimtp
from minimtp.assistant import CentroidHead, check_pair
from minimtp.attention import DraftDenseContext
from minimtp.config import FULL, SLIDING, load_assistant_config

FAMILIES = ["e2b", "moe", "dense", "unified", "unified_shared"]
TOL = 1e-4


@pytest.mark.smoke
@pytest.mark.parametrize("ordered", [True, False], ids=["centroid", "dense_head"])
@pytest.mark.parametrize("family", FAMILIES)
def test_step_matches_transformers(assistant_dir, family, ordered):
    tdir, adir = assistant_dir(family, ordered)
    target = minimtp.load_target(tdir)
    assistant = minimtp.load_assistant(adir, target)
    assert isinstance(assistant, minimtp.Gemma4Assistant)
    assert assistant.config.use_ordered_embeddings == ordered
    assert isinstance(getattr(assistant, "masked_embedding", None), CentroidHead) == ordered
    hf_t, hf_a = hf_pair(family, ordered)
    ids = prompt()
    out = hf_target_states(hf_t, ids)
    p = S - 1  # the recipe: position 29, hidden state of 28, K/V of positions < 29
    want = hf_steps(hf_a, hf_t, ids, out, p)
    for cut in (True, False):  # the mask alone must hide positions >= p
        got = mt_steps(assistant, target, ids, p, cut=cut)
        for j, ((gl, gh), (wl, wh)) in enumerate(zip(got, want)):
            assert gl.shape == wl.shape == (512,)
            assert gh.shape == wh.shape == (64,)
            assert (gl - wl).abs().max().item() <= TOL, (j, cut)
            assert (gh - wh).abs().max().item() <= TOL, (j, cut)
    assert want[0][0].abs().max().item() > 1.0  # logits large enough for 1e-4 to mean something
    if ordered:  # non-selected tokens get the finite value min(selected) - 1
        logits = want[0][0]
        assert torch.isfinite(logits).all()
        assert (logits == logits.min()).sum().item() == 512 - 4 * 512 // 16


@pytest.mark.parametrize("family", ["e2b", "moe", "unified_shared"])
def test_several_positions_at_once(assistant_dir, family):
    """DraftDenseContext with many queries (distillation form) equals one transformers call per position,
    including p < W (no window mask in transformers) and p = W + 1 (the window boundary)."""
    tdir, adir = assistant_dir(family, family == "e2b")
    target = minimtp.load_target(tdir)
    assistant = minimtp.load_assistant(adir, target)
    hf_t, hf_a = hf_pair(family, family == "e2b")
    ids = prompt()
    out = hf_target_states(hf_t, ids)
    ps = [3, 8, 9, 10, 17, 29]
    _, hidden, kv = target.forward_with_kv(ids)
    ctx = DraftDenseContext(assistant.config.text, kv, torch.tensor([ps]))
    logits, proj = assistant.step(target.embed(ids[0, ps]), hidden[0, [p - 1 for p in ps]], torch.tensor(ps), ctx)
    for r, p in enumerate(ps):
        (wl, wh) = hf_steps(hf_a, hf_t, ids, out, p, steps=1)[0]
        if assistant.config.use_ordered_embeddings:  # the fill value is per row in minimtp, per batch in HF
            sel = wl > wl.min()
            assert torch.equal(sel, logits[r] > logits[r].min()), p
            assert (logits[r][sel] - wl[sel]).abs().max().item() <= TOL, p
        else:
            assert (logits[r] - wl).abs().max().item() <= TOL, p
        assert (proj[r] - wh).abs().max().item() <= TOL, p


def test_sliding_window_is_last_w_plus_1(assistant_dir):
    """Corrupting sliding K/V older than the last W+1 entries changes nothing; entry p-(W+1) changes the logits."""
    tdir, adir = assistant_dir("dense", False)
    target = minimtp.load_target(tdir)
    assistant = minimtp.load_assistant(adir, target)
    ids, p, W = prompt(), 29, TARGET_KW["dense"]["sliding_window"]
    _, hidden, kv = target.forward_with_kv(ids)

    def run(kv):
        ctx = DraftDenseContext(assistant.config.text, kv, torch.tensor([[p]]))
        return assistant.step(target.embed(ids[0, p : p + 1]), hidden[0, p - 1 : p], torch.tensor([p]), ctx)[0]

    base = run(kv)

    def corrupt(j):
        k, v = (t.clone() for t in kv[SLIDING])
        k[:, j] += 5.0
        v[:, j] -= 5.0
        return {**kv, SLIDING: (k, v)}

    assert torch.equal(run(corrupt(p - (W + 2))), base)
    assert not torch.allclose(run(corrupt(p - (W + 1))), base)
    assert torch.equal(run(corrupt(p)), base)  # position p itself is not visible


# ---------------------------------------------------------------------------------------------------------------
# load_assistant compatibility checks
# ---------------------------------------------------------------------------------------------------------------


def edited_assistant(src: str, dst, edit) -> str:
    dst = str(dst)
    shutil.copytree(src, dst)
    path = os.path.join(dst, "config.json")
    with open(path) as f:
        d = json.load(f)
    edit(d)
    with open(path, "w") as f:
        json.dump(d, f)
    return dst


def _set_full(d, **kw):
    t = d["text_config"]
    full = str(t["layer_types"].index(FULL))
    plc = t.setdefault("per_layer_config", {})
    plc.setdefault(full, {}).update(kw)


CASES = {
    # name: (family, edit, field named in the message, assistant value, target value)
    "vocab_size": ("e2b", lambda d: d["text_config"].update(vocab_size=256), "vocab_size", "256", "512"),
    "backbone_hidden_size": ("moe", lambda d: d.update(backbone_hidden_size=48), "backbone_hidden_size", "48", "64"),
    "sliding_head_dim": (
        "dense",
        lambda d: d["text_config"].update(head_dim=8),
        "sliding_attention head_dim",
        "8",
        "16",
    ),
    "full_head_dim": ("e2b", lambda d: _set_full(d, head_dim=64), "full_attention head_dim", "64", "32"),
    "sliding_kv_heads": (
        "e2b",
        lambda d: (d["text_config"].update(num_key_value_heads=1), _set_full(d, num_key_value_heads=2)),
        "sliding_attention num_key_value_heads",
        "1",
        "2",
    ),
    "full_kv_heads": (
        "moe",
        lambda d: _set_full(d, num_key_value_heads=2),
        "full_attention num_key_value_heads",
        "2",
        "1",
    ),
    "k_eq_v_missing": (
        "dense",
        lambda d: d["text_config"].update(attention_k_eq_v=False),
        "attention_k_eq_v",
        "False",
        "True",
    ),
    "unified_full_kv_heads": (
        "unified",
        lambda d: _set_full(d, num_key_value_heads=2),
        "full_attention num_key_value_heads",
        "2",
        "1",
    ),
    "k_eq_v_extra": (
        "e2b",
        lambda d: d["text_config"].update(attention_k_eq_v=True),
        "attention_k_eq_v",
        "True",
        "False",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_compatibility_errors(saved, tmp_path, case):
    family, edit, field, a_val, t_val = CASES[case]
    tdir, adir = saved(family)
    target = minimtp.load_target(tdir)
    bad = edited_assistant(adir, tmp_path / "a", edit)
    with pytest.raises(minimtp.CompatibilityError) as e:
        minimtp.load_assistant(bad, target)
    msg = str(e.value)
    assert "\n" not in msg, msg
    assert field in msg and bad in msg, msg
    # both values named, the assistant's first ("is X in the assistant but Y in the target")
    assert f"is {a_val} in the assistant" in msg and f"{t_val} in the target" in msg, msg
    # the unedited pair is fine
    check_pair(target.config, load_assistant_config(adir))


def test_assistant_of_another_family(saved):
    target = minimtp.load_target(saved("e2b")[0])
    with pytest.raises(minimtp.CompatibilityError) as e:
        minimtp.load_assistant(saved("moe")[1], target)
    assert "\n" not in str(e.value) and "in the target" in str(e.value)


def test_engine_rejects_mismatched_pair(saved):
    e2b = minimtp.load_target(saved("e2b")[0])
    moe = minimtp.load_target(saved("moe")[0])
    assistant = minimtp.load_assistant(saved("moe")[1], moe)
    with pytest.raises(minimtp.CompatibilityError) as e:
        minimtp.Engine(e2b, assistant)
    assert "\n" not in str(e.value)


def test_target_dir_as_assistant(saved):
    target = minimtp.load_target(saved("e2b")[0])
    with pytest.raises(minimtp.ConfigError) as e:
        minimtp.load_assistant(saved("e2b")[0], target)
    msg = str(e.value)
    assert "\n" not in msg and "gemma4_text" in msg and "assistant" in msg, msg


def test_assistant_missing_tensor(saved, tmp_path):
    from safetensors.torch import load_file, save_file

    target = minimtp.load_target(saved("e2b")[0])
    dst = str(tmp_path / "a")
    shutil.copytree(saved("e2b")[1], dst)
    f = os.path.join(dst, "model.safetensors")
    sd = load_file(f)
    del sd["pre_projection.weight"]
    save_file(sd, f, metadata={"format": "pt"})
    with pytest.raises(minimtp.CheckpointError) as e:
        minimtp.load_assistant(dst, target)
    msg = str(e.value)
    assert "\n" not in msg and "pre_projection.weight" in msg and "(32, 128)" in msg, msg


def test_dtype_follows_target(saved):
    target = minimtp.load_target(saved("dense")[0], dtype=torch.bfloat16)
    a = minimtp.load_assistant(saved("dense")[1], target)
    assert a.pre_projection.weight.dtype == torch.bfloat16
    a32 = minimtp.load_assistant(saved("dense")[1], target, dtype="float32")
    assert a32.pre_projection.weight.dtype == torch.float32
    e2b = minimtp.load_assistant(saved("e2b")[1], minimtp.load_target(saved("e2b")[0]), dtype="bf16")
    assert e2b.masked_embedding.token_ordering.dtype == torch.int64  # integer buffers keep their dtype


@pytest.mark.parametrize("dtype, tol", [("float16", 0.01), ("bfloat16", 0.03)])
@pytest.mark.parametrize("ordered", [True, False], ids=["centroid", "dense_head"])
def test_cheaper_drafters_stay_close(assistant_dir, ordered, dtype, tol):
    """Half-precision drafting (fp32 target) stays within a few percent of the fp32 drafter (relative L2 error of the
    logits and recurrent state over two steps). Measured on these models: at most 0.0022 (float16, 10 mantissa
    bits) and 0.024 (bfloat16, 7 bits); the bounds leave 1.2-4.5x room. Exactness never depends on it; acceptance
    does. (The int8 drafter of the fast path: tests/test_fast.py.)"""
    tdir, adir = assistant_dir("e2b", ordered)
    target = minimtp.load_target(tdir)
    ref = mt_steps(minimtp.load_assistant(adir, target), target, prompt(), S - 1)
    cheap = minimtp.load_assistant(adir, target, dtype=dtype)
    assert cheap.pre_projection.weight.dtype == getattr(torch, dtype)
    got = mt_steps(cheap, target, prompt(), S - 1)
    for (gl, gh), (wl, wh) in zip(got, ref):
        assert ((gh.float() - wh).norm() / wh.norm()).item() <= tol, dtype  # the recurrent state
        if ordered:  # a slightly different score can swap a kept cluster (a jump of the logits): compare the
            both = (gl.float() > gl.float().min()) & (wl > wl.min())  # tokens both kept
            assert both.sum().item() >= 0.5 * (wl > wl.min()).sum().item()
            gl, wl = gl[both], wl[both]
        err = ((gl.float() - wl).norm() / wl.norm()).item()
        assert err <= tol, (dtype, err)


def test_unified_assistant_defaults(tmp_path):
    """gemma4_unified_assistant: fields a config omits take Gemma4UnifiedAssistantConfig's defaults (backbone 3840,
    a gemma4_unified_text text_config: W = 1024); gemma4_assistant keeps its own (backbone 1536, W = 512)."""
    from transformers import Gemma4AssistantConfig, Gemma4UnifiedAssistantConfig

    text = dict(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4)
    got = {}
    for mt in ("gemma4_unified_assistant", "gemma4_assistant"):
        os.makedirs(tmp_path / mt)
        with open(tmp_path / mt / "config.json", "w") as f:
            json.dump({"model_type": mt, "text_config": text}, f)
        got[mt] = load_assistant_config(str(tmp_path / mt))
    u, g = got["gemma4_unified_assistant"], got["gemma4_assistant"]
    assert u.backbone_hidden_size == Gemma4UnifiedAssistantConfig.backbone_hidden_size == 3840
    assert g.backbone_hidden_size == Gemma4AssistantConfig.backbone_hidden_size == 1536
    assert (u.text.sliding_window, g.text.sliding_window) == (1024, 512)
    assert u.text.num_kv_shared_layers == u.text.num_layers == 4 and u.text.hidden_size_per_layer_input == 0
    with open(tmp_path / "gemma4_unified_assistant" / "config.json", "w") as f:
        json.dump({"model_type": "gemma4_unified_assistant", "text_config": dict(text, model_type="llama")}, f)
    with pytest.raises(minimtp.ConfigError) as e:
        load_assistant_config(str(tmp_path / "gemma4_unified_assistant"))
    assert "\n" not in str(e.value) and "'llama'" in str(e.value) and "gemma4_unified_text" in str(e.value)
