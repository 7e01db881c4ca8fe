"""Weight-only int8 for the drafter (CPU).

The assistant only *proposes* tokens; the target decides. A cheaper, approximate drafter therefore never changes
what is generated, only how often drafts are accepted: argmax drafts are checked with the one-hot rule, sampled
drafts against the very q they were sampled from (docs: concepts/speculative-decoding). The target is never
quantized.

On a CPU one draft step is a chain of one-row matmuls that stream every drafter weight from memory once, so the
step costs about (bytes of weights) / (memory bandwidth). Symmetric per-output-channel int8 halves the bytes of
bfloat16:

    s_n = max_k |W[n, k]| / 127,   Q[n, k] = round(W[n, k] / s_n) ∈ [-127, 127],   y = (x Qᵀ) ⊙ s

computed by ``torch.ops.aten._weight_int8pack_mm`` (the kernel torch.compile and torchao use for int8 weight-only
linears on CPU) with bfloat16 activations, or, for shapes that kernel does not take, by dequantizing on the fly as
gpt-fast's int8 mode does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from minimtp.fast.swap import swap_


def _has_kernel() -> bool:
    return hasattr(torch.ops.aten, "_weight_int8pack_mm")


class Int8Linear(nn.Module):
    """``y = (x Qᵀ) ⊙ s (+ b)`` with ``Q`` int8 ``[N, K]`` and per-row scales ``s`` (bfloat16 activations)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        w = weight.detach().float()
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
        self.register_buffer("qweight", torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scales", scale.to(torch.bfloat16))
        self.register_buffer("bias", None if bias is None else bias.detach().to(torch.bfloat16))
        self.in_features = w.shape[1]
        self.out_features = w.shape[0]
        # the packed kernel needs K % 16 == 0 (other K crash or return NaN in torch 2.13); keep a margin
        self.use_kernel = self.in_features % 32 == 0 and _has_kernel() and w.device.type == "cpu"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).to(torch.bfloat16)
        if self.use_kernel:
            y = torch.ops.aten._weight_int8pack_mm(x2, self.qweight, self.scales)
        else:
            y = F.linear(x2, self.qweight.to(x2.dtype)) * self.scales
        if self.bias is not None:
            y = y + self.bias
        return y.view(*lead, self.out_features)

    def dequantized(self) -> torch.Tensor:
        """The float32 weight this layer multiplies by (``Q ⊙ s``): the reference its tests compare against."""
        return self.qweight.float() * self.scales.float()[:, None]


class Int8Unembedding(nn.Module):
    """Twin of ``minimtp.model.Unembedding`` for the tied dense head: ``logits = h (Q ⊙ s)ᵀ`` with Q, s quantized
    from the head matrix it was built over; any other ``weight`` passed in takes the reference path."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.linear = Int8Linear(weight)
        self.__dict__["source"] = weight  # the tied embedding: owned by the model, not by this module

    def forward(self, h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return self.linear(h) if weight is self.source else F.linear(h, weight)


def quantize_int8_(module: nn.Module, skip: tuple[nn.Module, ...] = ()) -> nn.Module:
    """Replace every ``nn.Linear`` inside ``module`` (but those in ``skip``) by an :class:`Int8Linear`, in place.
    Returns the module."""
    quantize = lambda m: (
        Int8Linear(m.weight, m.bias) if isinstance(m, nn.Linear) and not any(m is s for s in skip) else None
    )
    swap_(module, quantize)
    return module


def quantize_assistant_(assistant) -> None:
    """The int8 drafter, in place: bfloat16 activations and norms; every linear int8, gate/up fused into one int8
    matmul (per-row scales make the concatenation exact); the tied dense head int8 (a centroid head keeps its
    gather of the embedding and quantizes its centroid scorer)."""
    from minimtp.fast.fused import FusedMLP

    assistant.to(torch.bfloat16)
    for layer in assistant.model.layers:
        m = layer.mlp
        layer.mlp = FusedMLP(m, Int8Linear(torch.cat([m.gate_proj.weight, m.up_proj.weight])))
    # the fused MLPs keep gate_proj/up_proj as their (unused) sources: not quantized a second time
    quantize_int8_(
        assistant, skip=tuple(x for layer in assistant.model.layers for x in (layer.mlp.gate_proj, layer.mlp.up_proj))
    )
    if not assistant.config.use_ordered_embeddings:
        assistant.unembed = Int8Unembedding(assistant.model.embed_tokens.weight)
