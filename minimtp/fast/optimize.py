"""``optimize``: put the fast twins into a target/assistant pair; ``FastEngine``: the Engine that uses them."""

from __future__ import annotations

import torch
from torch import nn

from minimtp.engine import Engine
from minimtp.errors import GenerationError
from minimtp.fast.draft_context import DraftRoundContext
from minimtp.fast.fused import FusedAttention, FusedMLP, fuse_norms_
from minimtp.fast.int8 import Int8Linear, quantize_assistant_
from minimtp.fast.onednn import PackedLinear, PackedUnembedding, available, prepack_
from minimtp.fast.top_p import process_logits
from minimtp.fast.upcast import UpcastUnembedding, applies, upcast_
from minimtp.model import MLP, Attention, Unembedding


def _fuse_and_pack_(model: nn.Module) -> None:
    """bfloat16 on a CPU with oneDNN: q/k/v and gate/up as one prepacked matmul each, every other linear and the
    dense head prepacked."""
    for layer in model.model.layers:
        a, m = layer.self_attn, layer.mlp
        projs = [getattr(a, n) for n in ("q_proj", "k_proj", "v_proj") if hasattr(a, n)]
        if type(a) is Attention and len(projs) > 1:
            layer.self_attn = FusedAttention(a, PackedLinear.over([(p.weight, p.bias) for p in projs]))
        if type(m) is MLP:
            layer.mlp = FusedMLP(m, PackedLinear.over([(m.gate_proj.weight, None), (m.up_proj.weight, None)]))
    prepack_(model)
    if type(getattr(model, "unembed", None)) is Unembedding:
        head = model.lm_head_weight if hasattr(model, "lm_head_weight") else model.model.embed_tokens.weight
        model.unembed = PackedUnembedding(head)


def optimize(target, assistant=None, *, draft_dtype: str | None = None):
    """Rewrite ``target`` (and ``assistant``) **in place** with the CPU fast twins; returns them.

    Parameters and state-dict keys stay the same, outputs stay bit-identical (tests/test_fast.py) except where
    stated. A bfloat16 CPU model gets fused, oneDNN-prepacked matmuls and head where oneDNN has bfloat16, else
    float32-tiled matmuls for inputs of 8 or more rows (``upcast.py``: within the float32-accumulation bound, not
    bit-identical); every CPU model gets the fused RMSNorm. ``draft_dtype="int8"`` also quantizes the assistant's
    weights (weight-only int8, bfloat16 activations): its proposals change, so acceptance may move, but the output
    distribution cannot (the target verifies; χ² tests). Idempotent."""
    if draft_dtype not in (None, "int8"):
        raise GenerationError(f"draft_dtype = {draft_dtype!r}: expected None (keep the assistant's) or 'int8'")
    for model in (target, assistant):
        if model is None:
            continue
        if model is assistant and draft_dtype == "int8":
            if weights_dtype(assistant) != "int8":
                quantize_assistant_(assistant)
        elif available(model.model.norm.weight):
            _fuse_and_pack_(model)
        elif applies(model.model.norm.weight):
            upcast_(model)
            if type(getattr(model, "unembed", None)) is Unembedding:
                model.unembed = UpcastUnembedding()
        if model.model.norm.weight.device.type == "cpu":
            fuse_norms_(model)
    return target, assistant


def weights_dtype(assistant) -> str:
    """``"int8"`` for a quantized drafter, else its weights' dtype name (``"bfloat16"``, ...)."""
    if any(isinstance(m, Int8Linear) for m in assistant.modules()):
        return "int8"
    return str(assistant.model.norm.weight.dtype).removeprefix("torch.")


class FastEngine(Engine):
    """:class:`minimtp.Engine` with the CPU fast twins: :func:`optimize` applied to the models (**in place**), and the
    drafter's K/V gathered once per round (:class:`DraftRoundContext`) when attention runs in PyTorch, and top-p
    from the largest probabilities only (:mod:`minimtp.fast.top_p`). Same
    arguments as the Engine, plus ``draft_dtype`` (see :func:`optimize`)."""

    process_logits = staticmethod(process_logits)  # top-p without a full-vocabulary sort (fast/top_p.py)

    def __init__(self, target, assistant=None, *, draft_dtype: str | None = None, **kwargs):
        super().__init__(target, assistant, **kwargs)  # validates the pair before anything is changed
        with torch.no_grad():
            optimize(target, assistant, draft_dtype=draft_dtype)
        if self.attention_backend == "torch":
            self.draft_context = DraftRoundContext
