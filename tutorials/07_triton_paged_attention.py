# %% [markdown]
# # 07 · Paged attention in Triton (run on the CPU by Triton's interpreter)
#
# `minimtp.attention.paged_attention` is the PyTorch reference: for each sequence it gathers the visible blocks
# into a contiguous tensor and calls SDPA. A GPU kernel cannot afford the gather: it reads K and V **directly from
# the block pool**, one tile of positions at a time, and combines the tiles with an **online softmax**.
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
from minimtp.kernels.paged_attention import _random_case
from minimtp.kernels.paged_attention import paged_attention as library_kernel

import minimtp
from minimtp.attention import paged_attention as reference

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
# rescaling factor $e^{m-m'}$ corrects what was accumulated under the old max.
#
# ## A decode kernel
#
# One program per (sequence, query head), one query per sequence at position `seq_len - 1` (decode: it sees
# every key). With grouped-query attention, query head $h$ reads KV head $h / G$, $G = H_q / H_{kv}$.


# %%
@triton.jit
def decode_attention_kernel(
    out_ptr, q_ptr, k_ptr, v_ptr, block_tables_ptr, seq_lens_ptr, scale,
    stride_qt, stride_qh, stride_kb, stride_ks, stride_kh, stride_bt,
    GROUP: tl.constexpr, HEAD_D: tl.constexpr, BLOCK_SIZE: tl.constexpr, TILE_N: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)  # sequence (= its single query row)
    h = tl.program_id(1)  # query head
    kv_head = h // GROUP
    seq_len = tl.load(seq_lens_ptr + b)
    d = tl.arange(0, HEAD_D)
    q = tl.load(q_ptr + b * stride_qt + h * stride_qh + d).to(tl.float32)  # [D]

    m = tl.full([], float("-inf"), tl.float32)
    l = tl.full([], 0.0, tl.float32)
    acc = tl.zeros([HEAD_D], tl.float32)
    for start in range(0, seq_len, TILE_N):
        pos = start + tl.arange(0, TILE_N)  # key positions of this tile
        ok = pos < seq_len
        block = tl.load(block_tables_ptr + b * stride_bt + pos // BLOCK_SIZE, mask=ok, other=0)
        slot = tl.cast(block, tl.int64) * stride_kb + (pos % BLOCK_SIZE) * stride_ks + kv_head * stride_kh
        k = tl.load(k_ptr + slot[:, None] + d[None, :], mask=ok[:, None], other=0.0).to(tl.float32)  # [N, D]
        v = tl.load(v_ptr + slot[:, None] + d[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
        s = tl.where(ok, tl.sum(k * q[None, :], 1) * scale, float("-inf"))  # [N]
        m_new = tl.maximum(m, tl.max(s, 0))
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new)
        l = l * alpha + tl.sum(p, 0)
        acc = acc * alpha + tl.sum(p[:, None] * v, 0)
        m = m_new
    tl.store(out_ptr + b * stride_qt + h * stride_qh + d, acc / l)


def decode_attention(q, k_cache, v_cache, block_tables, seq_lens, scale=1.0, tile_n=16):
    B, Hq, D = q.shape  # one query per sequence
    Hkv = k_cache.shape[2]
    out = torch.empty_like(q)
    decode_attention_kernel[(B, Hq)](
        out, q, k_cache, v_cache, block_tables, seq_lens, scale,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        GROUP=Hq // Hkv, HEAD_D=D, BLOCK_SIZE=k_cache.shape[1], TILE_N=tile_n,
    )  # fmt: skip
    return out


# 3 sequences of 9, 40 and 23 keys; 8 query heads over 2 KV heads; head dim 16; block size 8, shuffled tables.
q, kc, vc, bt, sl, cu = _random_case([1, 1, 1], [9, 40, 23], Hq=8, Hkv=2, D=16, block_size=8, dtype=torch.float32,
                                     device="cpu")  # fmt: skip
print("block tables:\n", bt)
mine = decode_attention(q, kc, vc, bt, sl, scale=0.25)
want = reference(q, kc, vc, bt, sl, cu, window=0, scale=0.25)
err = float((mine - want).abs().max())
print(f"decode kernel vs PyTorch reference: max abs error {err:.1e}")
assert err < 1e-5

# %% [markdown]
# ## The library kernel: verify and prefill shapes, sliding windows
#
# `minimtp.kernels.paged_attention` generalises this kernel (read its module docstring):
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
