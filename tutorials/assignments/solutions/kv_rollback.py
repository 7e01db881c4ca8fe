"""Reference solution: assignment ``kv_rollback`` (append, rollback and window trimming on a paged KV cache).

Grade it: ``python tutorials/assignments/grade.py kv_rollback tutorials/assignments/solutions/kv_rollback.py``
"""

from __future__ import annotations

import torch

from minimtp.errors import CacheFullError


class PagedKV:
    """K/V of one layer for several sequences, in a pool of ``num_blocks`` blocks of ``block_size`` positions.

    ``tables[seq]``: block ids in position order (``None`` = freed by window trimming); ``lengths[seq]``: number of
    valid positions; ``free``: ids of unused blocks. Position ``i`` of ``seq`` is slot ``i % block_size`` of block
    ``tables[seq][i // block_size]``.
    """

    def __init__(self, num_blocks: int, block_size: int, dim: int):
        self.block_size = block_size
        self.k = torch.zeros(num_blocks, block_size, dim)
        self.v = torch.zeros(num_blocks, block_size, dim)
        self.free: list[int] = list(range(num_blocks - 1, -1, -1))  # pop() hands out 0, 1, 2, ...
        self.tables: dict[int, list[int | None]] = {}
        self.lengths: dict[int, int] = {}

    def add(self, seq: int) -> None:
        self.tables[seq], self.lengths[seq] = [], 0

    def release(self, seq: int) -> None:
        self.free.extend(b for b in self.tables.pop(seq) if b is not None)
        del self.lengths[seq]

    def gather(self, seq: int, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V of positions ``start .. length-1`` ([n, dim] each), read through the block table."""
        pos = range(start, self.lengths[seq])
        blocks = [self.tables[seq][i // self.block_size] for i in pos]
        assert None not in blocks, "reading a freed block"
        slots = [(b, i % self.block_size) for b, i in zip(blocks, pos)]
        k = torch.stack([self.k[b, s] for b, s in slots]) if slots else self.k.new_zeros(0, self.k.shape[-1])
        v = torch.stack([self.v[b, s] for b, s in slots]) if slots else self.v.new_zeros(0, self.v.shape[-1])
        return k, v

    # ---- the assignment --------------------------------------------------------------------------------

    def append(self, seq: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write ``k``, ``v`` ([T, dim]) at positions ``length .. length+T-1``, taking blocks from the pool as
        needed; raise CacheFullError (leaving everything unchanged) if the pool cannot cover them."""
        table, n, T = self.tables[seq], self.lengths[seq], k.shape[0]
        need = -(-(n + T) // self.block_size) - len(table)
        if need > len(self.free):
            raise CacheFullError(f"sequence {seq} needs {need} more blocks, {len(self.free)} free")
        for _ in range(need):
            table.append(self.free.pop())
        for j in range(T):
            i = n + j
            b, s = table[i // self.block_size], i % self.block_size
            self.k[b, s], self.v[b, s] = k[j], v[j]
        self.lengths[seq] = n + T

    def rollback(self, seq: int, n: int) -> None:
        """Keep positions ``< n`` only (rejected drafts are forgotten): blocks entirely past ``n`` go back to the
        pool, and the next append writes at position ``n``."""
        assert 0 <= n <= self.lengths[seq]
        table = self.tables[seq]
        keep = -(-n // self.block_size)
        while len(table) > keep:
            b = table.pop()
            if b is not None:
                self.free.append(b)
        self.lengths[seq] = n

    def trim(self, seq: int, keep: int) -> None:
        """Sliding window: free every block whose positions are all ``< length - keep`` (mark it None)."""
        table = self.tables[seq]
        dead = max(0, self.lengths[seq] - keep) // self.block_size
        for j in range(min(dead, len(table))):
            if table[j] is not None:
                self.free.append(table[j])
                table[j] = None
