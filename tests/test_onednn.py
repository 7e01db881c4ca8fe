"""Prepacked oneDNN linears (minimtp.onednn): bit-identical to the default kernel, repacked after in-place updates,
state dict unchanged, and the engine's tokens unchanged."""

from __future__ import annotations

import pytest
import torch

import minimtp
from minimtp.onednn import PackedLinear, available, prepack_

pytestmark = pytest.mark.skipif(
    not available(torch.zeros(1, dtype=torch.bfloat16)), reason="this CPU/torch build has no oneDNN bfloat16"
)


@pytest.mark.parametrize("n, k", [(384, 384), (128, 384), (1536, 384), (384, 1536), (8192, 384), (100, 37), (7, 5)])
def test_packed_linear_is_bit_identical(n, k):
    g = torch.Generator().manual_seed(n + k)
    w = torch.randn(n, k, generator=g).to(torch.bfloat16)
    b = torch.randn(n, generator=g).to(torch.bfloat16)
    for bias in (None, b):
        lin = PackedLinear(w, bias)
        for shape in [(1, k), (4, k), (9, k), (2, 3, k)]:
            x = torch.randn(*shape, generator=g).to(torch.bfloat16)
            with torch.inference_mode():
                assert torch.equal(lin(x), torch.nn.functional.linear(x, w, bias)), (n, k, shape)


def test_repacks_after_in_place_update_and_keeps_training_path():
    w = torch.nn.Parameter(torch.randn(64, 32).to(torch.bfloat16), requires_grad=False)
    lin = PackedLinear(w)
    x = torch.randn(2, 32).to(torch.bfloat16)
    before = lin(x)
    with torch.no_grad():
        w.mul_(2)  # in place: the packed copy must follow
    assert torch.equal(lin(x), torch.nn.functional.linear(x, w)) and not torch.equal(lin(x), before)
    w.requires_grad_(True)
    y = lin(x)  # grad mode: ordinary kernel, gradients flow
    y.float().sum().backward()
    assert w.grad is not None and w.grad.shape == w.shape


@pytest.mark.parametrize("family", ["e2b", "moe", "dense"])
def test_prepacked_target_is_bit_identical(saved, family):
    """Packed and fused matmuls, the one-call head norms and RoPE: the same logits bit for bit (KV sharing, K=V,
    MoE and PLE layers included)."""
    target = minimtp.load_target(saved(family)[0], dtype=torch.bfloat16)
    keys = sorted(target.state_dict())
    ids = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ref = target(ids)
        assert target.prepack() > 0
        assert isinstance(target.model.layers[0].mlp.gate_proj, PackedLinear)
        assert any(layer.self_attn.fused is not None for layer in target.model.layers)
        assert torch.equal(target(ids), ref)
    assert sorted(target.state_dict()) == keys  # same checkpoint names; the packed head is not a parameter


def test_fp32_modules_are_left_alone():
    m = torch.nn.Sequential(torch.nn.Linear(8, 8))
    assert prepack_(m) == 0 and type(m[0]) is torch.nn.Linear


def test_engine_tokens_same_with_and_without_prepack(saved):
    tdir, adir = saved("e2b")
    prompts = [[5, 9, 33, 7], [100, 3, 250, 17, 8, 1, 60]]
    outs = []
    for prepack in (False, True):
        target = minimtp.load_target(tdir, dtype=torch.bfloat16)
        assistant = minimtp.load_assistant(adir, target)
        engine = minimtp.Engine(target, assistant, prepack=prepack)
        outs.append(engine.generate(prompts, 40, num_speculative_tokens=3, stop_token_ids=[]).tokens)
    assert outs[0] == outs[1]


def test_fused_projections_follow_their_sources():
    """q/k/v (and gate/up) fused into one packed matmul: bit-identical to the separate linears, no parameters of
    its own, repacked when a source weight changes in place."""
    lins = [torch.nn.Linear(32, n, bias=False).to(torch.bfloat16).requires_grad_(False) for n in (48, 16, 16)]
    fused = PackedLinear.fused(lins)
    assert fused.sizes == [48, 16, 16] and list(fused.parameters()) == []
    x = torch.randn(3, 32).to(torch.bfloat16)
    want = torch.cat([m(x) for m in lins], -1)
    with torch.inference_mode():
        assert torch.equal(fused(x), want)
    with torch.no_grad():
        lins[1].weight.mul_(-1)
    with torch.inference_mode():
        assert torch.equal(fused(x), torch.cat([m(x) for m in lins], -1))


def test_model_loaded_under_inference_mode(saved):
    """Weights created under torch.inference_mode have no version counter; prepacking must still work."""
    tdir, adir = saved("e2b")
    prompts = [[5, 9, 33, 7]]
    with torch.inference_mode():
        target = minimtp.load_target(tdir, dtype=torch.bfloat16)
        assistant = minimtp.load_assistant(adir, target)
        fast = minimtp.Engine(target, assistant).generate(prompts, 12, num_speculative_tokens=3, stop_token_ids=[])
    plain = minimtp.Engine(minimtp.load_target(tdir, dtype=torch.bfloat16), prepack=False).generate(
        prompts, 12, stop_token_ids=[]
    )
    assert fast.tokens == plain.tokens
