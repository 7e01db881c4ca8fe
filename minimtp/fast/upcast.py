"""The bfloat16 CPU twin of ``nn.Linear`` (and of the head) for many rows, on CPUs where oneDNN has no bfloat16
matmul (AVX2 without AVX-512 bf16 or AMX).

There torch's eager bfloat16 matmul works row by row: it streams the whole weight once per input row, so a prefill
of 512 tokens or a verification of 8 costs about 512 or 8 one-row steps. This twin multiplies in float32 instead,
one tile of about ``TILE_BYTES`` of output rows at a time: each tile of W is converted to float32 into a buffer that
stays in cache, and the float32 rows of x are multiplied by it,

    y = bf16( float32(x) · float32(W_tile)ᵀ )    tile after tile,

so the weight is read from memory once per call, whatever the number of rows. Below ``MIN_ROWS`` rows (one-row
decoding, short verifications) the reference kernel is about as fast and is called itself: bit-identical there.

Not bit-identical above it: both kernels accumulate in float32 and round once to bfloat16, but sum in a different
order. Each output is within half a bfloat16 ulp plus the float32 summation bound ``k · 2⁻²⁴ · Σᵢ|xᵢ wᵢ|`` of the
exact product, as the reference kernel's is; an output near a rounding boundary can land on its other side
(tests/test_fast_upcast.py; for a 12,288 × 1,536 weight and 128 random rows 99.985 % of outputs were bit-equal).
Speed: docs/benchmarks.md, "Real sizes".
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from minimtp.fast.onednn import available
from minimtp.fast.swap import swap_

MIN_ROWS = 8  # below this the row-by-row bf16 kernel is about as fast (docs/benchmarks.md, "Real sizes")
TILE_BYTES = 4 << 20  # float32 bytes of one weight tile (4 MB: fits the cache that the tile is reused from)


def applies(weight: torch.Tensor) -> bool:
    """True for a bfloat16 CPU weight that oneDNN cannot multiply natively (where this twin is the fast one)."""
    return weight.device.type == "cpu" and weight.dtype == torch.bfloat16 and not available(weight)


def upcast_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` computed in float32 over cached tiles of ``weight`` (see the module doc)."""
    n, k = weight.shape
    rows = x.numel() // k
    if rows < MIN_ROWS or x.dtype != weight.dtype or (torch.is_grad_enabled() and weight.requires_grad):
        return F.linear(x, weight, bias)  # few rows, mixed dtypes or training: the reference kernel
    xt = x.reshape(rows, k).float().T
    acc = torch.empty(n, rows)  # float32, one row per output feature: each tile writes a contiguous slice
    step = max(1, TILE_BYTES // (4 * k))
    tile = torch.empty(min(step, n), k)
    for s in range(0, n, step):
        t = tile[: min(step, n - s)]
        t.copy_(weight[s : s + step])
        torch.mm(t, xt, out=acc[s : s + step])
    y = acc.T if bias is None else acc.T + bias.float()
    return torch.empty(rows, n, dtype=x.dtype).copy_(y).view(*x.shape[:-1], n)


class UpcastLinear(nn.Module):
    """Drop-in for a bfloat16 ``nn.Linear`` (the same ``weight`` and ``bias`` parameters): :func:`upcast_linear`."""

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None = None):
        super().__init__()
        self.weight = weight
        self.bias = bias
        self.out_features, self.in_features = weight.shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return upcast_linear(x, self.weight, self.bias)


class UpcastUnembedding(nn.Module):
    """Twin of ``minimtp.model.Unembedding``: ``logits = h Wᵀ`` by :func:`upcast_linear`. Owns no parameter."""

    def forward(self, h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return upcast_linear(h, weight)


def upcast_(module: nn.Module) -> int:
    """Replace every bfloat16 CPU ``nn.Linear`` inside ``module`` that oneDNN cannot multiply by an
    :class:`UpcastLinear`, in place. Returns the count."""
    return swap_(
        module, lambda m: UpcastLinear(m.weight, m.bias) if type(m) is nn.Linear and applies(m.weight) else None
    )
