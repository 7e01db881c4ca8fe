"""Paged KV cache: a block pool per layer type, per-sequence block tables, append, rollback, window trimming.

Layout (docs: concepts/paged-kv-cache). Every layer that computes K/V (not the KV-shared "reuse" layers) owns
``k[i], v[i]: [num_blocks, block_size, kvh_i, d_i]``. Layers of one type share block ids, so each type
("full_attention", "sliding_attention") has one pool of free ids and one block table per sequence; position
``pos`` of a sequence lives in slot ``table[pos // block_size] * block_size + pos % block_size``.

* append: :meth:`reserve` makes the table cover ``n`` positions; the model writes K/V through the slot mapping.
* rollback: :meth:`truncate` forgets positions ``>= n`` (rejected drafts) and frees the blocks past them.
* sliding window: :meth:`trim_window` frees sliding blocks whose positions all lie before ``n - keep``; with
  ``keep = max(W, W_draft + 1)`` both the target (W keys) and the drafter (the last W+1) still find theirs.
  Freed table entries are never read (attention only reads the blocks its window covers).
"""

from __future__ import annotations

import torch

from minimtp.config import SLIDING, TextConfig
from minimtp.errors import CacheFullError


class KVCache:
    def __init__(
        self,
        cfg: TextConfig,
        num_blocks: dict[str, int],
        block_size: int = 16,
        sliding_keep: int | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ):
        self.cfg = cfg
        self.block_size = block_size
        self.device = torch.device(device)
        self.keep = sliding_keep if sliding_keep is not None else cfg.sliding_window + 1
        self.num_blocks = dict(num_blocks)
        self.free_blocks = {t: list(range(n - 1, -1, -1)) for t, n in self.num_blocks.items()}
        self.k: dict[int, torch.Tensor] = {}
        self.v: dict[int, torch.Tensor] = {}
        for i, mode in enumerate(cfg.kv_modes):
            if mode != "reuse":
                shape = (self.num_blocks[cfg.layer_types[i]], block_size, cfg.kv_heads[i], cfg.head_dims[i])
                self.k[i] = torch.zeros(shape, dtype=dtype, device=device)
                self.v[i] = torch.zeros(shape, dtype=dtype, device=device)
        self.tables: dict[int, dict[str, list[int | None]]] = {}  # seq -> type -> block ids (None = freed)
        self.lengths: dict[int, int] = {}

    @classmethod
    def for_requests(
        cls,
        cfg: TextConfig,
        prompt_lens,
        max_new: int,
        k: int,
        keep: int,
        block_size: int = 16,
        num_blocks: int | None = None,
        dtype=torch.float32,
        device="cpu",
    ) -> KVCache:
        """A pool that fits every request: ``prompt + max_new + k + 1`` positions each (the k drafts and the pending
        token of the last round). A sliding pool needs only the prompt's blocks (freed after prefill) plus the
        ``keep + k + 1`` positions that stay visible, with two blocks of slack. ``num_blocks`` overrides both."""
        cdiv = lambda a, b: -(-a // b)
        full = sum(cdiv(n + max_new + k + 1, block_size) for n in prompt_lens)
        window = sum(
            min(cdiv(n + max_new + k + 1, block_size), cdiv(n, block_size) + cdiv(keep + k + 1, block_size) + 2)
            for n in prompt_lens
        )
        sizes = {t: num_blocks or (window if t == SLIDING else full) for t in set(cfg.layer_types)}
        return cls(cfg, sizes, block_size, keep, dtype, device)

    # ---- sequence bookkeeping -------------------------------------------------------------------------------
    def add(self, seq: int) -> None:
        self.tables[seq] = {t: [] for t in self.num_blocks}
        self.lengths[seq] = 0

    def release(self, seq: int) -> None:
        for t, table in self.tables.pop(seq).items():
            self.free_blocks[t].extend(b for b in table if b is not None)
        del self.lengths[seq]

    def reserve(self, seq: int, n: int) -> None:
        """Make ``seq``'s tables cover positions ``0..n-1`` (new K/V is then written by the model)."""
        need = -(-n // self.block_size)
        for t, table in self.tables[seq].items():  # check every pool first: a failed reserve takes nothing
            missing = need - len(table)
            if missing > len(self.free_blocks[t]):
                raise CacheFullError(
                    f"KV cache pool for {t} is full: sequence {seq} needs {missing} more blocks of "
                    f"{self.block_size}, {len(self.free_blocks[t])} free of {self.num_blocks[t]}"
                )
        for t, table in self.tables[seq].items():
            for _ in range(need - len(table)):
                table.append(self.free_blocks[t].pop())
        self.lengths[seq] = max(self.lengths[seq], n)

    def truncate(self, seq: int, n: int) -> None:
        """Roll back to ``n`` valid positions; blocks entirely past ``n`` return to the pool."""
        keep_blocks = -(-n // self.block_size)
        for t, table in self.tables[seq].items():
            while len(table) > keep_blocks:
                b = table.pop()
                if b is not None:
                    self.free_blocks[t].append(b)
        self.lengths[seq] = n

    def trim_window(self, seq: int, n: int) -> None:
        """Free sliding-window blocks that no query at position >= n (target or drafter) can see again."""
        if SLIDING not in self.tables[seq]:
            return
        table = self.tables[seq][SLIDING]
        dead = max(0, n - self.keep) // self.block_size  # blocks [0, dead) hold only positions < n - keep
        for j in range(min(dead, len(table))):
            if table[j] is not None:
                self.free_blocks[SLIDING].append(table[j])
                table[j] = None

    # ---- tensors for one forward ----------------------------------------------------------------------------
    def block_tables(self, seqs: list[int], device=None) -> dict[str, torch.Tensor]:
        out = {}
        for t in self.num_blocks:
            rows = [[0 if b is None else b for b in self.tables[s][t]] for s in seqs]
            width = max(1, max(len(r) for r in rows))
            out[t] = torch.tensor([r + [0] * (width - len(r)) for r in rows], dtype=torch.int32, device=device)
        return out

    def slot_mapping(self, seqs: list[int], starts: list[int], counts: list[int], device=None) -> dict:
        """Slots of positions ``starts[b] .. starts[b]+counts[b]-1`` of each sequence, packed ``[T]`` int64."""
        bs, out = self.block_size, {}
        for t in self.num_blocks:
            slots = []
            for s, start, c in zip(seqs, starts, counts):
                table = self.tables[s][t]
                slots.extend(table[p // bs] * bs + p % bs for p in range(start, start + c))
            out[t] = torch.tensor(slots, dtype=torch.int64, device=device)
        return out

    def write(self, i: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        kc, vc = self.k[i], self.v[i]
        kc.view(-1, *kc.shape[2:]).index_copy_(0, slots, k.to(kc.dtype))
        vc.view(-1, *vc.shape[2:]).index_copy_(0, slots, v.to(vc.dtype))
