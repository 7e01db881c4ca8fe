# %% [markdown]
# # 07 · Paged attention in Triton (run on the CPU by Triton's interpreter)
#
# `minimtp.attention.paged_attention` is the PyTorch reference: for each sequence it gathers the visible blocks
# into a contiguous tensor and calls SDPA. A GPU kernel cannot afford the gather: it reads K and V **directly from
# the block pool**, one block (or tile) of positions at a time, and combines them with an **online softmax**.
#
# Triton programs are Python functions decorated with `@triton.jit`, launched on a grid of program instances.
# With `TRITON_INTERPRET=1` they run in NumPy on the CPU: slow (milliseconds per program), but the same code, so
# we can develop and test kernels anywhere. Rules for the interpreter: compute in fp32, no `libdevice`, no block
# pointers, and masks on every load (there is no bounds checking: an unmasked out-of-range load silently reads
# neighbouring memory).
#
# The interpreter is an explicit opt-in, and it must come first: `@triton.jit` decides interpreted or compiled
# *when it decorates a function* — Triton's own `tl.max`, `tl.sum`, ... when `triton` is imported, which torch
# may do early — so the variable has to be set before anything imports torch, triton or minimtp. This tutorial
# runs its kernels on CPU tensors, so it sets it in its first cell; from a shell the same is
# `TRITON_INTERPRET=1 python script.py`. minimtp never sets it for you: without it the library kernels raise a
# `CompatibilityError` on CPU tensors.

# %%
import os

os.environ["TRITON_INTERPRET"] = "1"  # before torch / triton / minimtp are imported: kernels run on the CPU

# %%
import math
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)) if "__file__" in globals() else "tutorials")
from _tiny import tiny_assistant, tiny_target

import minimtp
from minimtp.attention import paged_attention as reference
from minimtp.kernels.paged_attention import _random_case
from minimtp.kernels.paged_attention import paged_attention as library_kernel

torch.set_num_threads(1)  # tiny tensors: threads only add overhead
print("Triton", triton.__version__, "| interpreter:", bool(triton.knobs.runtime.interpret))

# %% [markdown]
# ## Online softmax
#
# For one query $q$ and keys $k_1..k_n$: $o = \sum_j \frac{e^{s_j}}{\sum_i e^{s_i}} v_j$ with $s_j = q\cdot k_j$
# (times the scale). Processing the keys in tiles, keep a running max $m$, a running denominator $\ell$ and an
# unnormalised output $a$. For a new tile with scores $s$:
#
# $$m' = \max(m, \max s), \quad \ell' = \ell\, e^{m-m'} + \sum e^{s-m'}, \quad
#   a' = a\, e^{m-m'} + \sum_j e^{s_j-m'} v_j ,$$
#
# and at the end $o = a / \ell$. Subtracting the running max keeps every exponent $\le 0$ (no overflow), and the
# rescaling factor $e^{m-m'}$ corrects what was accumulated under the old max. First in plain PyTorch, on one
# query, to see that the recurrence is exact:

# %%
g = torch.Generator().manual_seed(0)
qv, K, V = torch.randn(16, generator=g), torch.randn(37, 16, generator=g), torch.randn(37, 16, generator=g)
m, ell, a = torch.tensor(float("-inf")), torch.tensor(0.0), torch.zeros(16)
for t0 in range(0, 37, 8):  # tiles of 8 keys; the last one is partial
    s = K[t0 : t0 + 8] @ qv * 0.25
    m_next = torch.maximum(m, s.max())
    a = a * torch.exp(m - m_next) + torch.exp(s - m_next) @ V[t0 : t0 + 8]
    ell = ell * torch.exp(m - m_next) + torch.exp(s - m_next).sum()
    m = m_next
dense = torch.softmax(K @ qv * 0.25, 0) @ V
print(f"online softmax in 5 tiles vs softmax: max abs error {float((a / ell - dense).abs().max()):.1e}")
assert torch.allclose(a / ell, dense, atol=1e-6)

# %% [markdown]
# ## A decode kernel, one block at a time
#
# The paged cache stores each sequence's keys in blocks of `BLOCK_SIZE` positions; logical block $i$ of sequence
# $b$ (positions $i \cdot$ `BLOCK_SIZE` ... ) lives in the pool at `block_tables[b, i]`. The simplest kernel walks
# the block table: one program per (sequence, head), and each loop iteration reads **one block** — one table
# lookup, then `BLOCK_SIZE` rows of K and V at consecutive slots — and folds it into the online softmax.
#
# This is the **decode** case in its simplest form: one query per sequence, at the last position, so it sees every
# key (only the tail of the last block is masked off), and as many KV heads as query heads (`kv_cache` head `h`
# for query head `h`). Everything is loaded as fp32; head dim and block size are powers of two, as `tl.arange`
# requires.


# %%
@triton.jit
def decode_kernel(
    out_ptr, q_ptr, k_ptr, v_ptr, block_tables_ptr, seq_lens_ptr, scale,
    stride_qb, stride_qh, stride_kb, stride_ks, stride_kh, stride_bt,
    HEAD_D: tl.constexpr, BLOCK_SIZE: tl.constexpr,
):  # fmt: skip
    seq = tl.program_id(0)
    head = tl.program_id(1)
    n_keys = tl.load(seq_lens_ptr + seq)
    dims = tl.arange(0, HEAD_D)
    slots = tl.arange(0, BLOCK_SIZE)
    query = tl.load(q_ptr + seq * stride_qb + head * stride_qh + dims).to(tl.float32)

    run_max = tl.full([], float("-inf"), tl.float32)
    denom = tl.full([], 0.0, tl.float32)
    acc = tl.zeros([HEAD_D], tl.float32)
    for i in range(0, tl.cdiv(n_keys, BLOCK_SIZE)):  # logical block i of this sequence
        phys = tl.load(block_tables_ptr + seq * stride_bt + i).to(tl.int64)  # ... sits in the pool at `phys`
        live = i * BLOCK_SIZE + slots < n_keys  # the last block may be partly filled
        rows = phys * stride_kb + slots[:, None] * stride_ks + head * stride_kh + dims[None, :]
        keys = tl.load(k_ptr + rows, mask=live[:, None], other=0.0).to(tl.float32)  # [BLOCK_SIZE, HEAD_D]
        vals = tl.load(v_ptr + rows, mask=live[:, None], other=0.0).to(tl.float32)
        scores = tl.where(live, tl.sum(keys * query[None, :], axis=1) * scale, float("-inf"))
        new_max = tl.maximum(run_max, tl.max(scores, axis=0))
        weights = tl.exp(scores - new_max)
        rescale = tl.exp(run_max - new_max)
        denom = denom * rescale + tl.sum(weights, axis=0)
        acc = acc * rescale + tl.sum(weights[:, None] * vals, axis=0)
        run_max = new_max
    tl.store(out_ptr + seq * stride_qb + head * stride_qh + dims, acc / denom)


def decode_attention(q, k_cache, v_cache, block_tables, seq_lens, scale=1.0):
    """q [B, H, D]: one query per sequence, at position seq_lens[b] - 1; k_cache, v_cache [blocks, BLOCK, H, D]."""
    B, H, D = q.shape
    assert k_cache.shape[2] == H, "this tutorial kernel has one KV head per query head"
    out = torch.empty_like(q)
    decode_kernel[(B, H)](
        out, q, k_cache, v_cache, block_tables, seq_lens, scale,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        HEAD_D=D, BLOCK_SIZE=k_cache.shape[1],
    )  # fmt: skip
    return out


# 3 sequences of 9, 40 and 23 keys; 4 heads of dim 16; blocks of 8 positions, tables shuffled over the pool.
q, kc, vc, bt, sl, cu = _random_case([1, 1, 1], [9, 40, 23], Hq=4, Hkv=4, D=16, block_size=8, dtype=torch.float32,
                                     device="cpu")  # fmt: skip
print("block tables:\n", bt)
mine = decode_attention(q, kc, vc, bt, sl, scale=0.25)
want = reference(q, kc, vc, bt, sl, cu, window=0, scale=0.25)
err = float((mine - want).abs().max())
print(f"decode kernel vs PyTorch reference: max abs error {err:.1e}")
assert err < 1e-5

# %% [markdown]
# ## What decode does not cover
#
# A verify step scores $k+1$ queries of one sequence at once: the last accepted token and the $k$ drafts, at
# positions $L-k-1, \dots, L-1$ of a sequence with $L$ keys. Each query must see the keys up to **its own**
# position, not the drafts after it. Run the decode kernel on each of the 3 query rows of a verify step as if it
# were the last one, and compare with the reference:

# %%
q3, kc3, vc3, bt3, sl3, cu3 = _random_case([3, 3], [12, 30], 4, 4, 16, 8, torch.float32, "cpu", seed=2)
want3 = reference(q3, kc3, vc3, bt3, sl3, cu3, window=0, scale=0.25)
for r in range(3):
    rows = cu3[:-1] + r  # row r of each sequence's verify block
    got = decode_attention(q3[rows.long()].contiguous(), kc3, vc3, bt3, sl3, scale=0.25)
    e = float((got - want3[rows.long()]).abs().max())
    print(f"query row {r} (position L - {3 - r}): max abs error {e:.1e}")
    assert (e < 1e-5) == (r == 2)  # only the last row, which may see every key, is right

# %% [markdown]
# Only the last row agrees: the others attended to drafts that come after them. The engine needs more than
# decode, and **the `paged_attention_kernel` assignment asks you to extend this kernel** to the full
# `minimtp.attention.paged_attention` semantics: several queries per sequence packed with `cu_q_lens` (verify and
# prefill shapes) with causal masks on absolute positions, sliding windows (whose freed blocks must never be
# read), grouped-query attention ($H_q$ query heads over $H_{kv}$ KV heads), and head dims that are not a power of
# two. Its handout and starter file (`tutorials/assignments/paged_attention_kernel/`) give the details.
#
# ## The library kernel: verify and prefill shapes, sliding windows
#
# `minimtp.kernels.paged_attention` is the engine's kernel; it is also organised for speed:
#
# * several queries per sequence (a verify step has $k+1$, a prefill the whole prompt), packed with `cu_q_lens`;
#   query $r$ of a sequence sits at position $i = \text{seq\_len} - q_{len} + r$ and sees keys $j \le i$ (and
#   $j > i - W$ in a sliding layer) — masks on **absolute positions**;
# * the $G$ query heads of one KV head are processed together, so K/V tiles are loaded once for all of them and
#   both products are `tl.dot` matrix multiplies;
# * **split-KV**: with few programs (decode/verify at small batch) the key range is cut into segments processed in
#   parallel and merged by a second kernel.
#
# It must agree with the reference on every shape:

# %%
cases = [
    ("decode", [1, 1, 1], [9, 40, 23], 0),
    ("verify k=3", [4, 4], [12, 30], 0),
    ("verify, sliding W=5", [4, 4], [12, 30], 5),
    ("prefill + decode mix", [9, 1, 3], [9, 33, 3], 0),
]
for name, q_lens, seq_lens, window in cases:
    args = _random_case(q_lens, seq_lens, 8, 2, 16, 8, torch.float32, "cpu", seed=1)
    got = library_kernel(*args, window=window, scale=0.25)
    want = reference(*args, window=window, scale=0.25)
    err = float((got - want).abs().max())
    print(f"{name:22s} q_lens {q_lens!s:10s} seq_lens {seq_lens!s:12s}: max abs error {err:.1e}")
    assert err < 1e-5

# %% [markdown]
# ## Plugged into the engine
#
# The engine takes the attention implementation as a backend; the Triton one produces the same greedy tokens.

# %%
target = tiny_target(seed=0)
assistant = tiny_assistant(target, seed=1)
kw = dict(max_new_tokens=5, temperature=0.0, stop_token_ids=[], num_speculative_tokens=2)
torch_run = minimtp.Engine(target, assistant, attention_backend="torch").generate([[2, 17, 5, 33, 8]], **kw)
triton_run = minimtp.Engine(target, assistant, attention_backend="triton").generate([[2, 17, 5, 33, 8]], **kw)
print("torch backend :", torch_run.tokens[0])
print("triton backend:", triton_run.tokens[0])
assert torch_run.tokens == triton_run.tokens
assert math.isfinite(err)
print("tutorial 07 OK")
