"""The Triton paged-attention kernel equals the PyTorch reference (minimtp/attention.py).

On a machine without a GPU the kernel runs under Triton's interpreter on CPU tensors (``tests/conftest.py`` sets
``TRITON_INTERPRET=1`` before anything imports triton); with the interpreter off (a CUDA machine) the cases are
built on the GPU. Sizes follow the interpreter's cost model
(~4 ms per program + ~5 ms per key-tile iteration): batches of 1-4, sequences of up to a few hundred keys.

Tolerances: fp32 1e-4; fp16 2e-3; bf16 2e-2 — under the interpreter bf16 is upcast to fp32 inside the kernel and
the final fp32 -> bf16 store *truncates* (round toward zero) where torch rounds to nearest, so half the outputs
differ from the reference by one bf16 ulp (2^-8 relative: ~1e-2 for O(1) values), on top of the reference's
own bf16 SDPA rounding.
"""

from __future__ import annotations

import math

import pytest
import torch

from minimtp.attention import paged_attention as reference
from minimtp.kernels import paged_attention as pa
from minimtp.kernels.runtime import is_interpreted

pytestmark = pytest.mark.interp

TOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 2e-2}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DEVICE = "cpu" if is_interpreted(pa._paged_attention_kernel) else "cuda"
GARBAGE = 2**30  # a block id far outside any pool: reading it would crash or corrupt the result


def make_case(q_lens, seq_lens, Hq, Hkv, D, block_size, dtype, seed=0):
    return pa._random_case(q_lens, seq_lens, Hq, Hkv, D, block_size, dtype, DEVICE, seed=seed)


def free_blocks_below_window(block_tables, seq_lens, cu_q_lens, block_size, window):
    """Write garbage into every table slot whose block lies entirely below the oldest key any query of the
    sequence can see — what a sliding-window cache does when it frees them."""
    bt = block_tables.clone()
    for b, L in enumerate(seq_lens.tolist()):
        q_len = int(cu_q_lens[b + 1] - cu_q_lens[b])
        lo = max(0, L - q_len - window + 1)
        bt[b, : lo // block_size] = GARBAGE
    return free_blocks_past_end(bt, seq_lens, block_size)


def free_blocks_past_end(block_tables, seq_lens, block_size):
    bt = block_tables.clone()
    for b, L in enumerate(seq_lens.tolist()):
        bt[b, math.ceil(L / block_size) :] = GARBAGE
    return bt


def check(q_lens, seq_lens, Hq=4, Hkv=2, D=64, block_size=16, dtype=torch.float32, window=0, scale=None, **kw):
    q, k, v, bt, sl, cu = make_case(q_lens, seq_lens, Hq, Hkv, D, block_size, dtype)
    bt = (
        free_blocks_below_window(bt, sl, cu, block_size, window) if window else free_blocks_past_end(bt, sl, block_size)
    )
    scale = D**-0.5 if scale is None else scale
    want = reference(q, k, v, bt, sl, cu, window=window, scale=scale)
    got = pa.paged_attention(q, k, v, bt, sl, cu, window=window, scale=scale, **kw)
    assert got.shape == want.shape and got.dtype == want.dtype
    err = (got.float() - want.float()).abs().max().item()
    assert err <= TOL[dtype], f"max abs error {err:.3g} > {TOL[dtype]}"
    return got


# ---- head dims x dtypes, split and not ----------------------------------------------------------------------


@pytest.mark.parametrize("splits", [1, 3], ids=["nosplit", "split3"])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("D", [16, 32, 64, 128, 256, 512])
def test_head_dims_and_dtypes(D, dtype, splits):
    # mixed decode / verify rows in one batch, seq_len == q_len for the last one, partial last blocks
    check([1, 3, 8], [20, 37, 8], Hq=4, Hkv=2, D=D, dtype=dtype, window=0, num_splits=splits)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("D", [16, 32, 256, 512])
def test_head_dims_with_window(D, dtype):
    check([1, 4], [30, 50], Hq=4, Hkv=2, D=D, dtype=dtype, window=9, num_splits=2)


# ---- GQA ratios ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("window", [0, 7])
@pytest.mark.parametrize("splits", [1, 2])
@pytest.mark.parametrize("Hq,Hkv", [(2, 2), (4, 2), (8, 2), (16, 2), (8, 1), (6, 2)])
def test_gqa_ratios(Hq, Hkv, splits, window):
    check([2, 5, 1], [25, 40, 3], Hq=Hq, Hkv=Hkv, D=32, window=window, num_splits=splits)


# ---- block sizes x key tiles (tile spanning several blocks, one block, part of a block) ---------------------


@pytest.mark.parametrize("tile_n", [16, 32, 64])
@pytest.mark.parametrize("block_size", [8, 16, 32])
def test_block_sizes_and_tiles(block_size, tile_n):
    check([1, 6, 8], [1, 45, 71], D=32, block_size=block_size, tile_n=tile_n, num_splits=1)
    check([1, 6], [33, 64], D=32, block_size=block_size, tile_n=tile_n, num_splits=3, window=10)


# ---- q_len 1..8 mixed in one batch, seq_len == q_len, zero-length queries -----------------------------------


@pytest.mark.parametrize("splits", [1, 4])
def test_q_len_1_to_8_mixed(splits):
    q_lens = [1, 2, 3, 4, 5, 6, 7, 8]
    check(q_lens, [q + 3 * i for i, q in enumerate(q_lens)], Hq=8, Hkv=2, D=32, num_splits=splits)


@pytest.mark.parametrize("q_len", [1, 2, 8, 17, 40])
def test_seq_len_equals_q_len(q_len):
    check([q_len], [q_len], Hq=4, Hkv=1, D=16, num_splits=1)
    check([q_len], [q_len], Hq=4, Hkv=1, D=16, num_splits=2, window=5)


def test_sequence_without_queries():
    q, k, v, bt, sl, cu = make_case([2, 1, 3], [10, 20, 30], 4, 2, 32, 16, torch.float32)
    cu = torch.tensor([0, 2, 2, 3], dtype=torch.int32, device=DEVICE)  # sequence 1 has no queries this step
    q = q[:3]
    for splits in (1, 2):
        got = pa.paged_attention(q, k, v, bt, sl, cu, num_splits=splits)
        torch.testing.assert_close(got, reference(q, k, v, bt, sl, cu), atol=1e-4, rtol=0)


# ---- prefill: long q, tiled over queries --------------------------------------------------------------------


@pytest.mark.parametrize("window", [0, 6, 40])
def test_prefill_tiled_over_queries(window):
    # group 8 -> BLOCK_Q = 128 // 8 = 16 under the interpreter: 100 queries take 7 query tiles
    check([100, 3], [120, 3], Hq=8, Hkv=1, D=16, window=window)


# ---- sliding windows, freed blocks ---------------------------------------------------------------------------


@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("window", [1, 3, 8, 17, 100])
def test_windows(window, splits):
    # window 1 (itself only), smaller than a tile / a block, several blocks, larger than the sequence
    check([1, 4, 8], [60, 90, 20], D=32, block_size=8, window=window, num_splits=splits)


@pytest.mark.parametrize("splits", [1, 4])
def test_window_wraps_over_many_freed_blocks(splits):
    # 300 keys in blocks of 8, window 20: 35+ garbage table entries per sequence that must never be read
    check([1, 5], [300, 260], Hq=8, Hkv=2, D=16, block_size=8, window=20, num_splits=splits)


def test_tiny_model_shapes():
    """The tiny test models: head dims 16 (sliding, W = 8; the drafter uses W + 1) and 32 (full), kvh 2 / 1."""
    for D, Hkv, window in ((16, 2, 8), (16, 2, 9), (32, 1, 0), (32, 2, 0)):
        check([1, 4, 3], [12, 19, 3], Hq=4, Hkv=Hkv, D=D, window=window)


# ---- automatic split-KV choice, layouts, errors ---------------------------------------------------------------


def test_choose_num_splits():
    # decode / verify at small batch: split until ~2 programs per SM, at most MAX_SPLITS, at most one per tile
    assert pa.choose_num_splits(base_grid=8, q_per_seq=1, max_kv_len=8192, tile_n=64, num_sms=132) == 16
    assert pa.choose_num_splits(base_grid=8, q_per_seq=5, max_kv_len=8192, tile_n=64, num_sms=132) == 16
    assert pa.choose_num_splits(base_grid=100, q_per_seq=5, max_kv_len=8192, tile_n=64, num_sms=132) == 3
    assert pa.choose_num_splits(base_grid=8, q_per_seq=1, max_kv_len=100, tile_n=64, num_sms=132) == 2
    # big grids and prefill shapes never split
    assert pa.choose_num_splits(base_grid=200, q_per_seq=1, max_kv_len=8192, tile_n=64, num_sms=132) == 1
    assert pa.choose_num_splits(base_grid=8, q_per_seq=100, max_kv_len=8192, tile_n=64, num_sms=132) == 1


def test_automatic_split_matches(monkeypatch):
    calls = []
    real = pa.choose_num_splits
    monkeypatch.setattr(pa, "choose_num_splits", lambda *a: calls.append(real(*a)) or calls[-1])
    check([3], [50], Hq=4, Hkv=1, D=32)  # one sequence, one KV head: a grid of 1-2 programs
    assert calls and calls[-1] > 1


def test_strided_q_and_cache_views():
    q, k, v, bt, sl, cu = make_case([1, 4], [20, 33], 4, 2, 32, 16, torch.float32)
    qkv = torch.cat([q, torch.randn_like(q), torch.randn_like(q)], dim=1)  # q is a view with row stride 3*Hq*D
    kv = torch.stack([k, v], dim=1)  # [num_blocks, 2, block_size, Hkv, D]: k and v views of one pool
    qv, kk, vv = qkv[:, :4], kv[:, 0], kv[:, 1]
    want = reference(q, k, v, bt, sl, cu)
    for splits in (1, 2):
        torch.testing.assert_close(
            pa.paged_attention(qv, kk, vv, bt, sl, cu, num_splits=splits), want, atol=1e-4, rtol=0
        )


def test_scale_and_empty():
    check([2, 1], [9, 30], D=32, scale=1.0)  # Gemma 4 uses scale 1 (q and k are RMS-normalised)
    q, k, v, bt, sl, cu = make_case([1], [5], 4, 2, 32, 16, torch.float32)
    out = pa.paged_attention(q[:0], k, v, bt, sl, torch.zeros(2, dtype=torch.int32, device=DEVICE))
    assert out.shape == (0, 4, 32)


def test_rejects_bad_arguments():
    q, k, v, bt, sl, cu = make_case([1], [5], 4, 2, 32, 16, torch.float32)
    with pytest.raises(ValueError, match="multiple"):
        pa.paged_attention(q[:, :3], k, v, bt, sl, cu)
    with pytest.raises(ValueError, match="dtypes"):
        pa.paged_attention(q.half(), k, v, bt, sl, cu)
    with pytest.raises(ValueError, match="contiguous"):
        pa.paged_attention(q, k.transpose(1, 3).contiguous().transpose(1, 3), v, bt, sl, cu)


def test_backend_switch():
    from minimtp.attention import get_attention_backend

    assert get_attention_backend("triton") is pa.paged_attention


# ---- realistic size (slow) ------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("window", [0, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_realistic_size(dtype, window):
    check([1, 5, 8, 1], [64, 200, 333, 512], Hq=8, Hkv=1, D=256, dtype=dtype, window=window)
    check([1, 5], [700, 1000], Hq=8, Hkv=2, D=512, dtype=dtype, window=window)
