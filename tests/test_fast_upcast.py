"""The float32-tiled bfloat16 linear (minimtp.fast.upcast) against the reference kernel it twins: bit-identical below
MIN_ROWS rows; above, every output within the bound that float32 accumulation and one rounding to bfloat16 allow
(the bound the reference kernel meets too), and a whole bfloat16 target as close to its float32 self as the
reference is."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import minimtp
from minimtp.fast import optimize, upcast
from minimtp.fast.swap import swap_
from minimtp.fast.upcast import UpcastLinear, UpcastUnembedding, upcast_, upcast_linear


def bf16_error_bound(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None):
    """(exact, allowed |y - exact|) for y = bf16(float32 sum of x_i w_i (+ b)): half a bf16 ulp of the exact value
    (the final rounding) plus (k + 1) · 2⁻²⁴ · (Σ|x_i w_i| + |b|) (float32 accumulation in any order), in float64."""
    bd = None if b is None else b.double()
    exact = F.linear(x.double(), w.double(), bd)
    ulp = torch.exp2(torch.floor(torch.log2(exact.abs().clamp_min(2.0**-126))) - 7)
    mag = F.linear(x.double().abs(), w.double().abs(), None if bd is None else bd.abs())
    return exact, ulp / 2 + (w.shape[1] + 1) * 2.0**-24 * mag


@pytest.mark.parametrize("n, k", [(100, 37), (513, 300), (7, 5), (3072, 256), (384, 1536)])
@pytest.mark.parametrize("rows", [1, 5, 7, 8, 9, 40])
def test_upcast_linear_within_the_bf16_bound(monkeypatch, n, k, rows):
    """Small tiles (16 KB) so that every weight is cut into several tiles, the last one ragged."""
    monkeypatch.setattr(upcast, "TILE_BYTES", 16 << 10)
    g = torch.Generator().manual_seed(n * 1000 + k + rows)
    w = torch.randn(n, k, generator=g).to(torch.bfloat16)
    shape = (2, rows // 2, k) if rows % 2 == 0 else (rows, k)  # a leading batch dimension too
    x = torch.randn(*shape, generator=g).to(torch.bfloat16)
    y, ref = upcast_linear(x, w), F.linear(x, w)
    assert y.shape == ref.shape == (*shape[:-1], n) and y.dtype == torch.bfloat16 and y.is_contiguous()
    if rows < upcast.MIN_ROWS:
        assert torch.equal(y, ref)  # the reference kernel itself
        return
    exact, bound = bf16_error_bound(x, w)
    assert ((y.double() - exact).abs() <= bound).all()
    assert ((ref.double() - exact).abs() <= bound).all()  # the reference meets the same bound
    assert (y == ref).double().mean() >= 0.99  # they differ only where an output sits near a rounding boundary


def test_upcast_linear_bias_and_fallbacks():
    g = torch.Generator().manual_seed(1)
    lin = nn.Linear(64, 200).to(torch.bfloat16)
    x = torch.randn(16, 64, generator=g).to(torch.bfloat16)
    twin = UpcastLinear(lin.weight, lin.bias)
    with torch.no_grad():
        y, ref = twin(x), lin(x)
        exact, bound = bf16_error_bound(x, lin.weight, lin.bias)
    assert ((y.double() - exact).abs() <= bound).all() and ((ref.double() - exact).abs() <= bound).all()
    assert (y == ref).double().mean() >= 0.99
    # training (grad enabled, weight requires grad) and mixed dtypes take the reference kernel: equal, differentiable
    y = twin(x)
    assert torch.equal(y, lin(x)) and y.requires_grad
    y.float().sum().backward()
    assert lin.weight.grad is not None
    xf = x.float()
    with torch.no_grad():
        with pytest.raises(RuntimeError):  # the reference's own error for mixed dtypes, unchanged
            F.linear(xf, lin.weight)
        with pytest.raises(RuntimeError):
            twin(xf)


def test_upcast_swaps_bf16_cpu_linears_only():
    m = nn.Sequential(nn.Linear(8, 8).to(torch.bfloat16), nn.Linear(8, 8), nn.Sequential(nn.Linear(8, 4).bfloat16()))
    state = m.state_dict()
    n = upcast_(m)
    if upcast.applies(torch.zeros(1, dtype=torch.bfloat16)):
        assert n == 2 and [type(x) for x in (m[0], m[1], m[2][0])] == [UpcastLinear, nn.Linear, UpcastLinear]
    else:  # oneDNN has bf16 here: the prepacked twin is the fast one, this one is not used
        assert n == 0
    after = m.state_dict()
    assert list(after) == list(state) and all(after[k].data_ptr() == state[k].data_ptr() for k in state)


@pytest.mark.parametrize("family", ["e2b", "moe", "dense"])
def test_upcast_target_as_close_to_float32_as_the_reference(saved, family):
    """A bf16 target with every linear and the head upcast (forced, whatever this CPU has): its logits over 2 × 12
    prompt rows are about as far from the float32 model's as the reference bf16 model's are. Both are bf16 models
    rounding differently; measured over 3 seeds × these 3 families, the ratio of the max errors was 1.00–1.17, so the
    bound is 1.25×. It keeps the float32 argmax at all but at most two more positions than the reference does."""
    tdir = saved(family)[0]
    ids = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        exact = minimtp.load_target(tdir, dtype=torch.float32)(ids)
        target = minimtp.load_target(tdir, dtype=torch.bfloat16)
        ref = target(ids).float()
        n = swap_(target, lambda m: UpcastLinear(m.weight, m.bias) if type(m) is nn.Linear else None)
        target.unembed = UpcastUnembedding()
        assert n > 0
        fast = target(ids).float()
    err_ref, err_fast = (ref - exact).abs().max().item(), (fast - exact).abs().max().item()
    assert err_fast <= 1.25 * err_ref, (err_fast, err_ref)
    kept = [(out.argmax(-1) == exact.argmax(-1)).sum().item() for out in (ref, fast)]
    assert kept[1] >= kept[0] - 2, kept


def test_optimize_uses_upcast_where_onednn_has_no_bf16(saved):
    target = minimtp.load_target(saved("e2b")[0], dtype=torch.bfloat16)
    optimize(target)
    kinds = {type(m) for m in target.modules()}
    if upcast.applies(target.model.norm.weight):
        assert UpcastLinear in kinds and isinstance(target.unembed, UpcastUnembedding)
        assert nn.Linear not in kinds
    else:
        assert UpcastLinear not in kinds
