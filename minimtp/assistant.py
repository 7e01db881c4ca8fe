"""The Gemma 4 assistant (the MTP drafter that ships beside each Gemma 4 model).

One drafting step at position p (constant within a round; gemma4.md §3, docs: concepts/gemma4-assistant):

    x0 = [E_t(token_p)·sqrt(H_t) ; h] W_pre          h: the target's post-norm hidden state at p-1 (step 1)
                                                       or the previous step's projection (steps > 1)
    x  = decoder layers on x0 (Q-only attention over the target's store-layer K/V of that layer type:
         full layers see every position < p, sliding layers the last W+1 of them)
    h' = RMSNorm(x);  logits = h' E_aᵀ (or the centroid head);  next h = h' W_post

No softcap is applied to the assistant's logits. Its own K/V never exist: it reads the target's cache.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from minimtp.checkpoint import parse_dtype
from minimtp.config import SLIDING, AssistantConfig, TextConfig, load_assistant_config
from minimtp.errors import CheckpointError, CompatibilityError
from minimtp.model import Gemma4, TextModel, rope_cos_sin


class CentroidHead(nn.Module):
    """Ordered-embedding LM head: score C centroids, keep the top K, compute the V/C token logits of each kept
    cluster (rows of ``token_ordering.view(C, V/C)``) with the tied embedding; every other token gets
    ``min(selected logits of its row) - 1`` – a finite value, so q has full support. (transformers takes the min
    over the whole batch; per row is identical for batch 1 and keeps each sequence independent of the batch.)"""

    def __init__(self, cfg: AssistantConfig):
        super().__init__()
        self.C, self.K, self.V = cfg.num_centroids, cfg.centroid_intermediate_top_k, cfg.text.vocab_size
        self.centroids = nn.Linear(cfg.text.hidden_size, self.C, bias=False)
        self.register_buffer("token_ordering", torch.zeros(self.V, dtype=torch.long))

    def forward(self, h: torch.Tensor, embed: torch.Tensor) -> torch.Tensor:
        top = torch.topk(self.centroids(h), self.K, dim=-1).indices  # [N, K]
        sel = self.token_ordering.view(self.C, self.V // self.C)[top].flatten(1)  # [N, K·V/C]
        s = torch.einsum("nh,nkh->nk", h, embed[sel])
        out = (s.min(-1, keepdim=True).values - 1.0).expand(-1, self.V).clone()
        return out.scatter_(-1, sel, s)


class Gemma4Assistant(nn.Module):
    def __init__(self, cfg: AssistantConfig):
        super().__init__()
        self.config = cfg
        t = cfg.text
        self.model = TextModel(t)
        self.pre_projection = nn.Linear(2 * cfg.backbone_hidden_size, t.hidden_size, bias=False)
        self.post_projection = nn.Linear(t.hidden_size, cfg.backbone_hidden_size, bias=False)
        if cfg.use_ordered_embeddings:
            self.masked_embedding = CentroidHead(cfg)
        self._rope_types = {lt: (t.rope[lt], t.type_head_dim(lt)) for lt in set(t.layer_types)}

    def quantize_int8(self) -> Gemma4Assistant:
        """Weight-only int8 drafting (:mod:`minimtp.quantize`): every linear layer and the tied dense head. Exactness
        is unaffected (the target verifies); only acceptance can change."""
        from minimtp.quantize import Int8Linear, quantize_int8_

        head = None if self.config.use_ordered_embeddings else Int8Linear(self.model.embed_tokens.weight)
        quantize_int8_(self)
        self.lm_head_int8 = head
        return self

    @property
    def weights_dtype(self) -> str:
        """``"int8"`` after :meth:`quantize_int8`, else the weights' dtype name (``"bfloat16"``, ...)."""
        if hasattr(self, "lm_head_int8"):
            return "int8"
        return str(self.model.norm.weight.dtype).removeprefix("torch.")

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Draft logits from the final-norm output h (not from the projection); never softcapped."""
        if getattr(self, "lm_head_int8", None) is not None:
            return self.lm_head_int8(h)
        if self.config.use_ordered_embeddings:
            return self.masked_embedding(h, self.model.embed_tokens.weight)
        head = self.__dict__.get("_packed_head")
        return head(h) if head is not None else h @ self.model.embed_tokens.weight.T

    def prepack(self) -> int:
        """bfloat16 on CPU: oneDNN-prepacked linears and dense head (:mod:`minimtp.onednn`). Returns the count."""
        from minimtp.onednn import PackedLinear, available, prepack_

        n = prepack_(self)
        w = self.model.embed_tokens.weight
        if not self.config.use_ordered_embeddings and not hasattr(self, "lm_head_int8") and available(w):
            object.__setattr__(self, "_packed_head", PackedLinear(w))
            n += 1
        return n

    def rope(self, positions: torch.Tensor) -> dict:
        """cos/sin per layer type at ``positions`` ``[N]`` (constant within a drafting round: compute once)."""
        dt = self.model.norm.weight.dtype
        return {lt: rope_cos_sin(r, d, positions, dt) for lt, (r, d) in self._rope_types.items()}

    def step(self, token_emb: torch.Tensor, hidden: torch.Tensor, positions: torch.Tensor, ctx, rope=None):
        """One drafting step for N queries: ``token_emb`` ``[N, H_t]`` (target's scaled embedding of the last token),
        ``hidden`` ``[N, H_t]``, ``positions`` ``[N]`` (``rope``: :meth:`rope` of them, if already computed).
        Returns (logits ``[N, V]``, next hidden ``[N, H_t]``)."""
        act = self.model.norm.weight.dtype  # the drafter may run in its own dtype
        x = self.pre_projection(torch.cat([token_emb, hidden], dim=-1).to(act))
        rope = self.rope(positions) if rope is None else rope
        for layer in self.model.layers:
            x = layer(x, rope[layer.self_attn.layer_type], ctx)
        h = self.model.norm(x)
        return self.logits(h), self.post_projection(h)


class DraftDenseContext:
    """Assistant attention over dense target K/V ``{type: (K, V)}`` each ``[B, S_k, kvh, d]``, for queries
    ``[B, S_q]`` at positions ``qpos``: key j is visible iff j < p (full) and also j >= p - (W+1) (sliding).
    Used for the comparison with transformers and for distillation (all positions of a sequence at once)."""

    def __init__(self, cfg: TextConfig, kv: dict, qpos: torch.Tensor):
        self.cfg, self.kv, self.qpos = cfg, kv, qpos  # qpos [B, S_q]

    def store(self, i, k, v):  # pragma: no cover - assistant layers own no K/V
        raise RuntimeError("assistant layers do not produce K/V")

    def attend(self, i, q, window):
        lt = self.cfg.layer_types[i]
        k, v = self.kv[lt]
        B, Sq = self.qpos.shape
        kpos = torch.arange(k.shape[1], device=q.device)
        p = self.qpos[:, None, :, None]  # [B, 1, Sq, 1]
        mask = kpos[None, None, None, :] < p
        if lt == SLIDING:
            mask &= kpos[None, None, None, :] >= p - (self.cfg.sliding_window + 1)
        o = F.scaled_dot_product_attention(
            q.view(B, Sq, *q.shape[1:]).transpose(1, 2),
            k.to(q.dtype).transpose(1, 2),  # the drafter may run in another dtype than the target
            v.to(q.dtype).transpose(1, 2),
            attn_mask=mask,
            scale=1.0,
            enable_gqa=q.shape[1] != k.shape[2],
        )
        # a query with no visible key (p = 0) would be NaN; it never drafts, keep it finite
        return torch.nan_to_num(o.transpose(1, 2).reshape(B * Sq, *q.shape[1:]))


def check_pair(target_cfg: TextConfig, cfg: AssistantConfig, where: str = "assistant") -> None:
    """Validate a target/assistant pair before any generation; raise CompatibilityError naming both values."""
    t, a = target_cfg, cfg.text

    def bad(what, tv, av):
        raise CompatibilityError(f"{where}: {what} is {av} in the assistant but {tv} in the target")

    if a.vocab_size != t.vocab_size:
        bad("vocab_size", t.vocab_size, a.vocab_size)
    if cfg.backbone_hidden_size != t.hidden_size:
        bad("backbone_hidden_size (target hidden size)", t.hidden_size, cfg.backbone_hidden_size)
    for lt in sorted(set(a.layer_types)):
        if lt not in t.layer_types:
            raise CompatibilityError(f"{where}: assistant has {lt} layers but the target has none to read K/V from")
        s = t.store_layer(lt)
        if a.type_head_dim(lt) != t.head_dims[s]:
            bad(f"{lt} head_dim", t.head_dims[s], a.type_head_dim(lt))
        if a.type_kv_heads(lt) != t.kv_heads[s]:
            bad(f"{lt} num_key_value_heads", t.kv_heads[s], a.type_kv_heads(lt))
        if a.num_heads % t.kv_heads[s]:
            bad(f"{lt} query heads (must be a multiple of the target's KV heads)", t.kv_heads[s], a.num_heads)
    if a.attention_k_eq_v != t.attention_k_eq_v:
        bad("attention_k_eq_v", t.attention_k_eq_v, a.attention_k_eq_v)


def load_assistant(path: str | os.PathLike, target: Gemma4, dtype=None, device=None) -> Gemma4Assistant:
    """Load a ``gemma4_assistant`` checkpoint directory and validate it against ``target`` at load time.
    ``dtype``/``device`` default to the target's; ``dtype="int8"`` loads bfloat16 and quantizes the weights to int8
    (:meth:`Gemma4Assistant.quantize_int8`, CPU drafting)."""
    path = os.fspath(path)
    cfg = load_assistant_config(path)
    check_pair(target.config, cfg, where=path)
    ref = target.model.embed_tokens.weight
    int8 = isinstance(dtype, str) and dtype.strip().lower() == "int8"
    if dtype is not None and not int8:
        try:
            dtype = parse_dtype(dtype)
        except CheckpointError:
            raise CheckpointError(
                f"unsupported assistant dtype '{dtype}': expected one of float32, bfloat16, float16, int8"
            ) from None
    dtype = torch.bfloat16 if int8 else (ref.dtype if dtype is None else dtype)
    model = read_assistant(path, dtype, ref.device if device is None else device, cfg)
    return model.quantize_int8() if int8 else model


def read_assistant(path, dtype=torch.float32, device="cpu", cfg: AssistantConfig | None = None) -> Gemma4Assistant:
    """Load an assistant directory without a target to check it against (training, inspection)."""
    from minimtp.checkpoint import load_weights, parse_dtype

    path = os.fspath(path)
    cfg = load_assistant_config(path) if cfg is None else cfg
    with torch.device("meta"):
        model = Gemma4Assistant(cfg)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    weights = load_weights(path, expected, dtype=parse_dtype(dtype), device=torch.device(device))
    model.load_state_dict(weights, assign=True, strict=True)
    return model.eval().requires_grad_(False)
