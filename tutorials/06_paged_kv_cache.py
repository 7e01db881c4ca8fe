# %% [markdown]
# # 06 · The paged KV cache: blocks, tables, append, rollback, window trimming
#
# During decoding every layer that computes K/V would recompute them for the whole prefix at each step; a
# **KV cache** stores them instead. Serving many sequences of unknown length from one memory pool is the problem
# vLLM's *paged attention* solved: memory is a pool of fixed-size **blocks** of `block_size` positions, and each
# sequence owns a **block table**, the list of its block ids in position order. Position $i$ of a sequence lives in
#
# $$\text{slot}(i) = \text{table}[\lfloor i / B \rfloor] \cdot B + (i \bmod B), \qquad B = \text{block size}.$$
#
# Speculative decoding adds two operations: **rollback** (forget the K/V of rejected drafts) and, with
# sliding-window layers, **window trimming** (free blocks no query can see any more). minimtp's cache is
# `minimtp/kv_cache.py`.

# %%
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)) if "__file__" in globals() else "tutorials")
from _tiny import tiny_target

from minimtp.attention import PagedContext, paged_attention
from minimtp.config import FULL, SLIDING
from minimtp.kv_cache import KVCache

torch.set_num_threads(1)  # tiny tensors: threads only add overhead
target = tiny_target(seed=0)
cfg = target.config
BS = 4
cache = KVCache(cfg, {FULL: 12, SLIDING: 12}, block_size=BS, sliding_keep=cfg.sliding_window + 1)
print("K/V tensors per layer (only layers that compute K/V):")
for i, k in cache.k.items():
    print(f"  layer {i} ({cfg.layer_types[i]}): k {tuple(k.shape)} = [num_blocks, block_size, kv_heads, head_dim]")
assert sorted(cache.k) == [0, 1]  # layers 2, 3 reuse the K/V of layers 0, 1 (tutorial 02)

# %% [markdown]
# ## Append
#
# `add(seq)` registers a sequence, `reserve(seq, n)` grows its tables to cover positions $0..n-1$ (taking free
# block ids from the pool), `slot_mapping` turns positions into slots and the model writes its new K/V there
# through a `PagedContext`. Two sequences share the pool; as they grow and roll back, their blocks scatter.


# %%
def forward(seq_ids, starts, chunks):
    """Run the target on new tokens of several sequences, appending their K/V. Returns the logits."""
    counts = [len(c) for c in chunks]
    for s, st, c in zip(seq_ids, starts, counts):
        cache.reserve(s, st + c)
    ctx = PagedContext(cache, paged_attention, seq_ids, starts, counts)  # block tables, slots, lengths
    ids = torch.tensor([t for c in chunks for t in c])
    pos = torch.tensor([st + j for st, c in zip(starts, counts) for j in range(c)])
    with torch.no_grad():
        return target.run(ids, pos, ctx).logits


a = [2, 17, 5, 33, 8, 40, 12]
b = [3, 4, 10, 11, 12, 9, 9, 30, 31, 6]
cache.add(0)
cache.add(1)
logits = forward([0, 1], [0, 0], [a, b])
for s in (0, 1):
    print(f"seq {s}: length {cache.lengths[s]:2d}, tables {cache.tables[s]}")
print("free sliding blocks:", cache.free_blocks[SLIDING])


def dense_logits(tokens):
    with torch.no_grad():
        return target(torch.tensor([tokens]))[0]


# packed rows: sequence 0 first, then sequence 1. Paged attention must equal dense causal attention.
assert torch.allclose(logits[: len(a)], dense_logits(a), atol=1e-5)
assert torch.allclose(logits[len(a) :], dense_logits(b), atol=1e-5)

# %% [markdown]
# ## Decode and verify steps
#
# A verify step appends $k+1$ tokens at once (the pending token and $k$ drafts). Here sequence 0 appends four
# "drafts". Their K/V are written, the target's rows are computed, and then...

# %%
drafts = [9, 21, 30, 44]
start = len(a)
rows = forward([0], [start], [drafts])
print(f"after the verify step: length {cache.lengths[0]}, table {cache.tables[0][FULL]}")
assert torch.allclose(rows, dense_logits(a + drafts)[start:], atol=1e-5)

# %% [markdown]
# ## Rollback
#
# ...suppose only the first draft was accepted. `truncate(seq, n)` keeps positions $< n$ and returns every block
# that lies entirely past $n$ to the pool. Nothing is erased: the rejected drafts' K/V stay in the slots of a
# partly used block, but attention only reads positions $< \text{seq\_len}$, and the next write overwrites them.
# The danger is a cache that **forgets to roll back**: the next forward would attend to the rejected drafts'
# K/V (assignment `kv_rollback` has this bug as a fixture).

# %%
free_before = len(cache.free_blocks[FULL])
n_keep = start + 1
cache.truncate(0, n_keep)
print(f"after rollback to {n_keep}: table {cache.tables[0][FULL]}, freed {len(cache.free_blocks[FULL]) - free_before}")
assert len(cache.tables[0][FULL]) == -(-n_keep // BS)
new = [50, 51]
rows = forward([0], [n_keep], [new])
assert torch.allclose(rows, dense_logits(a + drafts[:1] + new)[n_keep:], atol=1e-5)  # no stale K/V visible

# %% [markdown]
# ## Window trimming
#
# A sliding layer with window $W$ only looks back $W-1$ positions, and the drafter $W$ (it sees the last $W+1$
# keys *before* its query, tutorial 03). Blocks whose positions are all older than $n - \text{keep}$ with
# $\text{keep} = W+1$ can be freed: `trim_window(seq, n)` marks them `None` in the sliding table and returns them
# to the pool. Full-attention tables keep everything, so a long sequence costs $O(n)$ full blocks but only
# $O(W)$ sliding blocks.

# %%
n = cache.lengths[0]
cache.trim_window(0, n)
print(f"length {n}, keep {cache.keep}: sliding table {cache.tables[0][SLIDING]}, full table {cache.tables[0][FULL]}")
assert cache.tables[0][SLIDING][0] is None and all(x is not None for x in cache.tables[0][FULL])
rows = forward([0], [n], [[7]])  # still exact: the freed blocks were not visible to anyone
assert torch.allclose(rows, dense_logits(a + drafts[:1] + new + [7])[n:], atol=1e-5)

# %% [markdown]
# ## Bookkeeping invariant
#
# Every block id is either free or in exactly one table. `release(seq)` returns all of a finished sequence's
# blocks.

# %%
for t in (FULL, SLIDING):
    used = [x for s in cache.tables for x in cache.tables[s][t] if x is not None]
    assert len(used) == len(set(used)) and sorted(used + cache.free_blocks[t]) == list(range(12)), t
cache.release(0)
cache.release(1)
assert all(sorted(cache.free_blocks[t]) == list(range(12)) for t in (FULL, SLIDING))
print("tutorial 06 OK")
