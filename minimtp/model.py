"""The Gemma 4 text decoder (the *target*), in plain PyTorch.

Parameter names equal the Hugging Face ``Gemma4ForCausalLM`` state dict, so checkpoints load by name.
Every forward works on a packed batch of tokens ``[T]`` with their absolute positions; *how* attention
finds its keys is decided by a context object:

``DenseContext`` (B equal-length sequences, causal, no cache: ``model(input_ids)``, training, tests) or
``PagedContext`` (the engine's paged KV cache and an attention backend); both are in :mod:`minimtp.attention`.

Equations follow transformers' ``models/gemma4/modeling_gemma4.py``; docs: concepts/gemma4-target derives
them.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from minimtp.attention import DenseContext
from minimtp.checkpoint import load_weights, parse_dtype, stored_head_differs
from minimtp.config import FULL, SLIDING, RopeConfig, TextConfig, load_text_config

__all__ = ["Gemma4", "load_target"]


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x²) + eps) · w, in float32, cast back (Gemma 4: w multiplies directly, no 1 + w).
    ``with_scale=False`` (v_norm, router norm) has no weight."""

    def __init__(self, dim: int, eps: float = 1e-6, with_scale: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if with_scale else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + self.eps)
        return (y if self.weight is None else y * self.weight.float()).to(x.dtype)


def rope_inv_freq(rope: RopeConfig, head_dim: int) -> torch.Tensor:
    """inv_freq[k] = 1/θ^(2k/d); ``proportional`` keeps k < int(f·d/2) (exponent still over the full d) and sets
    the rest to 0 (unrotated), then divides by ``factor``."""
    k = torch.arange(0, head_dim, 2, dtype=torch.float32)
    inv = 1.0 / (rope.theta ** (k / head_dim))
    if rope.rope_type == "proportional":
        rotated = int(rope.partial_rotary_factor * head_dim // 2)
        inv[rotated:] = 0.0
        inv = inv / rope.factor
    return inv


@functools.lru_cache(maxsize=64)
def _inv_freq_on(rope: RopeConfig, head_dim: int, device: torch.device) -> torch.Tensor:
    return rope_inv_freq(rope, head_dim).to(device)


def rope_cos_sin(rope: RopeConfig, head_dim: int, positions: torch.Tensor, dtype: torch.dtype):
    """cos, sin ``[T, 1, d]`` (broadcast over heads) with emb = concat(pos·inv_freq, pos·inv_freq) (rotate-half)."""
    inv = _inv_freq_on(rope, head_dim, positions.device)
    freqs = positions.float()[:, None] * inv[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)[:, None, :]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x' = x·cos + rotate_half(x)·sin with rotate_half(x) = [−x₂, x₁]; x: ``[T, heads, d]``, cos/sin ``[T, 1, d]``."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def gelu(x: torch.Tensor, approximate: str = "tanh") -> torch.Tensor:
    return F.gelu(x, approximate=approximate)


class Attention(nn.Module):
    """q = RoPE(RMSNorm_q(x Wq)); k = RoPE(RMSNorm_k(x Wk)); v = RMSNorm(x Wv) (weightless; v = raw k when
    ``attention_k_eq_v`` on a full layer); out = softmax(q kᵀ · 1.0, causal [& window]) v · Wo.
    A KV-shared ("reuse") layer owns only q_proj/q_norm/o_proj and reads its type's store layer."""

    def __init__(self, cfg: TextConfig, i: int, has_kv: bool = True):
        super().__init__()
        self.layer_idx = i
        self.layer_type = cfg.layer_types[i]
        self.nh = cfg.num_heads
        self.kvh = cfg.kv_heads[i]
        self.d = cfg.head_dims[i]
        H, bias = cfg.hidden_size, cfg.attention_bias
        self.window = cfg.sliding_window if self.layer_type == SLIDING else 0
        self.q_proj = nn.Linear(H, self.nh * self.d, bias=bias)
        self.q_norm = RMSNorm(self.d, cfg.rms_norm_eps)
        self.o_proj = nn.Linear(self.nh * self.d, H, bias=bias)
        self.has_kv = has_kv
        self.k_eq_v = cfg.attention_k_eq_v and self.layer_type == FULL
        if has_kv:
            self.k_proj = nn.Linear(H, self.kvh * self.d, bias=bias)
            if not self.k_eq_v:
                self.v_proj = nn.Linear(H, self.kvh * self.d, bias=bias)
            self.k_norm = RMSNorm(self.d, cfg.rms_norm_eps)
            self.v_norm = RMSNorm(self.d, cfg.rms_norm_eps, with_scale=False)

    def forward(self, x: torch.Tensor, rope: tuple, ctx) -> torch.Tensor:
        T, (cos, sin) = x.shape[0], rope
        q = apply_rope(self.q_norm(self.q_proj(x).view(T, self.nh, self.d)), cos, sin)
        if self.has_kv:
            k = self.k_proj(x).view(T, self.kvh, self.d)
            v = k if self.k_eq_v else self.v_proj(x).view(T, self.kvh, self.d)
            ctx.store(self.layer_idx, apply_rope(self.k_norm(k), cos, sin), self.v_norm(v))
        o = ctx.attend(self.layer_idx, q, self.window)
        return self.o_proj(o.reshape(T, self.nh * self.d))


class MLP(nn.Module):
    """mlp(x) = (gelu_tanh(x Wg) ⊙ x Wu) Wd."""

    def __init__(self, hidden: int, inter: int, approximate: str):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)
        self.approximate = approximate

    def forward(self, x):
        return self.down_proj(gelu(self.gate_proj(x), self.approximate) * self.up_proj(x))


class Router(nn.Module):
    """z = RMSNorm(r) ⊙ scale · H^-½; probs = softmax_fp32(z Wr); (w, idx) = top-k; w ← w/Σw ⊙ per_expert_scale[idx]."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        H, E = cfg.hidden_size, cfg.num_experts
        self.norm = RMSNorm(H, cfg.rms_norm_eps, with_scale=False)
        self.proj = nn.Linear(H, E, bias=False)
        self.scale = nn.Parameter(torch.ones(H))
        self.per_expert_scale = nn.Parameter(torch.ones(E))
        self.top_k = cfg.top_k_experts
        self.H = H

    def forward(self, r):
        z = self.norm(r) * self.scale * (self.H**-0.5)
        probs = torch.softmax(self.proj(z).float(), dim=-1)
        w, idx = torch.topk(probs, self.top_k, dim=-1)
        w = w / w.sum(-1, keepdim=True)
        return (w * self.per_expert_scale[idx]).to(r.dtype), idx


class Experts(nn.Module):
    """y = Σ_j w_j · (gelu_tanh(x G_e) ⊙ x U_e) D_e over the top-k experts e = idx_j; ``gate_up_proj[e]`` holds
    G (first half) and U."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        E = cfg.num_experts
        H = cfg.hidden_size
        I = cfg.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.zeros(E, 2 * I, H))
        self.down_proj = nn.Parameter(torch.zeros(E, H, I))
        self.approximate = "tanh" if cfg.hidden_activation == "gelu_pytorch_tanh" else "none"

    def forward(self, x, w, idx):
        out = torch.zeros_like(x)
        for e in idx.unique().tolist():
            tok, slot = (idx == e).nonzero(as_tuple=True)
            gate, up = (x[tok] @ self.gate_up_proj[e].T).chunk(2, dim=-1)
            y = (gelu(gate, self.approximate) * up) @ self.down_proj[e].T
            out.index_add_(0, tok, y * w[tok, slot, None])
        return out


class DecoderLayer(nn.Module):
    """x ← x + N_post_attn(attn(N_in(x)));  x ← x + N_post_ffw(mlp(N_pre_ffw(x)) [+ MoE]);
    [PLE] x ← x + N_ppin(gelu(x W_gate) ⊙ ple_i · W_proj);  x ← x · layer_scalar."""

    def __init__(self, cfg: TextConfig, i: int):
        super().__init__()
        H, eps = cfg.hidden_size, cfg.rms_norm_eps
        approx = "tanh" if cfg.hidden_activation == "gelu_pytorch_tanh" else "none"
        self.self_attn = Attention(cfg, i, has_kv=cfg.kv_modes[i] != "reuse")
        self.mlp = MLP(H, cfg.layer_intermediate(i), approx)
        self.input_layernorm = RMSNorm(H, eps)
        self.post_attention_layernorm = RMSNorm(H, eps)
        self.pre_feedforward_layernorm = RMSNorm(H, eps)
        self.post_feedforward_layernorm = RMSNorm(H, eps)
        self.register_buffer("layer_scalar", torch.ones(1))
        self.moe = cfg.enable_moe_block
        if self.moe:
            self.router = Router(cfg)
            self.experts = Experts(cfg)
            self.pre_feedforward_layernorm_2 = RMSNorm(H, eps)
            self.post_feedforward_layernorm_1 = RMSNorm(H, eps)
            self.post_feedforward_layernorm_2 = RMSNorm(H, eps)
        self.ple = cfg.hidden_size_per_layer_input > 0
        if self.ple:
            P = cfg.hidden_size_per_layer_input
            self.per_layer_input_gate = nn.Linear(H, P, bias=False)
            self.per_layer_projection = nn.Linear(P, H, bias=False)
            self.post_per_layer_input_norm = RMSNorm(H, eps)
            self.approximate = approx

    def forward(self, x, rope, ctx, ple=None):
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), rope, ctx))
        r = x
        m = self.mlp(self.pre_feedforward_layernorm(r))
        if self.moe:  # MoE branch in parallel with the dense MLP, both reading the residual r
            w, idx = self.router(r)
            m2 = self.experts(self.pre_feedforward_layernorm_2(r), w, idx)
            m = self.post_feedforward_layernorm_1(m) + self.post_feedforward_layernorm_2(m2)
        x = r + self.post_feedforward_layernorm(m)
        if self.ple:
            g = gelu(self.per_layer_input_gate(x), self.approximate) * ple
            x = x + self.post_per_layer_input_norm(self.per_layer_projection(g))
        return x * self.layer_scalar


class ScaledEmbedding(nn.Embedding):
    """e = E[ids] · sqrt(H), the factor rounded to the weight dtype (39.25 for sqrt(1536) in bf16)."""

    def __init__(self, num, dim, padding_idx, scale):
        super().__init__(num, dim, padding_idx=padding_idx)
        self.scale = scale

    def forward(self, ids):
        return super().forward(ids) * torch.tensor(self.scale, dtype=self.weight.dtype)


class TextModel(nn.Module):
    """Embeddings (+ per-layer embeddings), the decoder layers, the final norm."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        H = cfg.hidden_size
        P = cfg.hidden_size_per_layer_input
        L = cfg.num_layers
        pad = cfg.pad_token_id if cfg.pad_token_id is not None and cfg.pad_token_id < cfg.vocab_size else None
        self.embed_tokens = ScaledEmbedding(cfg.vocab_size, H, pad, math.sqrt(H))
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(L))
        self.norm = RMSNorm(H, cfg.rms_norm_eps)
        if P > 0:
            self.embed_tokens_per_layer = ScaledEmbedding(cfg.vocab_size_per_layer_input, L * P, None, math.sqrt(P))
            self.per_layer_model_projection = nn.Linear(H, L * P, bias=False)
            self.per_layer_projection_norm = RMSNorm(P, cfg.rms_norm_eps)

    def per_layer_inputs(self, ids, e):
        """ple = (RMSNorm_P(reshape(e W_plmp · H^-½)) + E_ple[ids]·sqrt(P)) · 2^-½, shape ``[T, L, P]``."""
        L, P = len(self.layers), self.per_layer_projection_norm.weight.shape[0]
        tok = self.embed_tokens_per_layer(ids.clamp(max=self.embed_tokens_per_layer.num_embeddings - 1))
        proj = self.per_layer_model_projection(e) * (e.shape[-1] ** -0.5)
        ctx = self.per_layer_projection_norm(proj.view(-1, L, P))
        return (ctx + tok.view(-1, L, P)) * (2.0**-0.5)


class Unembedding(nn.Module):
    """logits = h Wᵀ for the head matrix W its owner passes in (the tied input embedding, or ``lm_head.weight``):
    it owns no parameter, so the state dict stays the checkpoint's. The CPU fast path swaps in a twin."""

    def forward(self, h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.linear(h, weight)


@dataclass
class TargetOutput:
    hidden: torch.Tensor  # [T, H] post-final-norm (what the assistant reads)
    logits: torch.Tensor | None  # [T or rows, V]


class Gemma4(nn.Module):
    """Gemma 4 text decoder with a tied (or separate) LM head and final-logit softcapping:
    logits = cap · tanh((h_N Eᵀ)/cap)."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.config = cfg
        self.model = TextModel(cfg)
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.unembed = Unembedding()
        self._rope_types = {t: (cfg.rope[t], cfg.type_head_dim(t)) for t in set(cfg.layer_types)}

    @property
    def lm_head_weight(self) -> torch.Tensor:
        return self.model.embed_tokens.weight if self.config.tie_word_embeddings else self.lm_head.weight

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """The scaled input embedding e = E[ids]·sqrt(H) (the assistant's input too)."""
        return self.model.embed_tokens(ids)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.unembed(hidden, self.lm_head_weight)
        cap = self.config.final_logit_softcapping
        return cap * torch.tanh(logits / cap) if cap else logits

    def run(self, ids: torch.Tensor, positions: torch.Tensor, ctx) -> TargetOutput:
        """Packed forward: ids/positions ``[T]``; ``ctx`` decides where K/V go and come from. Hidden states and
        logits of every row."""
        x, ple = self.inputs(ids)
        x = self.run_layers(x, positions, ple, ctx, range(self.config.num_layers))
        h = self.model.norm(x)
        return TargetOutput(h, self.logits(h))

    def prefill(self, ids: torch.Tensor, positions: torch.Tensor, ctx) -> TargetOutput:
        """:meth:`run` for each sequence's last row only, as a prompt needs. The layers that store K/V run on every
        row; the KV-shared layers write none, so they run on the last rows alone (as transformers'
        ``Gemma4TextModel._maybe_slice_kv_shared_inputs``)."""
        cfg = self.config
        first_shared = cfg.num_layers - cfg.num_kv_shared_layers
        x, ple = self.inputs(ids)
        x = self.run_layers(x, positions, ple, ctx, range(first_shared))
        rows = ctx.last_queries()  # from here on each sequence has one query
        x = self.run_layers(
            x[rows], positions[rows], None if ple is None else ple[rows], ctx, range(first_shared, cfg.num_layers)
        )
        h = self.model.norm(x)
        return TargetOutput(h, self.logits(h))

    def inputs(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The embedding ``[T, H]`` and, for the PLE families, the per-layer inputs ``[T, L, P]``."""
        m = self.model
        x = m.embed_tokens(ids)
        ple = m.per_layer_inputs(ids, x) if hasattr(m, "embed_tokens_per_layer") else None
        return x, ple

    def run_layers(self, x: torch.Tensor, positions: torch.Tensor, ple, ctx, layers: range) -> torch.Tensor:
        """The decoder layers ``layers`` over rows ``x [T, H]`` at ``positions [T]``."""
        rope = {t: rope_cos_sin(r, d, positions, x.dtype) for t, (r, d) in self._rope_types.items()}
        for i in layers:
            layer = self.model.layers[i]
            x = layer(x, rope[layer.self_attn.layer_type], ctx, None if ple is None else ple[:, i])
        return x

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Full causal forward without a cache: ``[B, S]`` ids → ``[B, S, V]`` logits."""
        return self.forward_with_kv(input_ids)[0]

    def forward_with_kv(self, input_ids: torch.Tensor):
        """Dense forward returning (logits ``[B,S,V]``, post-norm hidden ``[B,S,H]``, the store layers' K/V per
        layer type ``{type: (K, V)}`` each ``[B, S, kvh, d]``) – what the assistant consumes."""
        (B, S), cfg = input_ids.shape, self.config
        ctx = DenseContext(cfg, B, S)
        out = self.run(input_ids.reshape(-1), torch.arange(S, device=input_ids.device).repeat(B), ctx)
        kv = {t: tuple(x.view(B, S, *x.shape[1:]) for x in ctx.kv[cfg.store_layer(t)]) for t in set(cfg.layer_types)}
        return out.logits.view(B, S, -1), out.hidden.view(B, S, -1), kv


def load_target(path, dtype=torch.float32, device="cpu") -> Gemma4:
    """Load a Gemma 4 target from a local Hugging Face directory (``gemma4_text``, ``gemma4_unified_text`` or the
    multimodal ``gemma4`` / ``gemma4_unified`` layout, decoder under ``model.language_model.``; vision/audio towers and
    embedders are never read). Weights are read tensor by tensor into a model built on the meta device, so no second
    full copy is made."""
    path = os.fspath(path)
    cfg = load_text_config(path)
    if cfg.tie_word_embeddings and stored_head_differs(path):  # never replace a stored head with the embedding
        message = (
            f"{path}: config.json ties the LM head to the embedding, but the checkpoint stores a different "
            "lm_head.weight: using the stored head"
        )
        warnings.warn(message, stacklevel=2)
        cfg = dataclasses.replace(cfg, tie_word_embeddings=False)
    dtype = parse_dtype(dtype)
    with torch.device("meta"):
        model = Gemma4(cfg)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    weights = load_weights(path, expected, dtype=dtype, device=device)
    model.load_state_dict(weights, assign=True, strict=True)
    model.name_or_path = path  # where the tokenizer is (as transformers' config.name_or_path)
    return model.eval().requires_grad_(False)
