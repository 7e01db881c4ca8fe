"""Paged attention in Triton: decode, verify and prefill in one kernel family.

The drop-in twin of :func:`minimtp.attention.paged_attention` (same signature, same semantics; read that
docstring first). The walk-through with pictures is ``docs/concepts/kernels.md``. In one paragraph:

* **Grid** ``(query tiles, KV heads, KV segments)``. A program owns ``BLOCK_Q`` consecutive queries of one
  sequence *and* the ``GROUP = Hq // Hkv`` query heads that read the same KV head (GQA packing), stacked as
  ``BLOCK_M = max(16, next_pow2(BLOCK_Q * GROUP))`` rows, so both ``tl.dot`` calls see tiles of at least 16.
  Row ``r`` is query ``r // GROUP`` and head ``kv_head * GROUP + r % GROUP``.
* **Keys** stream through in tiles of ``TILE_N`` positions. Position ``j`` of sequence ``b`` lives in pool block
  ``block_tables[b, j // block_size]``, slot ``j % block_size``: every tile gathers its block ids first.
* **Masks** are on absolute positions: query ``r`` of a sequence with ``seq_len`` keys and ``q_len`` queries sits
  at ``i = seq_len - q_len + r`` and sees keys ``j <= i`` (and ``j > i - window`` for a sliding window). A
  program only loops over ``[lowest visible key, highest query + 1)``, so blocks entirely below the window —
  which a sliding-window cache may already have freed — are never looked up.
* **Online softmax** in fp32 (in base 2: the scale is pre-multiplied by ``log2(e)``).
* **Split-KV** (flash-decoding): when the grid is too small to fill the GPU — decode *and* verify shapes
  (q_len = k + 1) at small batch — the key range is cut into ``num_splits`` segments, each program writes an
  unnormalised partial result ``(acc, m, l)``, and :func:`_reduce_segments_kernel` merges them.

On CPU the kernels run under Triton's interpreter, an explicit opt-in: ``TRITON_INTERPRET=1`` in the environment
before Python starts (``@triton.jit`` decides when it decorates; see :mod:`minimtp.kernels.runtime`). Without it, CPU
tensors raise :class:`minimtp.errors.CompatibilityError`. Interpreter rules: bf16 is upcast to fp32
(``UPCAST``), no libdevice, no block pointers, ``tl.cast`` on scalars, no autotuning, no device queries.

Run ``python -m minimtp.kernels.paged_attention`` for a self-check against the PyTorch reference (on CPU:
``TRITON_INTERPRET=1 python -m minimtp.kernels.paged_attention``).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from minimtp.kernels.runtime import FP_FUSION, check_launch, is_interpreted

LOG2E = 1.4426950408889634
MAX_SPLITS = 16  # at most this many KV segments per (query tile, KV head)
MAX_SPLIT_Q_LEN = 16  # split only decode / verify shapes (mean q_len <= this): partials are [S, T, Hq, D] fp32
INTERPRETER_NUM_SMS = 4  # the pretend SM count on CPU, so small test batches take the split path too


# ----------------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _find_seq(cu_q_lens_ptr, q_tile, num_seqs, BLOCK_Q: tl.constexpr):
    """The sequence that owns global query tile ``q_tile``, by binary search.

    Sequence ``b``'s tiles are numbered from ``cu_q_lens[b] // BLOCK_Q + b`` on: that leaves room for its
    ``ceil(q_len_b / BLOCK_Q)`` tiles without a host-side table, and ``T // BLOCK_Q + B`` tiles cover everything.
    """
    lo = 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        first_tile = tl.load(cu_q_lens_ptr + mid) // BLOCK_Q + mid
        if first_tile <= q_tile:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit
def _paged_attention_kernel(
    out_ptr,  # [T, Hq, D]            (SPLIT=False)
    seg_out_ptr,  # [S, T, Hq, D] f32  (SPLIT=True) unnormalised partial outputs
    seg_m_ptr,  # [S, T, Hq] f32      running max (base 2) of each segment
    seg_l_ptr,  # [S, T, Hq] f32      running sum of each segment
    q_ptr,  # [T, Hq, D]
    k_ptr,  # [num_blocks, block_size, Hkv, D]
    v_ptr,  # [num_blocks, block_size, Hkv, D]
    block_tables_ptr,  # [B, max_blocks] int32
    seq_lens_ptr,  # [B] int32
    cu_q_lens_ptr,  # [B + 1] int32
    num_seqs,
    num_tokens,
    num_q_heads,
    window,
    qk_scale,  # softmax scale * log2(e)
    num_splits,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_vb,
    stride_vs,
    stride_vh,
    stride_bt,
    GROUP: tl.constexpr,  # query heads per KV head
    BLOCK_Q: tl.constexpr,  # queries per program
    BLOCK_M: tl.constexpr,  # rows per program = next_pow2(BLOCK_Q * GROUP), at least 16
    HEAD_D: tl.constexpr,
    HEAD_D_PAD: tl.constexpr,  # next_pow2(HEAD_D), at least 16
    BLOCK_SIZE: tl.constexpr,  # KV-cache block size (positions per pool block)
    TILE_N: tl.constexpr,  # keys per loop iteration
    SLIDING: tl.constexpr,  # window > 0
    SPLIT: tl.constexpr,  # write partial results for _reduce_segments_kernel
    UPCAST: tl.constexpr,  # compute in fp32 (bf16 under the interpreter)
    DOT_PRECISION: tl.constexpr,  # "tf32x3" for fp32 inputs (fp32 accuracy on tensor cores)
):
    q_tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    segment = tl.program_id(2)

    # -- which sequence, which queries --------------------------------------------------------------------------
    seq = _find_seq(cu_q_lens_ptr, q_tile, num_seqs, BLOCK_Q)
    q_start = tl.load(cu_q_lens_ptr + seq)
    q_len = tl.load(cu_q_lens_ptr + seq + 1) - q_start
    q_first = (q_tile - (q_start // BLOCK_Q + seq)) * BLOCK_Q  # first query of this tile, within the sequence
    if q_first >= q_len:  # a spare tile of the T // BLOCK_Q + B grid
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    context = seq_len - q_len  # keys before the first query: query r sits at position context + r

    rows = tl.arange(0, BLOCK_M)
    q_idx = q_first + rows // GROUP  # query index within the sequence
    head = kv_head * GROUP + rows % GROUP  # query head
    row_ok = (rows < BLOCK_Q * GROUP) & (q_idx < q_len)
    pos = context + q_idx  # absolute position of each row's query
    tok = tl.cast(q_start + q_idx, tl.int64)  # row of q / out

    d = tl.arange(0, HEAD_D_PAD)
    d_ok = d < HEAD_D
    q = tl.load(
        q_ptr + tok[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
        mask=row_ok[:, None] & d_ok[None, :],
        other=0.0,
    )
    if UPCAST:
        q = q.to(tl.float32)

    # -- the keys this program needs: [kv_lo, kv_hi), cut into TILE_N tiles, then into segments ----------------
    kv_hi = context + tl.minimum(q_first + BLOCK_Q, q_len)  # one past the last query's position
    kv_lo = 0
    if SLIDING:  # the oldest key the first query can see; whole tiles below it are skipped
        kv_lo = tl.maximum(context + q_first - window + 1, 0)
    num_tiles = tl.cdiv(kv_hi - kv_lo, TILE_N)
    tile_begin = 0
    tile_end = num_tiles
    if SPLIT:
        tiles_per_segment = tl.cdiv(num_tiles, num_splits)
        tile_begin = segment * tiles_per_segment
        tile_end = tl.minimum(tile_begin + tiles_per_segment, num_tiles)

    # -- online softmax over the key tiles ----------------------------------------------------------------------
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_D_PAD], tl.float32)
    offs_n = tl.arange(0, TILE_N)
    table_row = block_tables_ptr + tl.cast(seq, tl.int64) * stride_bt
    for t in range(tile_begin, tile_end):
        kv_pos = kv_lo + t * TILE_N + offs_n  # [TILE_N] absolute key positions
        kv_ok = kv_pos < kv_hi
        # Gather the pool block of each key. Masked: table slots outside [kv_lo, kv_hi) may hold garbage.
        block = tl.load(table_row + kv_pos // BLOCK_SIZE, mask=kv_ok, other=0)
        slot = tl.cast(block, tl.int64) * stride_kb + (kv_pos % BLOCK_SIZE) * stride_ks  # k and v share strides
        k = tl.load(  # [D, TILE_N], transposed for q @ k
            k_ptr + slot[None, :] + kv_head * stride_kh + d[:, None],
            mask=kv_ok[None, :] & d_ok[:, None],
            other=0.0,
        )
        v = tl.load(  # [TILE_N, D]
            v_ptr + slot[:, None] + kv_head * stride_vh + d[None, :],
            mask=kv_ok[:, None] & d_ok[None, :],
            other=0.0,
        )
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)

        s = tl.dot(q, k, input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_M, TILE_N], base-2 logits
        visible = (kv_pos[None, :] <= pos[:, None]) & kv_ok[None, :]  # causal on absolute positions
        if SLIDING:
            visible = visible & (kv_pos[None, :] > pos[:, None] - window)
        s = tl.where(visible, s, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that has seen nothing yet stays at 0
        alpha = tl.exp2(m_i - m_safe)  # rescales what was accumulated under the old max
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    # -- epilogue -----------------------------------------------------------------------------------------------
    io_mask = row_ok[:, None] & d_ok[None, :]
    if SPLIT:  # partial result of this segment; [S, T, Hq, (D)] contiguous
        part = (tl.cast(segment, tl.int64) * num_tokens + tok) * num_q_heads + head
        tl.store(seg_m_ptr + part, m_i, mask=row_ok)
        tl.store(seg_l_ptr + part, l_i, mask=row_ok)
        tl.store(seg_out_ptr + part[:, None] * HEAD_D + d[None, :], acc, mask=io_mask)
    else:
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        o_ptrs = out_ptr + tok[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :]
        tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=io_mask)


@triton.jit
def _reduce_segments_kernel(
    out_ptr,  # [T, Hq, D]
    seg_out_ptr,  # [S, T, Hq, D] f32
    seg_m_ptr,  # [S, T, Hq] f32
    seg_l_ptr,  # [S, T, Hq] f32
    num_tokens,
    num_q_heads,
    num_splits,
    stride_ot,
    stride_oh,
    HEAD_D: tl.constexpr,
    HEAD_D_PAD: tl.constexpr,
    BLOCK_H: tl.constexpr,  # query heads per program
):
    """Merge the segments of one token (BLOCK_H of its heads) with the same online-softmax update as the main
    loop: ``out = sum_s 2^(m_s - M) acc_s / sum_s 2^(m_s - M) l_s``; empty segments have m = -inf, l = 0."""
    tok = tl.cast(tl.program_id(0), tl.int64)
    head = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    h_ok = head < num_q_heads
    d = tl.arange(0, HEAD_D_PAD)
    io_mask = h_ok[:, None] & (d < HEAD_D)[None, :]
    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, HEAD_D_PAD], tl.float32)
    for s in range(0, num_splits):
        part = (s * num_tokens + tok) * num_q_heads + head
        m = tl.load(seg_m_ptr + part, mask=h_ok, other=float("-inf"))
        l = tl.load(seg_l_ptr + part, mask=h_ok, other=0.0)
        a = tl.load(seg_out_ptr + part[:, None] * HEAD_D + d[None, :], mask=io_mask, other=0.0)
        m_new = tl.maximum(m_i, m)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        beta = tl.exp2(m - m_safe)
        l_i = l_i * alpha + l * beta
        acc = acc * alpha[:, None] + a * beta[:, None]
        m_i = m_new
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    o_ptrs = out_ptr + tok * stride_ot + head[:, None] * stride_oh + d[None, :]
    tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=io_mask)


# ----------------------------------------------------------------------------------------------------------------
# Launch configuration
# ----------------------------------------------------------------------------------------------------------------


def _launch_config(head_dim: int, dtype: torch.dtype, interpret: bool) -> dict:
    """Tile sizes and launch options. Under the interpreter the cost is ~4 ms per program plus ~5 ms per loop
    iteration whatever the tile size, so it gets big query tiles (few programs). On the GPU the tiles are sized
    so that every variant fits the shared memory of sm_80 (163 KiB) and sm_90 (227 KiB), checked by
    tests/test_kernel_compile.py; fp32 operands are 4 bytes and tf32x3 splits them, so fp32 gets smaller tiles."""
    if interpret:
        return {"tile_n": 32, "max_rows": 128, "num_warps": 4, "num_stages": 1}
    if dtype == torch.float32:
        if head_dim <= 128:
            return {"tile_n": 32, "max_rows": 64, "num_warps": 4, "num_stages": 2}
        if head_dim <= 256:
            return {"tile_n": 16, "max_rows": 32, "num_warps": 4, "num_stages": 1}
        return {"tile_n": 16, "max_rows": 16, "num_warps": 8, "num_stages": 1}
    if head_dim <= 128:
        return {"tile_n": 64, "max_rows": 64, "num_warps": 4, "num_stages": 2}
    if head_dim <= 256:
        return {"tile_n": 32, "max_rows": 64, "num_warps": 4, "num_stages": 2}
    return {"tile_n": 32, "max_rows": 32, "num_warps": 8, "num_stages": 1}


def choose_num_splits(base_grid: int, q_per_seq: int, max_kv_len: int, tile_n: int, num_sms: int) -> int:
    """How many KV segments: split only small grids of decode/verify shapes, into at most ``MAX_SPLITS``.

    ``base_grid`` is the number of programs without splitting. The aim is ~2 programs per SM. ``max_kv_len`` is
    the block-table capacity, an upper bound known without a host sync (segments past a sequence's end exit
    after a few instructions).
    """
    if q_per_seq > MAX_SPLIT_Q_LEN or base_grid >= num_sms:
        return 1
    return max(1, min(MAX_SPLITS, triton.cdiv(2 * num_sms, base_grid), triton.cdiv(max_kv_len, tile_n)))


_SM_COUNT: dict[int, int] = {}


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":  # the interpreter (or the compile check): never ask a driver
        return INTERPRETER_NUM_SMS
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNT[index]


# ----------------------------------------------------------------------------------------------------------------
# Wrapper
# ----------------------------------------------------------------------------------------------------------------


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    cu_q_lens: torch.Tensor,
    window: int = 0,
    scale: float = 1.0,
    *,
    num_splits: int | None = None,
    tile_n: int | None = None,
) -> torch.Tensor:
    """Triton twin of :func:`minimtp.attention.paged_attention` (same arguments, same result).

    The caches ``[num_blocks, block_size, Hkv, D]`` must have a contiguous last dim (other strides are free;
    a ``q [T, Hq, D]`` without one is copied); ``block_tables [B, max_blocks]``, ``seq_lens [B]`` and
    ``cu_q_lens [B + 1]`` are int32.
    No host synchronisation: launch shapes depend on tensor shapes only.

    Keyword-only tuning knobs (tests, benchmarks): ``num_splits`` (None = automatic, 1 = never split,
    n = n KV segments) and ``tile_n`` (keys per loop iteration, a power of two >= 16).
    """
    T, Hq, D = q.shape
    _, block_size, Hkv, Dk = k_cache.shape
    B = seq_lens.shape[0]
    if Dk != D or v_cache.shape != k_cache.shape:
        raise ValueError(f"q {tuple(q.shape)}, k_cache {tuple(k_cache.shape)}, v_cache {tuple(v_cache.shape)}")
    if Hq % Hkv != 0:
        raise ValueError(f"{Hq} query heads are not a multiple of {Hkv} KV heads")
    if k_cache.stride(3) != 1 or v_cache.stride(3) != 1:
        raise ValueError("k_cache and v_cache need a contiguous last (head_dim) dimension")
    if q.stride(2) != 1:
        q = q.contiguous()
    if k_cache.stride() != v_cache.stride():
        raise ValueError(f"k_cache strides {k_cache.stride()} != v_cache strides {v_cache.stride()}")
    if not (q.dtype == k_cache.dtype == v_cache.dtype):
        raise ValueError(f"dtypes differ: q {q.dtype}, k {k_cache.dtype}, v {v_cache.dtype}")
    if block_tables.stride(1) != 1:
        raise ValueError("block_tables needs a contiguous last dimension")
    out = torch.empty((T, Hq, D), dtype=q.dtype, device=q.device)
    if T == 0 or B == 0:
        return out

    interpret = check_launch(_paged_attention_kernel, q.device)
    cfg = _launch_config(D, q.dtype, interpret)
    tile_n = tile_n or cfg["tile_n"]
    group = Hq // Hkv
    q_per_seq = triton.cdiv(T, B)
    block_q = min(triton.next_power_of_2(q_per_seq), max(1, cfg["max_rows"] // group))
    block_m = max(16, triton.next_power_of_2(block_q * group))
    num_q_tiles = T // block_q + B
    if num_splits is None:
        max_kv_len = block_tables.shape[1] * block_size
        num_splits = choose_num_splits(num_q_tiles * Hkv, q_per_seq, max_kv_len, tile_n, _num_sms(q.device))
    split = num_splits > 1

    if split:
        seg_out = torch.empty((num_splits, T, Hq, D), dtype=torch.float32, device=q.device)
        seg_m = torch.empty((num_splits, T, Hq), dtype=torch.float32, device=q.device)
        seg_l = torch.empty((num_splits, T, Hq), dtype=torch.float32, device=q.device)
    else:
        seg_out = seg_m = seg_l = out  # unused (SPLIT=False); any pointer will do
    _paged_attention_kernel[(num_q_tiles, Hkv, num_splits)](
        out,
        seg_out,
        seg_m,
        seg_l,
        q,
        k_cache,
        v_cache,
        block_tables,
        seq_lens,
        cu_q_lens,
        B,
        T,
        Hq,
        int(window),
        float(scale) * LOG2E,
        num_splits,
        q.stride(0),
        q.stride(1),
        out.stride(0),
        out.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        block_tables.stride(0),
        GROUP=group,
        BLOCK_Q=block_q,
        BLOCK_M=block_m,
        HEAD_D=D,
        HEAD_D_PAD=max(16, triton.next_power_of_2(D)),
        BLOCK_SIZE=block_size,
        TILE_N=tile_n,
        SLIDING=window > 0,
        SPLIT=split,
        UPCAST=interpret and q.dtype == torch.bfloat16,
        DOT_PRECISION="tf32x3" if q.dtype == torch.float32 else "tf32",
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
        enable_fp_fusion=FP_FUSION,
    )
    if split:
        d_pad = max(16, triton.next_power_of_2(D))
        block_h = triton.next_power_of_2(Hq) if interpret else min(triton.next_power_of_2(Hq), max(1, 2048 // d_pad))
        _reduce_segments_kernel[(T, triton.cdiv(Hq, block_h))](
            out,
            seg_out,
            seg_m,
            seg_l,
            T,
            Hq,
            num_splits,
            out.stride(0),
            out.stride(1),
            HEAD_D=D,
            HEAD_D_PAD=d_pad,
            BLOCK_H=block_h,
            num_warps=4,
            enable_fp_fusion=FP_FUSION,
        )
    return out


# ----------------------------------------------------------------------------------------------------------------
# Self-check: python -m minimtp.kernels.paged_attention
# ----------------------------------------------------------------------------------------------------------------


def _random_case(q_lens, seq_lens, Hq, Hkv, D, block_size, dtype, device, seed=0):
    """Random q / pool / shuffled block tables for the given lengths (shared with the tests)."""
    g = torch.Generator().manual_seed(seed)
    B = len(seq_lens)
    max_blocks = max(math.ceil(L / block_size) for L in seq_lens) + 1
    num_blocks = B * max_blocks + 3
    perm = torch.randperm(num_blocks, generator=g)[: B * max_blocks].view(B, max_blocks)
    block_tables = perm.to(torch.int32)
    k_cache = torch.randn(num_blocks, block_size, Hkv, D, generator=g).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, Hkv, D, generator=g).to(dtype)
    q = torch.randn(sum(q_lens), Hq, D, generator=g).to(dtype)
    cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    dev = lambda t: t.to(device)
    return (
        dev(q),
        dev(k_cache),
        dev(v_cache),
        dev(block_tables),
        dev(torch.tensor(seq_lens, dtype=torch.int32)),
        dev(cu),
    )


if __name__ == "__main__":
    import sys

    from minimtp.attention import paged_attention as reference
    from minimtp.errors import CompatibilityError

    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"device {device}, interpreter {is_interpreted(_paged_attention_kernel)}")
    try:
        check_launch(_paged_attention_kernel, torch.device(device))
    except CompatibilityError as e:
        sys.exit(f"error: {e}")
    for dtype, tol in ((torch.float32, 1e-4), (torch.float16, 2e-3), (torch.bfloat16, 2e-2)):
        for window in (0, 5):
            for splits in (1, 3):
                args = _random_case([1, 4, 8], [9, 40, 8], 8, 2, 64, 16, dtype, device)
                got = paged_attention(*args, window=window, scale=0.125, num_splits=splits)
                want = reference(*[a.cpu() for a in args], window=window, scale=0.125)
                err = (got.float().cpu() - want.float()).abs().max().item()
                status = "ok" if err <= tol else "FAIL"
                print(f"{str(dtype):15} window {window} splits {splits}: max err {err:.2e} {status}")
