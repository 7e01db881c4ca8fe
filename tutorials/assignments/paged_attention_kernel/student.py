"""Assignment ``paged_attention_kernel``: write paged attention as a Triton kernel.

Read tutorials/07_triton_paged_attention.py first: it builds a decode-only kernel. Yours must handle what the
engine needs: several queries per sequence (verify steps have k+1, a prefill the whole prompt), causal masks on
ABSOLUTE positions, sliding windows, grouped-query attention, and K/V read from scattered blocks of a pool.
The semantics are those of ``minimtp.attention.paged_attention`` (read its docstring); the wrapper is given.

Everything runs on the CPU under Triton's interpreter (TRITON_INTERPRET=1): compute in fp32, mask every load
(there is no bounds checking), no libdevice.

Grade: ``python tutorials/assignments/grade.py paged_attention_kernel
tutorials/assignments/paged_attention_kernel/student.py``
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
    kv_head = h // GROUP  # noqa: F841  (the KV head this query head reads: GQA)
    seq = tl.load(row_seq_ptr + row)
    seq_len = tl.load(seq_lens_ptr + seq)  # noqa: F841
    q_start = tl.load(cu_q_lens_ptr + seq)
    q_len = tl.load(cu_q_lens_ptr + seq + 1) - q_start  # noqa: F841
    # TODO 1: the absolute position `pos` of this query, and `lo`, the oldest key it may see
    #         (0 for full attention, max(pos - window + 1, 0) when window > 0).
    # TODO 2: load q (fp32), then loop over key positions lo .. pos in tiles of TILE_N:
    #           - look up each position's block in the block table, load K and V through it (masked!);
    #           - scores s = (k . q) * scale, -inf where the key is not visible;
    #           - online softmax: running max m, denominator l, accumulator acc (rescale by exp(m_old - m_new)).
    # TODO 3: store acc / l into out[row, h] (mask the head-dim padding).
    pass


def paged_attention(q, k_cache, v_cache, block_tables, seq_lens, cu_q_lens, window=0, scale=1.0):
    """Same signature and result as ``minimtp.attention.paged_attention`` (fp32)."""
    raise NotImplementedError("the kernel (remove this line when it is written)")
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
