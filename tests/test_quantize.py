"""Weight-only int8 linears for the drafter (minimtp.quantize)."""

from __future__ import annotations

import pytest
import torch

from minimtp.quantize import Int8Linear, quantize_int8_


@pytest.mark.parametrize(
    "n, k, kernel",
    [(64, 32, True), (8192, 256, True), (384, 768, True), (48, 40, False), (5, 7, False)],
)
@pytest.mark.parametrize("m", [1, 3, 8])
def test_int8_linear_matches_its_dequantized_weight(n, k, m, kernel):
    """y = (x Qᵀ) ⊙ s equals x · dequantized(W)ᵀ up to bfloat16 rounding of x and y (relative 1e-2), for shapes
    the packed kernel takes (K % 32 == 0) and for the dequantize-on-the-fly fallback."""
    g = torch.Generator().manual_seed(n * 31 + k)
    w, b = torch.randn(n, k, generator=g), torch.randn(n, generator=g)
    lin = Int8Linear(w, b)
    assert lin.use_kernel == kernel
    assert lin.qweight.dtype == torch.int8 and lin.qweight.abs().max().item() == 127
    x = torch.randn(2, m, k, generator=g)
    y = lin(x)
    assert y.shape == (2, m, n) and y.dtype == torch.bfloat16
    ref = x.to(torch.bfloat16).float() @ lin.dequantized().T + b.to(torch.bfloat16).float()
    assert ((y.float() - ref).norm() / ref.norm()).item() < 1e-2
    # and the quantization itself is faithful: per weight, half a step (s/2) of rounding plus the bfloat16
    # rounding of the scale s (relative 2^-8, the kernel takes scales in the activation dtype)
    step = w.abs().amax(1, keepdim=True) / 127
    assert ((lin.dequantized() - w).abs() <= step * (0.5 + lin.qweight.abs().float() * 2**-8) + 1e-6).all()


def test_quantize_module_in_place():
    m = torch.nn.Sequential(torch.nn.Linear(32, 64, bias=False), torch.nn.LayerNorm(64), torch.nn.Linear(64, 32))
    x = torch.randn(4, 32)
    ref = m(x)
    quantize_int8_(m)
    assert isinstance(m[0], Int8Linear) and isinstance(m[2], Int8Linear)
    assert m[1].weight.dtype == torch.bfloat16
    y = m(x.to(torch.bfloat16))
    assert ((y.float() - ref).norm() / ref.norm()).item() < 0.03


def test_int8_drafter_keeps_its_fused_matmul_under_prepack(saved):
    """The Engine prepacks bf16 linears; a quantized drafter's fused int8 gate/up must not be replaced by a bf16 one
    built from the (unused, unquantized) source linears."""
    import minimtp

    target = minimtp.load_target(saved("dense")[0], dtype=torch.bfloat16)
    assistant = minimtp.load_assistant(saved("dense")[1], target, dtype="int8")
    minimtp.Engine(target, assistant)
    for layer in assistant.model.layers:
        assert isinstance(layer.mlp.fused, Int8Linear)
