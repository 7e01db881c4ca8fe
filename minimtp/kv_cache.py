"""Paged KV cache: a block pool per layer type, per-sequence block tables, append, rollback, window trimming.

Layout (docs: concepts/paged-kv-cache). Every layer that computes K/V (not the KV-shared "reuse" layers) owns
``k[i], v[i]: [num_blocks, block_size, kvh_i, d_i]``. Layers of one type share block ids, so each type
("full_attention", "sliding_attention") has one pool of free ids and one block table per sequence; position
``pos`` of a sequence lives in slot ``table[pos // block_size] * block_size + pos % block_size``.

* append: :meth:`reserve` makes the table cover ``n`` positions; the model writes K/V through the slot mapping.
* rollback: :meth:`truncate` forgets positions ``>= n`` (rejected drafts) and frees the blocks past them.
* sliding window: :meth:`trim_window` frees sliding blocks whose positions all lie before ``n - keep``; with
  ``keep = max(W, W_draft + 1)`` both the target (W keys) and the drafter (the last W+1) still find theirs.
  Freed table entries are never read (attention only reads the blocks its window covers).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from minimtp.config import SLIDING, TextConfig
from minimtp.errors import CacheFullError


class KVCache:
    def __init__(
        self,
        cfg: TextConfig,
        num_blocks: dict[str, int],
        block_size: int = 16,
        sliding_keep: int | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ):
        self.cfg, self.block_size = cfg, block_size
        self.keep = sliding_keep if sliding_keep is not None else cfg.sliding_window + 1
        self.num_blocks = dict(num_blocks)
        self.free_blocks = {t: list(range(n - 1, -1, -1)) for t, n in self.num_blocks.items()}
        self.k: dict[int, torch.Tensor] = {}
        self.v: dict[int, torch.Tensor] = {}
        for i, mode in enumerate(cfg.kv_modes):
            if mode != "reuse":
                shape = (self.num_blocks[cfg.layer_types[i]], block_size, cfg.kv_heads[i], cfg.head_dims[i])
                self.k[i] = torch.zeros(shape, dtype=dtype, device=device)
                self.v[i] = torch.zeros(shape, dtype=dtype, device=device)
        self.tables: dict[int, dict[str, list[int | None]]] = {}  # seq -> type -> block ids (None = freed)
        self.lengths: dict[int, int] = {}

    # ---- sequence bookkeeping -------------------------------------------------------------------------------
    def add(self, seq: int) -> None:
        self.tables[seq] = {t: [] for t in self.num_blocks}
        self.lengths[seq] = 0

    def release(self, seq: int) -> None:
        for t, table in self.tables.pop(seq).items():
            self.free_blocks[t].extend(b for b in table if b is not None)
        del self.lengths[seq]

    def reserve(self, seq: int, n: int) -> None:
        """Make ``seq``'s tables cover positions ``0..n-1`` (new K/V is then written by the model)."""
        need = -(-n // self.block_size)
        for t, table in self.tables[seq].items():  # check every pool first: a failed reserve takes nothing
            missing = need - len(table)
            if missing > len(self.free_blocks[t]):
                raise CacheFullError(
                    f"KV cache pool for {t} is full: sequence {seq} needs {missing} more blocks of "
                    f"{self.block_size}, {len(self.free_blocks[t])} free of {self.num_blocks[t]}"
                )
        for t, table in self.tables[seq].items():
            for _ in range(need - len(table)):
                table.append(self.free_blocks[t].pop())
        self.lengths[seq] = max(self.lengths[seq], n)

    def truncate(self, seq: int, n: int) -> None:
        """Roll back to ``n`` valid positions; blocks entirely past ``n`` return to the pool."""
        keep_blocks = -(-n // self.block_size)
        for t, table in self.tables[seq].items():
            while len(table) > keep_blocks:
                b = table.pop()
                if b is not None:
                    self.free_blocks[t].append(b)
        self.lengths[seq] = n

    def trim_window(self, seq: int, n: int) -> None:
        """Free sliding-window blocks that no query at position >= n (target or drafter) can see again."""
        if SLIDING not in self.tables[seq]:
            return
        table = self.tables[seq][SLIDING]
        dead = max(0, n - self.keep) // self.block_size  # blocks [0, dead) hold only positions < n - keep
        for j in range(min(dead, len(table))):
            if table[j] is not None:
                self.free_blocks[SLIDING].append(table[j])
                table[j] = None

    # ---- tensors for one forward ----------------------------------------------------------------------------
    def block_tables(self, seqs: list[int], device=None) -> dict[str, torch.Tensor]:
        out = {}
        for t in self.num_blocks:
            rows = [[0 if b is None else b for b in self.tables[s][t]] for s in seqs]
            width = max(1, max(len(r) for r in rows))
            out[t] = torch.tensor([r + [0] * (width - len(r)) for r in rows], dtype=torch.int32, device=device)
        return out

    def slot_mapping(self, seqs: list[int], starts: list[int], counts: list[int], device=None) -> dict:
        """Slots of positions ``starts[b] .. starts[b]+counts[b]-1`` of each sequence, packed ``[T]`` int64."""
        bs, out = self.block_size, {}
        for t in self.num_blocks:
            slots = []
            for s, start, c in zip(seqs, starts, counts):
                table = self.tables[s][t]
                slots.extend(table[p // bs] * bs + p % bs for p in range(start, start + c))
            out[t] = torch.tensor(slots, dtype=torch.int64, device=device)
        return out

    def write(self, i: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        kc, vc = self.k[i], self.v[i]
        kc.view(-1, *kc.shape[2:]).index_copy_(0, slots, k.to(kc.dtype))
        vc.view(-1, *vc.shape[2:]).index_copy_(0, slots, v.to(vc.dtype))


class PagedContext:
    """How the target's layers reach the paged cache in one packed forward: ``store`` writes the new K/V through
    the slot mapping, ``attend`` runs the attention backend over the (source) layer's blocks."""

    def __init__(self, cache: KVCache, backend, block_tables, slots, seq_lens, cu_q_lens):
        self.cache, self.backend, self.cfg = cache, backend, cache.cfg
        self.block_tables, self.slots, self.seq_lens, self.cu_q_lens = block_tables, slots, seq_lens, cu_q_lens

    def store(self, i, k, v):
        self.cache.write(i, self.slots[self.cfg.layer_types[i]], k, v)

    def attend(self, i, q, window):
        src, t = self.cfg.kv_source(i), self.cfg.layer_types[i]
        kc, vc = self.cache.k[src], self.cache.v[src]
        out = self.backend(q.to(kc.dtype), kc, vc, self.block_tables[t], self.seq_lens, self.cu_q_lens, window, 1.0)
        return out.to(q.dtype)


class DraftPagedContext:
    """The assistant's view of the target cache: one query per sequence at position p that sees the target's
    store-layer K/V of its layer type at positions < p (``seq_lens = p``); sliding layers see the last W+1."""

    def __init__(self, cache: KVCache, draft_cfg: TextConfig, backend, block_tables, seq_lens):
        self.cache, self.dcfg, self.backend = cache, draft_cfg, backend
        self.block_tables, self.seq_lens = block_tables, seq_lens
        self.cu_q_lens = torch.arange(len(seq_lens) + 1, dtype=torch.int32, device=seq_lens.device)

    def store(self, i, k, v):  # pragma: no cover
        raise RuntimeError("assistant layers do not produce K/V")

    def attend(self, i, q, window):
        t = self.dcfg.layer_types[i]
        src = self.cache.cfg.store_layer(t)
        kc, vc = self.cache.k[src], self.cache.v[src]
        w = self.dcfg.sliding_window + 1 if t == SLIDING else 0
        out = self.backend(q.to(kc.dtype), kc, vc, self.block_tables[t], self.seq_lens, self.cu_q_lens, w, 1.0)
        return out.to(q.dtype)


class DraftRoundContext:
    """The same view as :class:`DraftPagedContext`, gathered once per drafting round.

    Within a round every draft step queries the same position p against the same target K/V, so the visible
    keys (full layers: positions < p; sliding layers: the last W+1 of them) are copied out of the blocks once,
    as contiguous float32 ``[B, kvh, S, d]`` (padded across sequences and masked), and each step is one dense
    attention call. This is the CPU path of the torch backend: on a CPU a k-step round then reads the blocks once
    instead of k times, and float32 attention over a few hundred keys is several times faster than bfloat16."""

    def __init__(self, cache: KVCache, draft_cfg: TextConfig, seqs: list[int], positions: list[int]):
        self.dcfg, self.kv, self.mask = draft_cfg, {}, {}
        bs = cache.block_size
        for t in sorted(set(draft_cfg.layer_types)):
            src = cache.cfg.store_layer(t)
            kc, vc = cache.k[src], cache.v[src]
            lo = [max(0, p - (draft_cfg.sliding_window + 1)) if t == SLIDING else 0 for p in positions]
            lens = [p - a for a, p in zip(lo, positions)]
            S = max(1, max(lens))
            rows = []
            for s, a, n in zip(seqs, lo, lens):  # slots of positions a .. a+n-1 (padding repeats the last one)
                table = torch.tensor([b or 0 for b in cache.tables[s][t]], dtype=torch.int64)
                pos = torch.arange(a, a + S).clamp(max=a + max(n, 1) - 1)
                rows.append(table[pos // bs] * bs + pos % bs)
            idx = torch.stack(rows).to(kc.device)
            flat_k, flat_v = kc.view(-1, *kc.shape[2:]), vc.view(-1, *vc.shape[2:])
            # [B, S, kvh, d] float32 (a contiguous conversion), viewed as [B, kvh, S, d]
            k = flat_k.index_select(0, idx.view(-1)).float().view(len(seqs), S, *kc.shape[2:]).transpose(1, 2)
            v = flat_v.index_select(0, idx.view(-1)).float().view(len(seqs), S, *vc.shape[2:]).transpose(1, 2)
            self.kv[t] = (k, v)
            if min(lens) < S:  # ragged batch: mask the padding (a query with no key at all gets zeros)
                keep = torch.arange(S, device=kc.device)[None, :] < torch.tensor(lens, device=kc.device)[:, None]
                self.mask[t] = keep[:, None, None, :]
            else:
                self.mask[t] = None

    def store(self, i, k, v):  # pragma: no cover
        raise RuntimeError("assistant layers do not produce K/V")

    def attend(self, i, q, window):
        t = self.dcfg.layer_types[i]
        k, v = self.kv[t]
        B, Hq, d = q.shape
        mask = self.mask[t]
        o = F.scaled_dot_product_attention(
            q.float()[:, :, None, :], k, v, attn_mask=mask, scale=1.0, enable_gqa=Hq != k.shape[1]
        )[:, :, 0, :]
        return (o if mask is None else torch.nan_to_num(o)).to(q.dtype)
