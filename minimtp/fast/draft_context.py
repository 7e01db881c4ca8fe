"""The drafter's view of the paged cache, gathered once per drafting round (the CPU twin of DraftPagedContext).

Equal to the reference context (tests/test_fast.py: ragged batch, sliding window wrapped several times, freed
blocks); docs: concepts/gemma4-assistant, "One position for the whole round".
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from minimtp.config import SLIDING, TextConfig
from minimtp.kv_cache import KVCache


class DraftRoundContext:
    """Twin of :class:`minimtp.attention.DraftPagedContext`: the same view, gathered once per drafting round.

    Within a round every draft step queries the same position p against the same target K/V, so the visible
    keys (full layers: positions < p; sliding layers: the last W+1 of them) are copied out of the blocks once,
    as contiguous float32 ``[B, kvh, S, d]`` (padded across sequences and masked), and each step is one dense
    attention call: on a CPU a k-step round then reads the blocks once instead of k times, and float32 attention
    over a few hundred keys is faster than bfloat16 (docs/benchmarks.md).
    Same constructor as the reference; ``backend`` is not used (the gathered keys are attended densely)."""

    def __init__(self, cache: KVCache, draft_cfg: TextConfig, backend, seqs: list[int], positions: list[int]):
        self.dcfg = draft_cfg
        self.kv = {}
        self.mask = {}
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
        mask, kvh = self.mask[t], k.shape[1]
        # grouped-query attention as G = Hq / kvh queries per KV head (no copies of K/V per group)
        o = F.scaled_dot_product_attention(q.float().view(B, kvh, Hq // kvh, d), k, v, attn_mask=mask, scale=1.0)
        return (o if mask is None else torch.nan_to_num(o)).reshape(B, Hq, d).to(q.dtype)
