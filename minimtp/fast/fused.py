"""Fused twins of the reference layers: the same outputs bit for bit, in fewer operator calls.

A one-token decoding step on a CPU pays mostly for operator calls and for streaming weights, not for FLOPs. These
modules take over the parameters of a reference module (same child modules, so the same state-dict keys) and
compute its forward with fewer, larger calls:

* :class:`FusedAttention`: q, k and v from one matmul over ``[Wq; Wk; Wv]``; one float32 RMSNorm over all their heads,
  each head then scaled by its norm's weight (q_norm, k_norm, 1 for v: what the three norms compute); one RoPE call
  over the q and k heads together.
* :class:`FusedMLP`: gate and up from one matmul over ``[Wg; Wu]``.
* :class:`FusedRMSNorm`: torch's fused ``rms_norm`` (float32 inside, one call) for the written-out reference.

Equality with the reference is tested on the three target families (tests/test_fast.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from minimtp.fast.onednn import weight_version
from minimtp.fast.swap import swap_
from minimtp.model import MLP, Attention, RMSNorm, apply_rope, gelu


class FusedRMSNorm(nn.Module):
    """Twin of :class:`minimtp.model.RMSNorm` (same ``weight``): ``F.rms_norm`` when the dtypes agree."""

    def __init__(self, norm: RMSNorm):
        super().__init__()
        self.eps = norm.eps
        self.weight = norm.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight is not None and self.weight.dtype != x.dtype:
            return RMSNorm.forward(self, x)  # mixed dtypes (training under autocast): the reference math
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class FusedAttention(nn.Module):
    """Twin of :class:`minimtp.model.Attention`; ``qkv`` is one linear over the projections ``[q(, k(, v))]``."""

    def __init__(self, attn: Attention, qkv: nn.Module):
        super().__init__()
        for name, child in attn.named_children():  # the reference's parameters, under the same names
            setattr(self, name, child)
        for name in ("layer_idx", "layer_type", "nh", "kvh", "d", "window", "has_kv", "k_eq_v"):
            setattr(self, name, getattr(attn, name))
        self.qkv = qkv  # a PackedLinear.over the projections: its ``sizes`` split the outputs
        self._head_w = (None, None)  # (norm weight versions, weights): derived, not a parameter or buffer

    def forward(self, x: torch.Tensor, rope: tuple, ctx) -> torch.Tensor:
        T, (cos, sin) = x.shape[0], rope
        if self.has_kv and not self.k_eq_v:
            q, k, v = self._qkv_heads(x, cos, sin)
            ctx.store(self.layer_idx, k, v)
        else:  # one matmul, then the reference's norms and RoPE
            proj = self.qkv(x).split(self.qkv.sizes, dim=-1)
            q = apply_rope(self.q_norm(proj[0].view(T, self.nh, self.d)), cos, sin)
            if self.has_kv:  # K = V: v is the raw k
                k = proj[1].view(T, self.kvh, self.d)
                ctx.store(self.layer_idx, apply_rope(self.k_norm(k), cos, sin), self.v_norm(k))
        o = ctx.attend(self.layer_idx, q, self.window)
        return self.o_proj(o.reshape(T, self.nh * self.d))

    def _qkv_heads(self, x: torch.Tensor, cos, sin):
        T = x.shape[0]
        nq = self.nh
        nk = self.kvh
        h = self.qkv(x).view(T, nq + 2 * nk, self.d)
        w = self.head_norm_weights()
        h = (F.rms_norm(h.float(), (self.d,), None, self.q_norm.eps) * w).to(x.dtype)
        qk = apply_rope(h[:, : nq + nk], cos, sin)
        return qk[:, :nq], qk[:, nq:], h[:, nq + nk :]

    def head_norm_weights(self) -> torch.Tensor:
        """``[nq + 2 nk, d]`` float32: q_norm's weight for q heads, k_norm's for k heads, ones for v heads
        (derived again after an in-place change of a norm weight)."""
        version = (weight_version(self.q_norm.weight), weight_version(self.k_norm.weight))
        if self._head_w[0] != version:
            wq, wk = self.q_norm.weight.float(), self.k_norm.weight.float()
            w = torch.cat([wq.expand(self.nh, -1), wk.expand(self.kvh, -1), torch.ones_like(wk).expand(self.kvh, -1)])
            self._head_w = (version, w)
        return self._head_w[1]


class FusedMLP(nn.Module):
    """Twin of :class:`minimtp.model.MLP`; ``gate_up`` is one linear over ``[Wg; Wu]``."""

    def __init__(self, mlp: MLP, gate_up: nn.Module):
        super().__init__()
        self.gate_proj = mlp.gate_proj
        self.up_proj = mlp.up_proj
        self.down_proj = mlp.down_proj
        self.approximate = mlp.approximate
        self.gate_up = gate_up

    def forward(self, x):
        g, u = self.gate_up(x).chunk(2, dim=-1)
        return self.down_proj(gelu(g, self.approximate) * u)


def fuse_norms_(module: nn.Module) -> int:
    """Replace every :class:`RMSNorm` inside ``module`` by its :class:`FusedRMSNorm` twin, in place."""
    return swap_(module, lambda m: FusedRMSNorm(m) if type(m) is RMSNorm else None)
