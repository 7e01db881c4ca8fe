"""Attention: the contract every layer calls, the paged-attention reference, and the four contexts.

A layer never knows where its keys live. It hands its new K/V to a *context* (``store``) and asks the context to
attend (``attend``); the context decides whether keys come from this forward pass (dense, no cache) or from the
paged KV cache, and whether the queries are the target's or the assistant's (docs: concepts/paged-kv-cache).

* :class:`DenseContext`: B sequences of S tokens (``model(ids)``), keys from the same tokens, causal [+ window];
* :class:`DraftDenseContext`: assistant queries at positions p over dense target K/V at positions < p;
* :class:`PagedContext`: the engine's new tokens (prefill, verify) over the paged cache, via an attention backend;
* :class:`DraftPagedContext`: one assistant query per sequence at p over the paged target K/V at positions < p.

The paged reference, :func:`paged_attention`, has one signature shared with its Triton twin
(``minimtp.kernels.paged_attention``):

    paged_attention(q, k_cache, v_cache, block_tables, seq_lens, cu_q_lens, window=0, scale=1.0) -> out

* ``q`` ``[T, Hq, D]``: the new queries of all sequences, packed (sequence b owns rows ``cu_q_lens[b]:cu_q_lens[b+1]``).
* ``k_cache``, ``v_cache`` ``[num_blocks, block_size, Hkv, D]``: the block pool of one layer.
* ``block_tables`` ``[B, max_blocks]`` int32: block ids of each sequence, in position order.
* ``seq_lens`` ``[B]`` int32: keys of sequence b are its positions ``0 .. seq_lens[b]-1``. Query r of sequence b sits
  at the absolute position ``i = seq_lens[b] - q_len_b + r`` (decode: q_len 1; verify: k+1; prefill: the prompt).
* ``window``: 0 for full attention, else query i sees keys j with ``i - window < j <= i`` (W keys, itself included).
* ``scale``: softmax scale (1.0 for Gemma 4: q and k are RMS-normalised).

    out[i] = softmax_j( scale · q_i·k_j  (masked) ) · v_j

Grouped-query attention: query head h reads KV head ``h // G`` (G = Hq // Hkv). Only the blocks that hold keys a query
can see are read, so blocks that a sliding-window cache has freed (left at any id) are never touched.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F

from minimtp.config import SLIDING, TextConfig
from minimtp.errors import CompatibilityError


class AttentionContext(Protocol):
    """What a decoder layer calls. ``i`` is the layer index of the model that owns the context."""

    def store(self, i: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Keep layer i's new keys and values ``[T, Hkv, D]`` (RoPE applied to k) for this and later queries.
        Called only by layers that compute K/V (not by KV-shared "reuse" layers, nor by the assistant's)."""

    def attend(self, i: int, q: torch.Tensor, window: int) -> torch.Tensor:
        """Queries ``[T, Hq, D]`` (RoPE applied) of layer i → attention outputs ``[T, Hq, D]`` over the keys this
        context makes visible to them; ``window`` is the layer's sliding window (0: full attention)."""


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    cu_q_lens: torch.Tensor,
    window: int = 0,
    scale: float = 1.0,
) -> torch.Tensor:
    """PyTorch reference: gather each sequence's visible blocks, then masked SDPA in float32 (the precision the
    kernels accumulate in). See the module docstring."""
    T, Hq, D = q.shape
    block_size, Hkv = k_cache.shape[1], k_cache.shape[2]
    G = Hq // Hkv
    out = torch.empty_like(q)
    cu = cu_q_lens.tolist()
    for b, L in enumerate(seq_lens.tolist()):
        s, e = cu[b], cu[b + 1]
        if e == s:
            continue
        first_q = L - (e - s)  # absolute position of the first query
        lo = max(0, first_q - window + 1) if window > 0 else 0  # oldest key any query here can see
        b0, b1 = lo // block_size, (L + block_size - 1) // block_size
        blocks = block_tables[b, b0:b1]
        keys = slice(lo - b0 * block_size, L - b0 * block_size)
        k = k_cache.index_select(0, blocks).reshape(-1, Hkv, D)[keys].float()  # [n_keys, Hkv, D]
        v = v_cache.index_select(0, blocks).reshape(-1, Hkv, D)[keys].float()
        mask = None  # one query sees exactly the keys lo .. L-1
        if e - s > 1:
            qpos, kpos = torch.arange(first_q, L)[:, None], torch.arange(lo, L)[None, :]
            mask = ((kpos <= qpos) & ((kpos > qpos - window) if window > 0 else True)).repeat(G, 1)
        # grouped-query attention as G·q_len queries per KV head: [Hkv, G·q_len, D] (no copies of K/V per group)
        qg = q[s:e].float().view(e - s, Hkv, G, D).permute(1, 2, 0, 3).reshape(1, Hkv, G * (e - s), D)
        o = F.scaled_dot_product_attention(qg, k.transpose(0, 1)[None], v.transpose(0, 1)[None], mask, scale=scale)
        out[s:e] = o.view(Hkv, G, e - s, D).permute(2, 0, 1, 3).reshape(e - s, Hq, D)
    return out


def get_attention_backend(name: str):
    """``"torch"`` → :func:`paged_attention`; ``"triton"`` → the Triton kernel with the same signature."""
    if name == "torch":
        return paged_attention
    if name == "triton":
        from minimtp.kernels.paged_attention import paged_attention as triton_paged_attention

        return triton_paged_attention
    raise CompatibilityError(f"attention backend {name!r}: expected 'torch' or 'triton'")


def _sdpa(q, k, v, mask):
    """softmax(q kᵀ · 1.0, mask) v on ``[B, heads, S, D]`` tensors (GQA when the head counts differ)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0, enable_gqa=q.shape[1] != k.shape[1])


class DenseContext:
    """B sequences of S tokens each (packed as T = B·S), causal [& window], no cache: ``model(input_ids)``."""

    def __init__(self, cfg: TextConfig, B: int, S: int):
        self.cfg = cfg
        self.B = B
        self.S = S
        self.kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def store(self, i, k, v):
        self.kv[i] = (k, v)

    def attend(self, i, q, window):
        k, v = self.kv[self.cfg.kv_source(i)]
        B, S = self.B, self.S
        pos = torch.arange(S, device=q.device)
        mask = (pos[None, :] <= pos[:, None]) & ((pos[None, :] > pos[:, None] - window) if window else True)
        o = _sdpa(*(t.view(B, S, *t.shape[1:]).transpose(1, 2) for t in (q, k, v)), mask)
        return o.transpose(1, 2).reshape(B * S, *q.shape[1:])


class DraftDenseContext:
    """Assistant queries ``[B, S_q]`` at positions ``qpos`` over dense target K/V ``{type: (K, V)}`` each
    ``[B, S_k, kvh, d]``: key j is visible iff j < p (full), and also j >= p - (W+1) (sliding). Used for the
    comparison with transformers and for distillation (every position of a sequence at once)."""

    def __init__(self, cfg: TextConfig, kv: dict, qpos: torch.Tensor):
        self.cfg = cfg
        self.kv = kv
        self.qpos = qpos

    def store(self, i, k, v):  # pragma: no cover - assistant layers own no K/V
        raise RuntimeError("assistant layers do not produce K/V")

    def attend(self, i, q, window):
        lt = self.cfg.layer_types[i]
        k, v = self.kv[lt]
        B, Sq = self.qpos.shape
        kpos = torch.arange(k.shape[1], device=q.device)[None, None, None, :]
        p = self.qpos[:, None, :, None]  # [B, 1, Sq, 1]
        mask = (kpos < p) & ((kpos >= p - (self.cfg.sliding_window + 1)) if lt == SLIDING else True)
        qb = q.view(B, Sq, *q.shape[1:]).transpose(1, 2)
        o = _sdpa(qb, k.to(q.dtype).transpose(1, 2), v.to(q.dtype).transpose(1, 2), mask)  # drafter dtype may differ
        # a query with no visible key (p = 0) would be NaN; it never drafts, keep it finite
        return torch.nan_to_num(o.transpose(1, 2).reshape(B * Sq, *q.shape[1:]))


class PagedContext:
    """The target's layers over the paged cache in one packed forward: sequence ``seqs[b]`` runs ``counts[b]`` new
    tokens at positions ``starts[b] ..`` (reserved in the cache). ``store`` writes their K/V through the slot
    mapping; ``attend`` runs the attention backend over the (source) layer's blocks."""

    def __init__(self, cache, backend, seqs: list[int], starts: list[int], counts: list[int]):
        dev = cache.device
        self.cache = cache
        self.backend = backend
        self.cfg = cache.cfg
        self.block_tables = cache.block_tables(seqs, dev)
        self.slots = cache.slot_mapping(seqs, starts, counts, dev)
        self.seq_lens = torch.tensor([s + c for s, c in zip(starts, counts)], dtype=torch.int32, device=dev)
        self.cu_q_lens = torch.tensor([0] + counts, device=dev).cumsum(0, dtype=torch.int32)

    def store(self, i, k, v):
        self.cache.write(i, self.slots[self.cfg.layer_types[i]], k, v)

    def last_queries(self) -> torch.Tensor:
        """The rows of each sequence's last new token; from now on each sequence has that one query (the layers
        that follow write no K/V: the KV-shared ones)."""
        rows = self.cu_q_lens[1:].long() - 1
        self.cu_q_lens = torch.arange(len(rows) + 1, dtype=torch.int32, device=rows.device)
        return rows

    def attend(self, i, q, window):
        src, t = self.cfg.kv_source(i), self.cfg.layer_types[i]
        kc, vc = self.cache.k[src], self.cache.v[src]
        out = self.backend(q.to(kc.dtype), kc, vc, self.block_tables[t], self.seq_lens, self.cu_q_lens, window, 1.0)
        return out.to(q.dtype)


class DraftPagedContext:
    """The assistant's view of the paged target cache: one query per sequence ``seqs[b]`` at position
    ``positions[b]`` that sees the target's store-layer K/V of its layer type at positions < p (``seq_lens = p``);
    sliding layers see the last W+1. The same for every draft step of a round (the position is constant)."""

    def __init__(self, cache, draft_cfg: TextConfig, backend, seqs: list[int], positions: list[int]):
        dev = cache.device
        self.cache = cache
        self.dcfg = draft_cfg
        self.backend = backend
        self.block_tables = cache.block_tables(seqs, dev)
        self.seq_lens = torch.tensor(positions, dtype=torch.int32, device=dev)
        self.cu_q_lens = torch.arange(len(seqs) + 1, dtype=torch.int32, device=dev)

    def store(self, i, k, v):  # pragma: no cover
        raise RuntimeError("assistant layers do not produce K/V")

    def attend(self, i, q, window):
        t = self.dcfg.layer_types[i]
        src = self.cache.cfg.store_layer(t)
        kc, vc = self.cache.k[src], self.cache.v[src]
        w = self.dcfg.sliding_window + 1 if t == SLIDING else 0
        out = self.backend(q.to(kc.dtype), kc, vc, self.block_tables[t], self.seq_lens, self.cu_q_lens, w, 1.0)
        return out.to(q.dtype)
