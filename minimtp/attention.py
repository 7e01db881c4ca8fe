"""Attention over the paged KV cache: the PyTorch reference, and the backend switch.

One signature, two implementations (``"torch"`` here, ``"triton"`` in ``minimtp.kernels.paged_attention``):

    paged_attention(q, k_cache, v_cache, block_tables, seq_lens, cu_q_lens, window=0, scale=1.0) -> out

* ``q``            ``[T, Hq, D]`` – the new queries of all sequences, packed (sequence b owns rows
                   ``cu_q_lens[b]:cu_q_lens[b+1]``).
* ``k_cache``, ``v_cache`` ``[num_blocks, block_size, Hkv, D]`` – the block pool of one layer.
* ``block_tables`` ``[B, max_blocks]`` int32 – block ids of each sequence, in position order.
* ``seq_lens``     ``[B]`` int32 – keys of sequence b are its positions ``0 .. seq_lens[b]-1`` (the new
                   tokens' K/V already written).
* ``cu_q_lens``    ``[B+1]`` int32 – query row offsets. Query r of sequence b sits at the absolute position
                   ``i = seq_lens[b] - q_len_b + r`` (decode: q_len 1; verify: k+1; prefill: the prompt).
* ``window``       0 for full attention, else query i sees keys j with ``i - window < j <= i``
                   (W keys, itself included – Gemma's sliding window).
* ``scale``        softmax scale (1.0 for Gemma 4: q and k are RMS-normalised).

    out[i] = softmax_j( scale · q_i·k_j  (masked) ) · v_j

Grouped-query attention: query head h reads KV head ``h // (Hq // Hkv)``. Only the blocks that hold keys a
query can see are read, so blocks that a sliding-window cache has freed (left at any id) are never touched.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    cu_q_lens: torch.Tensor,
    window: int = 0,
    scale: float = 1.0,
) -> torch.Tensor:
    """PyTorch reference: gather each sequence's visible blocks, then masked SDPA. See module docstring."""
    T, Hq, D = q.shape
    block_size, Hkv = k_cache.shape[1], k_cache.shape[2]
    out = torch.empty_like(q)
    seq_lens_l = seq_lens.tolist()
    cu = cu_q_lens.tolist()
    for b, L in enumerate(seq_lens_l):
        s, e = cu[b], cu[b + 1]
        q_len = e - s
        if q_len == 0:
            continue
        first_q = L - q_len  # absolute position of the first query
        lo = max(0, first_q - window + 1) if window > 0 else 0  # oldest key any query here can see
        b0, b1 = lo // block_size, (L + block_size - 1) // block_size
        blocks = block_tables[b, b0:b1]
        # float32 math (as the kernels accumulate; on CPU also several times faster than bfloat16 attention);
        # index_select rather than k_cache[blocks]: the same gather, several times faster on CPU
        k = k_cache.index_select(0, blocks).reshape(-1, Hkv, D)[lo - b0 * block_size : L - b0 * block_size].float()
        v = v_cache.index_select(0, blocks).reshape(-1, Hkv, D)[lo - b0 * block_size : L - b0 * block_size].float()
        mask = None  # one query sees exactly the keys lo..L-1
        if q_len > 1:
            qpos = torch.arange(first_q, L)[:, None]
            kpos = torch.arange(lo, L)[None, :]
            mask = kpos <= qpos
            if window > 0:
                mask &= kpos > qpos - window
        o = F.scaled_dot_product_attention(
            q[s:e].transpose(0, 1)[None].float(),  # [1, Hq, q_len, D]
            k.transpose(0, 1)[None],  # [1, Hkv, n_keys, D]
            v.transpose(0, 1)[None],
            attn_mask=mask,
            scale=scale,
            enable_gqa=Hq != Hkv,
        )
        out[s:e] = o[0].transpose(0, 1)
    return out


def get_attention_backend(name: str):
    """``"torch"`` → :func:`paged_attention`; ``"triton"`` → the Triton kernel with the same signature."""
    if name == "torch":
        return paged_attention
    if name == "triton":
        from minimtp.kernels.paged_attention import paged_attention as triton_paged_attention

        return triton_paged_attention
    from minimtp.errors import CompatibilityError

    raise CompatibilityError(f"attention backend {name!r}: expected 'torch' or 'triton'")
