"""The Gemma 4 assistant (the MTP drafter that ships beside each Gemma 4 model).

One drafting step at position p (constant within a round; docs: concepts/gemma4-assistant):

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
from torch import nn

from minimtp.checkpoint import load_weights, parse_dtype
from minimtp.config import AssistantConfig, TextConfig, load_assistant_config
from minimtp.errors import CheckpointError, CompatibilityError
from minimtp.model import Gemma4, TextModel, Unembedding, rope_cos_sin

__all__ = ["Gemma4Assistant", "load_assistant", "read_assistant", "check_pair"]


class CentroidHead(nn.Module):
    """Ordered-embedding LM head: score C centroids, keep the top K, compute the V/C token logits of each kept
    cluster (rows of ``token_ordering.view(C, V/C)``) with the tied embedding; every other token gets
    ``min(selected logits of its row) - 1`` – a finite value, so q has full support. (transformers takes the min
    over the whole batch; per row is identical for batch 1 and keeps each sequence independent of the batch.)"""

    def __init__(self, cfg: AssistantConfig):
        super().__init__()
        self.C = cfg.num_centroids
        self.K = cfg.centroid_intermediate_top_k
        self.V = cfg.text.vocab_size
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
        else:
            self.unembed = Unembedding()
        self._rope_types = {lt: (t.rope[lt], t.type_head_dim(lt)) for lt in set(t.layer_types)}

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Draft logits from the final-norm output h (not from the projection); never softcapped."""
        if self.config.use_ordered_embeddings:
            return self.masked_embedding(h, self.model.embed_tokens.weight)
        return self.unembed(h, self.model.embed_tokens.weight)

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
    """Load a ``gemma4[_unified]_assistant`` checkpoint directory and validate it against ``target`` at load time.
    ``dtype``/``device`` default to the target's; the drafter may run in another dtype than the target (it only
    proposes tokens). Quantized drafters are built from a loaded one by the CPU fast path (``minimtp.fast``)."""
    path = os.fspath(path)
    cfg = load_assistant_config(path)
    check_pair(target.config, cfg, where=path)
    ref = target.model.embed_tokens.weight
    if dtype is not None:
        try:
            dtype = parse_dtype(dtype)
        except CheckpointError:
            raise CheckpointError(
                f"unsupported assistant dtype {dtype!r}: expected float32, bfloat16 or float16 "
                "(quantized drafting: minimtp.fast.optimize(..., draft_dtype=...))"
            ) from None
    return read_assistant(path, ref.dtype if dtype is None else dtype, ref.device if device is None else device, cfg)


def read_assistant(path, dtype=torch.float32, device="cpu", cfg: AssistantConfig | None = None) -> Gemma4Assistant:
    """Load an assistant directory without a target to check it against (training, inspection)."""
    path = os.fspath(path)
    cfg = load_assistant_config(path) if cfg is None else cfg
    with torch.device("meta"):
        model = Gemma4Assistant(cfg)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    weights = load_weights(path, expected, dtype=parse_dtype(dtype), device=torch.device(device))
    model.load_state_dict(weights, assign=True, strict=True)
    return model.eval().requires_grad_(False)
