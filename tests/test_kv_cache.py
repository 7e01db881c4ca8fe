"""Property tests of the paged KV cache (minimtp.kv_cache.KVCache) and the torch paged_attention reference.

A dense per-sequence reference (the K/V written at each position, per layer) is kept beside the cache; random
interleavings of add / reserve+write / truncate (rollback) / trim_window / release over several sequences are
checked by reading the K/V back through block_tables and slot_mapping, and through paged_attention against dense
attention, for full and sliding windows, on sequences much longer than the window: rollback must be tested across
the sliding-window wrap point (mlx-swift-lm issue #474: a wrapped ring-buffer cache could not be rewound and greedy
output diverged after 512 tokens; docs: concepts/paged-kv-cache, "Rollback of rejected drafts").
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import minimtp
from minimtp.attention import paged_attention
from minimtp.config import FULL, SLIDING, parse_text_config
from minimtp.kv_cache import KVCache

W = 4  # sliding window: sequences below reach ~80 positions, i.e. the window wraps ~20 times
CFG = parse_text_config(
    dict(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=6,
        layer_types=[SLIDING, SLIDING, FULL, SLIDING, SLIDING, FULL],
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=4,
        global_head_dim=8,
        sliding_window=W,
        hidden_size_per_layer_input=0,
        num_kv_shared_layers=3,  # modes [None, store, store, reuse, reuse, reuse]
    )
)
OWN_KV = [i for i, m in enumerate(CFG.kv_modes) if m != "reuse"]


def test_layout():
    assert CFG.kv_modes == (None, "store", "store", "reuse", "reuse", "reuse")
    cache = KVCache(CFG, {SLIDING: 3, FULL: 5}, block_size=2)
    assert sorted(cache.k) == sorted(cache.v) == OWN_KV == [0, 1, 2]  # reuse layers own no cache tensors
    assert cache.k[0].shape == (3, 2, 2, 4) and cache.k[2].shape == (5, 2, 2, 8)
    assert cache.keep == W + 1  # default: the drafter's W + 1


def dense_attention(q, k, v, q_pos, window, scale=1.0):
    """Reference: q [Q, Hq, D] at absolute positions q_pos; k/v [L, Hkv, D] at positions 0..L-1."""
    Hq, Hkv = q.shape[1], k.shape[1]
    k = k.repeat_interleave(Hq // Hkv, dim=1).double()
    v = v.repeat_interleave(Hq // Hkv, dim=1).double()
    s = torch.einsum("qhd,khd->hqk", q.double(), k) * scale
    kpos = torch.arange(k.shape[0])
    mask = kpos[None, :] <= q_pos[:, None]
    if window:
        mask &= kpos[None, :] > q_pos[:, None] - window
    s = s.masked_fill(~mask[None], -math.inf)
    return torch.einsum("hqk,khd->qhd", torch.softmax(s, -1), v).float()


class Model:
    """KVCache under test + the dense reference, driven the way the engine drives it."""

    def __init__(self, sizes, block_size, seed):
        self.cache = KVCache(CFG, sizes, block_size=block_size)
        self.bs = block_size
        self.g = torch.Generator().manual_seed(seed)
        self.ref: dict[int, dict[int, tuple[list, list]]] = {}  # seq -> layer -> (k list, v list)
        self.committed: dict[int, int] = {}  # length at the last trim_window (never rolled back below)
        self.failed: dict[int, bool] = {}  # a reserve of this sequence raised CacheFullError

    # -- operations ---------------------------------------------------------------------------------------------
    def add(self, seq):
        self.cache.add(seq)
        self.ref[seq] = {i: ([], []) for i in OWN_KV}
        self.committed[seq] = 0

    def length(self, seq):
        return len(self.ref[seq][0][0])

    def append(self, seq, n):
        """reserve + write n new positions (as one forward); CacheFullError leaves the reference unchanged."""
        start = self.length(seq)
        self.cache.reserve(seq, start + n)
        assert self.cache.lengths[seq] == start + n
        slots = self.cache.slot_mapping([seq], [start], [n])
        for i in OWN_KV:
            t = CFG.layer_types[i]
            kvh, d = CFG.kv_heads[i], CFG.head_dims[i]
            k = torch.randn(n, kvh, d, generator=self.g)
            v = torch.randn(n, kvh, d, generator=self.g)
            self.cache.write(i, slots[t], k, v)
            self.ref[seq][i][0].extend(k)
            self.ref[seq][i][1].extend(v)

    def truncate(self, seq, n):
        self.cache.truncate(seq, n)
        for i in OWN_KV:
            del self.ref[seq][i][0][n:], self.ref[seq][i][1][n:]

    def trim(self, seq):
        n = self.length(seq)
        self.cache.trim_window(seq, n)
        self.committed[seq] = n

    def release(self, seq):
        self.cache.release(seq)
        del self.ref[seq], self.committed[seq]

    # -- checks -------------------------------------------------------------------------------------------------
    def lowest_kept(self, seq, t):
        """Lowest position whose K/V must still be readable."""
        return 0 if t == FULL else max(0, self.committed[seq] - self.cache.keep)

    def check_pool(self):
        for t, n in self.cache.num_blocks.items():
            used = [b for tables in self.cache.tables.values() for b in tables[t] if b is not None]
            free = self.cache.free_blocks[t]
            assert len(used) + len(free) == n, t
            assert sorted(used + free) == list(range(n)), t  # no block lost, none owned twice
            for seq, tables in self.cache.tables.items():  # no sequence holds more than it needs
                if not self.failed.get(seq):
                    assert len(tables[t]) <= -(-self.cache.lengths[seq] // self.bs), (seq, t)

    def check_readback(self):
        for seq in self.ref:
            L = self.length(seq)
            assert self.cache.lengths[seq] == L
            if L == 0:
                continue
            bt = self.cache.block_tables([seq])
            for i in OWN_KV:
                t = CFG.layer_types[i]
                lo = self.lowest_kept(seq, t)
                want_k = torch.stack(self.ref[seq][i][0][lo:])
                want_v = torch.stack(self.ref[seq][i][1][lo:])
                kc = self.cache.k[i].view(-1, *self.cache.k[i].shape[2:])
                vc = self.cache.v[i].view(-1, *self.cache.v[i].shape[2:])
                pos = torch.arange(lo, L)
                slots = bt[t][0, pos // self.bs].long() * self.bs + pos % self.bs
                assert torch.equal(kc[slots], want_k), (seq, i)
                assert torch.equal(vc[slots], want_v), (seq, i)
            # slot_mapping covers every type at once: only over positions still cached in all of them
            lo = max(self.lowest_kept(seq, t) for t in self.cache.num_blocks)
            sm = self.cache.slot_mapping([seq], [lo], [L - lo])
            for t, slots in sm.items():
                pos = torch.arange(lo, L)
                assert torch.equal(slots, bt[t][0, pos // self.bs].long() * self.bs + pos % self.bs), (seq, t)

    def check_attention(self, q_lens: dict[int, int]):
        """Target attention (q_len queries ending at the last position; window W or full) for all given
        sequences packed into one call, and the drafter's view (one query, W + 1 keys before position p)."""
        seqs = [s for s in q_lens if self.length(s) > 0]
        if not seqs:
            return
        Hq = CFG.num_heads
        for i in OWN_KV:
            t = CFG.layer_types[i]
            d = CFG.head_dims[i]
            for window in [W, W + 1] if t == SLIDING else [0]:
                qls = []
                for s in seqs:
                    L, ql = self.length(s), q_lens[s]
                    if window:  # oldest query whose window is still cached
                        first_ok = max(0, self.lowest_kept(s, t) + window - 1)
                        ql = min(ql, L - first_ok)
                    qls.append(max(1, min(ql, L)))
                q = torch.randn(sum(qls), Hq, d, generator=self.g)
                seq_lens = torch.tensor([self.length(s) for s in seqs], dtype=torch.int32)
                cu = torch.tensor([0] + qls).cumsum(0).to(torch.int32)
                bt = self.cache.block_tables(seqs)[t]
                out = paged_attention(q, self.cache.k[i], self.cache.v[i], bt, seq_lens, cu, window, 0.5)
                for b, s in enumerate(seqs):
                    L = self.length(s)
                    k = torch.stack(self.ref[s][i][0])
                    v = torch.stack(self.ref[s][i][1])
                    q_pos = torch.arange(L - qls[b], L)
                    want = dense_attention(q[cu[b] : cu[b + 1]], k, v, q_pos, window, 0.5)
                    err = (out[cu[b] : cu[b + 1]] - want).abs().max().item()  # (assert_close is slow here)
                    assert err <= 1e-5, (s, i, window, err)


OPS = st.sampled_from(["add", "append", "append", "append", "round", "truncate", "trim", "release"])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.data(),
    block_size=st.integers(1, 5),
    sliding_blocks=st.integers(2, 30),
    full_blocks=st.integers(4, 60),
    seed=st.integers(0, 2**16),
)
def test_random_operations_match_dense_reference(data, block_size, sliding_blocks, full_blocks, seed):
    m = Model({SLIDING: sliding_blocks, FULL: full_blocks}, block_size, seed)
    next_seq = 0
    for _ in range(data.draw(st.integers(5, 40), label="n_ops")):
        op = data.draw(OPS, label="op")
        live = sorted(m.ref)
        if op == "add" or not live:
            m.add(next_seq)
            next_seq += 1
            continue
        seq = data.draw(st.sampled_from(live), label="seq")
        L, c = m.length(seq), m.committed[seq]
        try:
            if op == "append":
                m.append(seq, data.draw(st.integers(1, 12), label="n"))
            elif op == "round":  # one engine round: pending + k drafts, accept a few, roll back, trim
                k = data.draw(st.integers(0, 7), label="k")
                m.append(seq, k + 1)
                m.truncate(seq, L + 1 + data.draw(st.integers(0, k), label="accepted"))
                m.trim(seq)
            elif op == "truncate":  # roll back, never below what trim_window has already committed
                m.truncate(seq, data.draw(st.integers(c, L), label="to"))
            elif op == "trim":
                m.trim(seq)
            elif op == "release":
                m.release(seq)
        except minimtp.CacheFullError as e:
            m.failed[seq] = True
            assert "\n" not in str(e) and "full" in str(e)
            # the failed reserve changed nothing visible: restore the reference length for "round"
            assert m.cache.lengths[seq] == m.length(seq)
        m.check_pool()
        m.check_readback()
    m.check_attention({s: data.draw(st.integers(1, 9), label="q_len") for s in m.ref})


def test_engine_like_rounds_wrap_the_window_many_times():
    """Three sequences decoding 200 positions each in rounds of k+1 with partial acceptance; the pool holds only
    a few sliding blocks per sequence, so it is recycled dozens of times. Attention checked after every round."""
    g = torch.Generator().manual_seed(0)
    bs = 3
    per_seq_sliding = -(-(W + 1 + 8) // bs) + 2
    m = Model({SLIDING: 3 * per_seq_sliding, FULL: 3 * (-(-215 // bs))}, bs, seed=1)
    prompts = {0: 1, 1: 7, 2: 20}
    for s, n in prompts.items():
        m.add(s)
        m.append(s, n)
        m.trim(s)
    rounds = 0
    while min(m.length(s) for s in m.ref) < 200:
        for s in list(m.ref):
            L = m.length(s)
            k = int(torch.randint(0, 8, (), generator=g))
            m.append(s, k + 1)
            m.check_attention({s: k + 1})  # verify step: k + 1 queries over the not-yet-rolled-back drafts
            m.truncate(s, L + 1 + int(torch.randint(0, k + 1, (), generator=g)))
            m.trim(s)
        m.check_pool()
        m.check_readback()
        m.check_attention({s: 1 for s in m.ref})
        rounds += 1
    assert rounds > 20
    used = sum(1 for t in m.cache.tables.values() for b in t[SLIDING] if b is not None)
    assert used <= 3 * per_seq_sliding
    for s in list(m.ref):
        m.release(s)
    assert sorted(m.cache.free_blocks[SLIDING]) == list(range(3 * per_seq_sliding))
    assert sorted(m.cache.free_blocks[FULL]) == list(range(m.cache.num_blocks[FULL]))


def test_pool_exhaustion_leaves_other_sequences_intact():
    m = Model({SLIDING: 6, FULL: 6}, block_size=4, seed=3)
    m.add(0)
    m.append(0, 10)  # 3 blocks of each type
    m.add(1)
    m.append(1, 8)  # 2 blocks
    before = {i: (m.cache.k[i].clone(), m.cache.v[i].clone()) for i in OWN_KV}
    with pytest.raises(minimtp.CacheFullError) as e:
        m.cache.reserve(1, 8 + 9)  # needs 3 more, 1 free
    msg = str(e.value)
    assert "\n" not in msg and "sequence 1" in msg and "free" in msg, msg
    assert m.cache.lengths[1] == 8
    for i in OWN_KV:  # nothing written anywhere
        assert torch.equal(m.cache.k[i], before[i][0]) and torch.equal(m.cache.v[i], before[i][1])
    m.check_readback()
    m.check_attention({0: 3, 1: 2})
    m.check_pool()
    # releasing sequence 0 makes room; the retry succeeds and sequence 1's old data is still there
    m.release(0)
    m.check_pool()
    m.append(1, 9)
    m.check_readback()
    m.check_attention({1: 9})


def test_freed_blocks_return_to_the_pool():
    m = Model({SLIDING: 8, FULL: 8}, block_size=2, seed=4)
    m.add(0)
    m.append(0, 16)
    assert m.cache.free_blocks[FULL] == [] and m.cache.free_blocks[SLIDING] == []
    m.truncate(0, 5)  # blocks 3..7 hold only positions >= 6: freed (block 2 keeps position 4)
    assert len(m.cache.free_blocks[FULL]) == 5 and len(m.cache.free_blocks[SLIDING]) == 5
    m.trim(0)  # keep = W + 1 = 5: positions < 0 dead -> nothing freed yet at length 5
    assert len(m.cache.free_blocks[SLIDING]) == 5
    m.append(0, 7)
    m.trim(0)  # length 12: positions < 7 are dead -> blocks 0..2 (positions 0..5) freed
    assert len(m.cache.free_blocks[SLIDING]) == 8 - 6 + 3
    assert m.cache.tables[0][SLIDING][:3] == [None] * 3
    m.check_readback()
    m.check_attention({0: 1})
    m.release(0)
    assert sorted(m.cache.free_blocks[SLIDING]) == list(range(8))
    assert sorted(m.cache.free_blocks[FULL]) == list(range(8))


def test_failed_reserve_takes_no_blocks():
    cache = KVCache(CFG, {SLIDING: 8, FULL: 2}, block_size=4)  # tables iterate sliding first
    cache.add(0)
    free = {t: list(v) for t, v in cache.free_blocks.items()}
    with pytest.raises(minimtp.CacheFullError):
        cache.reserve(0, 12)  # 3 blocks per type: sliding has 8, full only 2
    assert cache.free_blocks == free
    assert all(table == [] for table in cache.tables[0].values())
