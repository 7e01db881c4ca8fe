"""Prepacked oneDNN linears: the bfloat16 CPU twin of ``nn.Linear`` and of the model's ``Unembedding``.

Decoding multiplies one row (plain decoding) or k+1 rows (verification) by every weight matrix, so a step costs about
(bytes of weights) / (the speed at which the matmul kernel streams them). oneDNN, with each weight reordered once
into its blocked layout, streams them faster than torch's default CPU kernel for a bfloat16 matmul
with a few rows, and returns **bit-identical** results (tests/test_fast.py; measured: docs/benchmarks.md). This is
what ``torch.compile`` does when it freezes a bfloat16 model on CPU (weight prepacking); here it is done eagerly.

The original weight stays the module's parameter (same state-dict keys, tied weights still shared); the packed copy
is derived from it, lazily on the first call, and re-derived if the weight is modified in place.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from minimtp.fast.swap import swap_


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


def weight_version(t: torch.Tensor) -> int:
    """The in-place version counter (inference tensors have none: they count as never modified)."""
    return 0 if t.is_inference() else t._version


class PackedLinear(nn.Module):
    """``y = x Wᵀ (+ b)`` through oneDNN with W prepacked; drop-in for an ``nn.Linear`` (same parameters).

    :meth:`over` builds one over several weights at once, ``W = [W_1; W_2; ...]`` (outputs concatenated, ``sizes``
    tells how to split them): one call streams q, k and v (or gate and up) together. Such a module owns no
    parameters (the state dict keeps the original names) and repacks if any source weight changes in place."""

    def __init__(self, weight: nn.Parameter | torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.weight = weight
        self.bias = bias
        self.out_features, self.in_features = weight.shape
        self.sizes = [self.out_features]
        self.__dict__["_sources"] = [(weight, bias)]
        self._packed = None
        self._version = None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> PackedLinear:
        return cls(linear.weight, linear.bias)

    @classmethod
    def over(cls, sources: list[tuple[torch.Tensor, torch.Tensor | None]]) -> PackedLinear:
        """One matmul over the (weight, bias) pairs of several linears, registering none of them."""
        self = cls(*sources[0])
        del self.weight, self.bias  # not parameters of this module: its sources are
        self.__dict__["_sources"] = list(sources)
        self.sizes = [w.shape[0] for w, _ in sources]
        self.out_features = sum(self.sizes)
        return self

    def source_weight(self) -> torch.Tensor:
        return self._sources[0][0]

    def _weight_bias(self):
        ws, bs = zip(*self._sources)
        w = ws[0] if len(ws) == 1 else torch.cat(ws)
        b = None if bs[0] is None else (bs[0] if len(bs) == 1 else torch.cat(bs))
        return w, b

    def packed(self):
        version = tuple(weight_version(w) for w, _ in self._sources)
        if self._version != version:  # (re)pack after an in-place update of a source weight
            with torch.no_grad():
                w, b = self._weight_bias()
                self._packed = (torch.ops.mkldnn._reorder_linear_weight(w.detach(), 4), b)  # layout tuned for ~4 rows
            self._version = version
        return self._packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w0 = self._sources[0][0]
        if x.dtype != w0.dtype or (torch.is_grad_enabled() and w0.requires_grad):
            return F.linear(x, *self._weight_bias())  # training / mixed dtypes: the ordinary kernel
        w, b = self.packed()
        lead = x.shape[:-1]
        y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, self.in_features), w, b, "none", [], "")
        return y.view(*lead, self.out_features)


class PackedUnembedding(nn.Module):
    """Twin of ``minimtp.model.Unembedding`` (``logits = h Wᵀ``) for the head matrix it was built over; any other
    ``weight`` passed in takes the reference path. Owns no parameter."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.linear = PackedLinear.over([(weight, None)])

    def forward(self, h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return self.linear(h) if weight is self.linear.source_weight() else F.linear(h, weight)


def prepack_(module: nn.Module) -> int:
    """Replace every bfloat16 CPU ``nn.Linear`` inside ``module`` by a :class:`PackedLinear`, in place (packing
    happens on a module's first call, so a linear that is never called costs no memory). Returns the count."""
    return swap_(
        module, lambda m: PackedLinear.from_linear(m) if type(m) is nn.Linear and available(m.weight) else None
    )
