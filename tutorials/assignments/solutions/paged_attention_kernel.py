"""Reference solution: assignment ``paged_attention_kernel`` (paged attention in Triton, under the interpreter).

Grade it: ``python tutorials/assignments/grade.py paged_attention_kernel
tutorials/assignments/solutions/paged_attention_kernel.py``
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def paged_attention_kernel(
    out_ptr, q_ptr, k_ptr, v_ptr, block_tables_ptr, seq_lens_ptr, cu_q_lens_ptr, row_seq_ptr,
    window, scale,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_kb, stride_ks, stride_kh, stride_bt,
    GROUP: tl.constexpr, HEAD_D: tl.constexpr, D_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr, TILE_N: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)  # one packed query row ...
    h = tl.program_id(1)  # ... and one query head per program
    kv_head = h // GROUP
    seq = tl.load(row_seq_ptr + row)
    seq_len = tl.load(seq_lens_ptr + seq)
    q_start = tl.load(cu_q_lens_ptr + seq)
    q_len = tl.load(cu_q_lens_ptr + seq + 1) - q_start
    pos = seq_len - q_len + (row - q_start)  # absolute position of this query
    lo = tl.where(window > 0, tl.maximum(pos - window + 1, 0), 0)  # oldest visible key

    d = tl.arange(0, D_PAD)
    d_ok = d < HEAD_D
    q = tl.load(q_ptr + row * stride_qt + h * stride_qh + d, mask=d_ok, other=0.0).to(tl.float32)
    m = tl.full([], float("-inf"), tl.float32)
    l = tl.full([], 0.0, tl.float32)
    acc = tl.full([D_PAD], 0.0, tl.float32)
    for start in range(lo, pos + 1, TILE_N):
        kpos = start + tl.arange(0, TILE_N)
        ok = (kpos <= pos) & (kpos >= lo)  # causal (and window) on absolute positions
        block = tl.load(block_tables_ptr + seq * stride_bt + kpos // BLOCK_SIZE, mask=ok, other=0)
        slot = tl.cast(block, tl.int64) * stride_kb + (kpos % BLOCK_SIZE) * stride_ks + kv_head * stride_kh
        kv_mask = ok[:, None] & d_ok[None, :]
        k = tl.load(k_ptr + slot[:, None] + d[None, :], mask=kv_mask, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + slot[:, None] + d[None, :], mask=kv_mask, other=0.0).to(tl.float32)
        s = tl.where(ok, tl.sum(k * q[None, :], 1) * scale, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 0))
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new)
        l = l * alpha + tl.sum(p, 0)
        acc = acc * alpha + tl.sum(p[:, None] * v, 0)
        m = m_new
    tl.store(out_ptr + row * stride_ot + h * stride_oh + d, acc / l, mask=d_ok)


def paged_attention(q, k_cache, v_cache, block_tables, seq_lens, cu_q_lens, window=0, scale=1.0):
    """Same signature and result as ``minimtp.attention.paged_attention`` (fp32)."""
    T, Hq, D = q.shape
    Hkv = k_cache.shape[2]
    out = torch.empty_like(q)
    counts = (cu_q_lens[1:] - cu_q_lens[:-1]).long()
    row_seq = torch.repeat_interleave(torch.arange(len(counts), dtype=torch.int32), counts)  # row -> its sequence
    paged_attention_kernel[(T, Hq)](
        out, q, k_cache, v_cache, block_tables, seq_lens, cu_q_lens, row_seq,
        int(window), float(scale),
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        GROUP=Hq // Hkv, HEAD_D=D, D_PAD=triton.next_power_of_2(D), BLOCK_SIZE=k_cache.shape[1], TILE_N=16,
    )  # fmt: skip
    return out
