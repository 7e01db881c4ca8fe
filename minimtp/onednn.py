"""Prepacked oneDNN linears: the bfloat16 CPU fast path for decoding.

Decoding multiplies one row (plain decoding) or k+1 rows (verification) by every weight matrix, so a step costs
about (bytes of weights) / (speed at which the matmul kernel streams them). torch's default CPU kernel for a
bfloat16 matmul with a few rows streams about 6 GB/s on the benchmark machine; oneDNN, with each weight reordered
once into its blocked layout, streams 13-16 GB/s and returns **bit-identical** results (tests/test_onednn.py).
This is what ``torch.compile`` does when it freezes a bfloat16 model on CPU (weight prepacking); here it is done
eagerly, once, when the :class:`~minimtp.engine.Engine` is built.

The original weight stays the module's parameter (same state-dict keys, tied weights still shared); the packed
copy is derived from it and re-derived if the weight is modified in place.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def available(weight: torch.Tensor) -> bool:
    """True for a bfloat16 CPU weight when this torch build has oneDNN with bfloat16 support."""
    return (
        weight.device.type == "cpu"
        and weight.dtype == torch.bfloat16
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
        and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    )


class PackedLinear(nn.Module):
    """``y = x Wᵀ (+ b)`` through oneDNN with W prepacked; drop-in for an ``nn.Linear`` (same parameters)."""

    def __init__(self, weight: nn.Parameter | torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.weight, self.bias = weight, bias
        self.out_features, self.in_features = weight.shape
        self._packed, self._version = None, -1

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> PackedLinear:
        return cls(linear.weight, linear.bias)

    def packed(self) -> torch.Tensor:
        if self._version != self.weight._version or self._packed is None:  # (re)pack after an in-place update
            with torch.no_grad():
                self._packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), 1)
            self._version = self.weight._version
        return self._packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != self.weight.dtype or (torch.is_grad_enabled() and self.weight.requires_grad):
            return F.linear(x, self.weight, self.bias)  # training / mixed dtypes: the ordinary kernel
        lead = x.shape[:-1]
        y = torch.ops.mkldnn._linear_pointwise(
            x.reshape(-1, self.in_features), self.packed(), self.bias, "none", [], ""
        )
        return y.view(*lead, self.out_features)


def prepack_(module: nn.Module) -> int:
    """Replace every bfloat16 CPU ``nn.Linear`` inside ``module`` by a :class:`PackedLinear`, in place.
    Returns how many were replaced (0 where oneDNN cannot be used)."""
    n = 0
    for name, child in list(module.named_children()):
        if type(child) is nn.Linear and available(child.weight):
            setattr(module, name, PackedLinear.from_linear(child))
            n += 1
        else:
            n += prepack_(child)
    return n
