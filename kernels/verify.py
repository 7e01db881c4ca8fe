"""Speculative verification in Triton, fused over the vocabulary.

The drop-in twins of :func:`minimtp.speculative.verify_greedy` and :func:`minimtp.speculative.verify`: same
signatures, and — because the randomness (uniforms ``u`` and the exponential noise row ``E``) is passed in — the
**same token ids, bit for bit**. Read the module docstring of ``minimtp/speculative.py`` for the rules; the
walk-through is ``docs/concepts/kernels.md``.

Both verifiers are two launches:

1. a **vocabulary pass**, grid ``(rows, chunks)``: each program streams one chunk of the vocabulary in
   ``BLOCK_V`` tiles and keeps a running arg-max. Greedy: the arg-max of the logits of every row
   ``(b, j)``. Sampled: the program first decides acceptance (``K`` scalar gathers, cheap), so it knows the
   number accepted ``n`` and scans only row ``n``: the **exponential race** ``argmax_i resid_i / E_i`` over the
   residual ``(p_n - q_n)^+`` (or ``p_n`` with the draft zeroed), and alongside it the race over ``p_n`` itself,
   which is the answer for a bonus token or a numerically empty residual.
2. a **finish** kernel, grid ``(B,)``: merges the chunks (lowest id on ties: chunks are in id order), applies the
   acceptance rule and writes ``out_ids [B, K+1]`` (-1 padded) and ``num_emitted [B]``.

No sums anywhere: an arg-max does not depend on the order it is computed in, so splitting the vocabulary into
chunks and tiles cannot change the result. Float ops copy the reference exactly: ``p/q`` and ``p/E`` are IEEE
round-to-nearest divisions (``tl.math.div_rn``; Triton's ``/`` on fp32 is approximate on the GPU), the
acceptance test is ``float64(u) < float64(ratio)``. The padded tail of the last tile is masked to -inf, so a
recovered id is always ``< V`` (vLLM GHSA-8wr5-jm2h-8r4f), and every row offset is int64 (``row * V`` overflows
int32 at ~8k rows of Gemma's 262,144 vocabulary).

Not reproduced: NaN logits / probabilities (``torch.argmax`` returns the NaN's index, the kernel skips NaNs).

On CPU the kernels run under Triton's interpreter, an explicit opt-in: ``TRITON_INTERPRET=1`` in the environment
before Python starts (``@triton.jit`` decides when it decorates; see :mod:`minimtp.kernels.runtime`). Without it, CPU
tensors raise :class:`minimtp.errors.CompatibilityError`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from minimtp.kernels.runtime import FP_FUSION, check_launch

# ----------------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _argmax_tile(best_val, best_idx, score, start):
    """Fold the tile of ids ``start + [0, BLOCK_V)`` into a running (max, lowest arg-max): the tile's own arg-max
    takes the first of equal scores, and the strict ``>`` keeps the earlier tile's id on ties."""
    tile_val, tile_pos = tl.max(score, 0, return_indices=True, return_indices_tie_break_left=True)
    tile_idx = tl.cast(start, tl.int64) + tile_pos
    better = tile_val > best_val
    return tl.where(better, tile_val, best_val), tl.where(better, tile_idx, best_idx)


@triton.jit
def _greedy_argmax_kernel(
    part_val_ptr,  # [B * (K+1), chunks] f32  best logit of each chunk
    part_idx_ptr,  # [B * (K+1), chunks] i64  its id
    logits_ptr,  # [B, K+1, V]
    V,
    K1,  # K + 1
    chunk_size,  # a multiple of BLOCK_V
    num_chunks,
    stride_lb,
    stride_lk,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0)  # b * (K+1) + j
    chunk = tl.program_id(1)
    b = row // K1
    j = row % K1
    base = logits_ptr + tl.cast(b, tl.int64) * stride_lb + tl.cast(j, tl.int64) * stride_lk
    best_val = tl.cast(float("-inf"), tl.float32)
    best_idx = tl.cast(chunk * chunk_size, tl.int64)  # an all -inf row still answers with a real id
    offs = tl.arange(0, BLOCK_V)
    for start in range(chunk * chunk_size, tl.minimum((chunk + 1) * chunk_size, V), BLOCK_V):
        idx = start + offs
        x = tl.load(base + idx, mask=idx < V, other=float("-inf")).to(tl.float32)  # exact for bf16 / fp16
        best_val, best_idx = _argmax_tile(best_val, best_idx, x, start)
    out = tl.cast(row, tl.int64) * num_chunks + chunk
    tl.store(part_val_ptr + out, best_val)
    tl.store(part_idx_ptr + out, best_idx)


@triton.jit
def _merge_chunks(part_val_ptr, part_idx_ptr, row, num_chunks, CHUNKS_PAD: tl.constexpr):
    """Arg-max over the chunk results of one row (first chunk wins ties = lowest id)."""
    c = tl.arange(0, CHUNKS_PAD)
    off = tl.cast(row, tl.int64) * num_chunks + c
    val = tl.load(part_val_ptr + off, mask=c < num_chunks, other=float("-inf"))
    idx = tl.load(part_idx_ptr + off, mask=c < num_chunks, other=0)
    _, pos = tl.max(val, 0, return_indices=True, return_indices_tie_break_left=True)
    return tl.sum(tl.where(c == pos, idx, 0), 0)


@triton.jit
def _write_output(out_ptr, emitted_ptr, draft_ids_ptr, b, n_acc, token, K, stride_db, K1_PAD: tl.constexpr):
    """out[b] = drafts[:n] + [token] + [-1, ...];  num_emitted[b] = n + 1."""
    i = tl.arange(0, K1_PAD)
    drafts = tl.load(draft_ids_ptr + b * stride_db + i, mask=i < n_acc, other=-1).to(tl.int64)
    row = tl.where(i == n_acc, token, drafts)
    tl.store(out_ptr + b * (K + 1) + i, row, mask=i < K + 1)
    tl.store(emitted_ptr + b, tl.cast(n_acc + 1, tl.int64))


@triton.jit
def _greedy_finish_kernel(
    out_ptr,  # [B, K+1] i64
    emitted_ptr,  # [B] i64
    part_val_ptr,
    part_idx_ptr,
    draft_ids_ptr,  # [B, K]
    num_drafts_ptr,  # [B]
    K,
    num_chunks,
    stride_db,
    CHUNKS_PAD: tl.constexpr,
    K1_PAD: tl.constexpr,
):
    b = tl.cast(tl.program_id(0), tl.int64)
    nd = tl.minimum(tl.maximum(tl.load(num_drafts_ptr + b), 0), K)
    n_acc = tl.cast(0, tl.int32)
    for j in range(0, K):  # accept the longest prefix with x_j == argmax row j
        top = _merge_chunks(part_val_ptr, part_idx_ptr, b * (K + 1) + j, num_chunks, CHUNKS_PAD)
        x = tl.load(draft_ids_ptr + b * stride_db + j).to(tl.int64)
        n_acc += ((j < nd) & (x == top) & (n_acc == j)).to(tl.int32)
    token = _merge_chunks(part_val_ptr, part_idx_ptr, b * (K + 1) + n_acc, num_chunks, CHUNKS_PAD)
    _write_output(out_ptr, emitted_ptr, draft_ids_ptr, b, n_acc, token, K, stride_db, K1_PAD)


@triton.jit
def _num_accepted(
    b,
    p_ptr,
    q_ptr,
    draft_ids_ptr,
    u_ptr,
    nd,
    K,
    V,
    stride_pb,
    stride_pk,
    stride_qb,
    stride_qk,
    stride_db,
    HAS_Q: tl.constexpr,
):
    """n = number of leading accepted drafts: accept x_j iff u_j < p_j(x_j) / q_j(x_j) (or u_j < p_j(x_j))."""
    n_acc = tl.cast(0, tl.int32)
    for j in range(0, K):
        x = tl.load(draft_ids_ptr + b * stride_db + j).to(tl.int64)
        valid = (j < nd) & (x >= 0) & (x < V)
        x = tl.where(valid, x, 0)  # a safe gather index
        ratio = tl.load(p_ptr + b * stride_pb + j * stride_pk + x)
        if HAS_Q:
            ratio = tl.math.div_rn(ratio, tl.load(q_ptr + b * stride_qb + j * stride_qk + x))
        u = tl.load(u_ptr + b * K + j)
        n_acc += (valid & (u < ratio.to(tl.float64)) & (n_acc == j)).to(tl.int32)
    return n_acc


@triton.jit
def _race_kernel(
    part_val_ptr,  # [B, chunks, 2] f32   best score of the residual race (0) and of the p race (1)
    part_idx_ptr,  # [B, chunks, 2] i64   their ids
    part_any_ptr,  # [B, chunks] i32      does the residual have mass in this chunk?
    n_acc_ptr,  # [B] i32
    p_ptr,  # [B, K+1, V] f32 target probabilities
    q_ptr,  # [B, K, V] f32 draft probabilities (HAS_Q)
    draft_ids_ptr,  # [B, K]
    num_drafts_ptr,  # [B]
    u_ptr,  # [B, K] f64 uniforms
    e_ptr,  # [B, V] f32 Exp(1) noise
    K,
    V,
    chunk_size,
    num_chunks,
    stride_pb,
    stride_pk,
    stride_qb,
    stride_qk,
    stride_db,
    stride_eb,
    HAS_Q: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    b = tl.cast(tl.program_id(0), tl.int64)
    chunk = tl.program_id(1)
    nd = tl.minimum(tl.maximum(tl.load(num_drafts_ptr + b), 0), K)
    n_acc = _num_accepted(
        b, p_ptr, q_ptr, draft_ids_ptr, u_ptr, nd, K, V, stride_pb, stride_pk, stride_qb, stride_qk, stride_db, HAS_Q
    )
    if chunk == 0:
        tl.store(n_acc_ptr + b, n_acc)
    rejected = n_acc < nd  # then row n holds a rejected draft x_n and we race over the residual
    j = tl.minimum(n_acc, K - 1)  # the rejected position (clamped: unused when nothing was rejected)
    x = tl.load(draft_ids_ptr + b * stride_db + j, mask=rejected, other=-1).to(tl.int64)
    p_row = p_ptr + b * stride_pb + n_acc * stride_pk
    q_row = q_ptr + b * stride_qb + j * stride_qk
    e_row = e_ptr + b * stride_eb
    q_end = tl.where(rejected, V, 0)  # read q only after a rejection (row j of q exists then)

    r_val = tl.cast(float("-inf"), tl.float32)
    r_idx = tl.cast(chunk * chunk_size, tl.int64)
    p_val = tl.cast(float("-inf"), tl.float32)
    p_idx = tl.cast(chunk * chunk_size, tl.int64)
    r_any = tl.cast(0, tl.int32)
    offs = tl.arange(0, BLOCK_V)
    for start in range(chunk * chunk_size, tl.minimum((chunk + 1) * chunk_size, V), BLOCK_V):
        idx = start + offs
        in_v = idx < V
        p = tl.load(p_row + idx, mask=in_v, other=0.0)
        e = tl.load(e_row + idx, mask=in_v, other=1.0)
        if HAS_Q:  # (p - q)^+
            q = tl.load(q_row + idx, mask=idx < q_end, other=0.0)
            resid = tl.maximum(p - q, 0.0)
        else:  # p with the draft zeroed
            resid = tl.where(idx == x, 0.0, p)
        r_any = tl.maximum(r_any, tl.max((resid > 0.0).to(tl.int32), 0))
        # the race: score_i = dist_i / E_i if dist_i > 0 else -1; the padded tail scores -inf and never wins
        r_score = tl.where(in_v, tl.where(resid > 0.0, tl.math.div_rn(resid, e), -1.0), float("-inf"))
        p_score = tl.where(in_v, tl.where(p > 0.0, tl.math.div_rn(p, e), -1.0), float("-inf"))
        r_val, r_idx = _argmax_tile(r_val, r_idx, r_score, start)
        p_val, p_idx = _argmax_tile(p_val, p_idx, p_score, start)
    out = b * num_chunks + chunk
    tl.store(part_val_ptr + 2 * out, r_val)
    tl.store(part_idx_ptr + 2 * out, r_idx)
    tl.store(part_val_ptr + 2 * out + 1, p_val)
    tl.store(part_idx_ptr + 2 * out + 1, p_idx)
    tl.store(part_any_ptr + out, r_any)


@triton.jit
def _race_finish_kernel(
    out_ptr,  # [B, K+1] i64
    emitted_ptr,  # [B] i64
    part_val_ptr,
    part_idx_ptr,
    part_any_ptr,
    n_acc_ptr,
    draft_ids_ptr,
    num_drafts_ptr,
    K,
    num_chunks,
    stride_db,
    CHUNKS_PAD: tl.constexpr,
    K1_PAD: tl.constexpr,
):
    b = tl.cast(tl.program_id(0), tl.int64)
    nd = tl.minimum(tl.maximum(tl.load(num_drafts_ptr + b), 0), K)
    n_acc = tl.load(n_acc_ptr + b)
    c = tl.arange(0, CHUNKS_PAD)
    has_mass = tl.max(tl.load(part_any_ptr + b * num_chunks + c, mask=c < num_chunks, other=0), 0) > 0
    # residual race after a rejection (if the residual is not numerically empty), else the race over p
    use_resid = (n_acc < nd) & has_mass
    lane = tl.where(use_resid, 0, 1)
    val = tl.load(part_val_ptr + 2 * (b * num_chunks + c) + lane, mask=c < num_chunks, other=float("-inf"))
    idx = tl.load(part_idx_ptr + 2 * (b * num_chunks + c) + lane, mask=c < num_chunks, other=0)
    _, pos = tl.max(val, 0, return_indices=True, return_indices_tie_break_left=True)
    token = tl.sum(tl.where(c == pos, idx, 0), 0)
    _write_output(out_ptr, emitted_ptr, draft_ids_ptr, b, n_acc, token, K, stride_db, K1_PAD)


# ----------------------------------------------------------------------------------------------------------------
# Wrappers
# ----------------------------------------------------------------------------------------------------------------

MAX_BLOCK_V = 8192  # vocabulary tile (elements per loop iteration)
TARGET_CHUNK_TILES = 4  # GPU: tiles per chunk, so Gemma's V = 262144 is 8 chunks of 32768 per row


def _vocab_split(V: int, block_v: int | None, num_chunks: int | None, interpret: bool) -> tuple[int, int, int]:
    """(BLOCK_V, chunk_size, num_chunks). Under the interpreter one chunk per row (programs are the cost)."""
    block_v = block_v or min(MAX_BLOCK_V, max(16, triton.next_power_of_2(V)))
    tiles = triton.cdiv(V, block_v)
    if num_chunks is None:
        num_chunks = 1 if interpret else triton.cdiv(tiles, TARGET_CHUNK_TILES)
    num_chunks = max(1, min(num_chunks, tiles))
    chunk_size = triton.cdiv(tiles, num_chunks) * block_v
    return block_v, chunk_size, triton.cdiv(V, chunk_size)


def _check_last_dim(**tensors):
    for name, t in tensors.items():
        if t is not None and t.numel() and t.stride(-1) != 1:
            raise ValueError(f"{name} needs a contiguous last dimension, got strides {t.stride()}")


def verify_greedy(
    target_logits: torch.Tensor,
    draft_ids: torch.Tensor,
    num_drafts: torch.Tensor,
    *,
    block_v: int | None = None,
    num_chunks: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of :func:`minimtp.speculative.verify_greedy` (same arguments, same result).

    target_logits [B, K+1, V] fp32/fp16/bf16, draft_ids [B, K] int, num_drafts [B] int, each with a contiguous
    last dim. Returns out_ids [B, K+1] int64 (-1 padded) and num_emitted [B] int64. ``block_v`` / ``num_chunks``
    are tuning knobs for tests and benchmarks.
    """
    B, K1, V = target_logits.shape
    K = K1 - 1
    if draft_ids.shape != (B, K) or num_drafts.shape != (B,):
        raise ValueError(f"logits {tuple(target_logits.shape)}, drafts {tuple(draft_ids.shape)}, n {num_drafts.shape}")
    _check_last_dim(target_logits=target_logits, draft_ids=draft_ids)
    dev = target_logits.device
    out = torch.empty((B, K1), dtype=torch.int64, device=dev)
    emitted = torch.empty((B,), dtype=torch.int64, device=dev)
    if B == 0:
        return out, emitted
    interpret = check_launch(_greedy_argmax_kernel, dev)
    block_v, chunk_size, chunks = _vocab_split(V, block_v, num_chunks, interpret)
    part_val = torch.empty((B * K1, chunks), dtype=torch.float32, device=dev)
    part_idx = torch.empty((B * K1, chunks), dtype=torch.int64, device=dev)
    _greedy_argmax_kernel[(B * K1, chunks)](
        part_val,
        part_idx,
        target_logits,
        V,
        K1,
        chunk_size,
        chunks,
        target_logits.stride(0),
        target_logits.stride(1),
        BLOCK_V=block_v,
        num_warps=8 if block_v >= 4096 else 4,
        enable_fp_fusion=FP_FUSION,
    )
    _greedy_finish_kernel[(B,)](
        out,
        emitted,
        part_val,
        part_idx,
        draft_ids,
        num_drafts,
        K,
        chunks,
        draft_ids.stride(0),
        CHUNKS_PAD=triton.next_power_of_2(chunks),
        K1_PAD=triton.next_power_of_2(K1),
        num_warps=1,
        enable_fp_fusion=FP_FUSION,
    )
    return out, emitted


def verify(
    target_probs: torch.Tensor,
    draft_ids: torch.Tensor,
    draft_probs: torch.Tensor | None,
    num_drafts: torch.Tensor,
    uniforms: torch.Tensor,
    noise: torch.Tensor,
    *,
    block_v: int | None = None,
    num_chunks: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of :func:`minimtp.speculative.verify` (same arguments, bit-identical result).

    target_probs [B, K+1, V] fp32, draft_ids [B, K] int, draft_probs [B, K, V] fp32 or None (argmax drafts),
    num_drafts [B] int, uniforms [B, K] fp64, noise [B, V] fp32; contiguous last dims (other strides are free;
    ``uniforms`` must be fully contiguous). Returns out_ids [B, K+1] int64 (-1 padded) and num_emitted [B] int64.
    """
    B, K1, V = target_probs.shape
    K = K1 - 1
    if draft_ids.shape != (B, K) or uniforms.shape != (B, K) or noise.shape != (B, V):
        raise ValueError(
            f"target_probs {tuple(target_probs.shape)}, draft_ids {tuple(draft_ids.shape)}, "
            f"uniforms {tuple(uniforms.shape)}, noise {tuple(noise.shape)}"
        )
    if draft_probs is not None and draft_probs.shape != (B, K, V):
        raise ValueError(f"draft_probs {tuple(draft_probs.shape)}, expected {(B, K, V)}")
    if target_probs.dtype != torch.float32 or noise.dtype != torch.float32 or uniforms.dtype != torch.float64:
        raise ValueError(
            f"dtypes: probs {target_probs.dtype} (f32), noise {noise.dtype} (f32), u {uniforms.dtype} (f64)"
        )
    if draft_probs is not None and draft_probs.dtype != torch.float32:
        raise ValueError(f"draft_probs dtype {draft_probs.dtype}, expected float32")
    _check_last_dim(target_probs=target_probs, draft_ids=draft_ids, draft_probs=draft_probs, noise=noise)
    uniforms = uniforms.contiguous()
    dev = target_probs.device
    out = torch.empty((B, K1), dtype=torch.int64, device=dev)
    emitted = torch.empty((B,), dtype=torch.int64, device=dev)
    if B == 0:
        return out, emitted
    interpret = check_launch(_race_kernel, dev)
    block_v, chunk_size, chunks = _vocab_split(V, block_v, num_chunks, interpret)
    part_val = torch.empty((B, chunks, 2), dtype=torch.float32, device=dev)
    part_idx = torch.empty((B, chunks, 2), dtype=torch.int64, device=dev)
    part_any = torch.empty((B, chunks), dtype=torch.int32, device=dev)
    n_acc = torch.empty((B,), dtype=torch.int32, device=dev)
    has_q = draft_probs is not None and K > 0
    q = draft_probs if has_q else target_probs  # any valid pointer when unused
    _race_kernel[(B, chunks)](
        part_val,
        part_idx,
        part_any,
        n_acc,
        target_probs,
        q,
        draft_ids,
        num_drafts,
        uniforms,
        noise,
        K,
        V,
        chunk_size,
        chunks,
        target_probs.stride(0),
        target_probs.stride(1),
        q.stride(0),
        q.stride(1),
        draft_ids.stride(0),
        noise.stride(0),
        HAS_Q=has_q,
        BLOCK_V=block_v,
        num_warps=8 if block_v >= 4096 else 4,
        enable_fp_fusion=FP_FUSION,
    )
    _race_finish_kernel[(B,)](
        out,
        emitted,
        part_val,
        part_idx,
        part_any,
        n_acc,
        draft_ids,
        num_drafts,
        K,
        chunks,
        draft_ids.stride(0),
        CHUNKS_PAD=triton.next_power_of_2(chunks),
        K1_PAD=triton.next_power_of_2(K1),
        num_warps=1,
        enable_fp_fusion=FP_FUSION,
    )
    return out, emitted
