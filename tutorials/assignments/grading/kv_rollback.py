"""kv_rollback: append, rollback and window trimming on a paged KV cache."""

from __future__ import annotations

import torch

from .core import BUG_HINTS, DESCRIPTIONS, Failure, check, test
from .integrity import _check_imports

# =========================================================================================== kv_rollback

DESCRIPTIONS["kv_rollback"] = "append, rollback and window trimming on a paged KV cache (class PagedKV)"
KV = "kv_rollback"

KV_SHORTCUT = "library shortcut"
KV_APPEND = "append writes the wrong slot"
KV_APPEND_BLOCKS = "append takes the wrong number of blocks"
KV_ATOMIC = "append not atomic on a full pool"
KV_NO_FULL = "no CacheFullError on a full pool"
KV_FALSE_FULL = "CacheFullError although the pool suffices"
KV_STALE = "stale K/V after rollback"
KV_ROLLBACK_LEAK = "rollback leaks blocks"
KV_ROLLBACK_LIVE = "rollback frees a live block"
KV_TRIM_WINDOW = "trim frees a block in the window"
KV_TRIM_DEAD = "trim keeps dead blocks"
KV_TRIM_SHIFT = "trim shifts the table"
KV_CONSERVE = "blocks leaked or double-freed"
KV_FREED_IN_TABLE = "freed blocks left in the block table"
KV_RANDOM = "wrong K/V after a random sequence of operations"


# fmt: off
BUG_HINTS.update({
    KV_APPEND: "position i of the sequence is slot i % block_size of block table[i // block_size]: write row j of "
    "the append at position length + j, after the blocks it needs were taken.",
    KV_APPEND_BLOCKS: "take exactly ceil((length + T) / block_size) - len(table) new blocks: the last block may "
    "have free slots, fill them first.",
    KV_ATOMIC: "check that the pool covers the append BEFORE taking a block, writing a slot or changing the length: "
    "a failed append must leave tables, lengths, free list and contents as they were.",
    KV_NO_FULL: "raise minimtp.errors.CacheFullError when more blocks are needed than the free list holds (and "
    "nothing else, e.g. IndexError from pop()).",
    KV_FALSE_FULL: "the append fails only if needed > len(free): an append that takes exactly the last free blocks "
    "fits.",
    KV_STALE: "rollback(seq, n) sets length = n exactly (not the end of n's block, not n + 1), so the next append "
    "overwrites the rejected drafts' slots.",
    KV_ROLLBACK_LEAK: "after rollback(seq, n) the table holds ceil(n / block_size) blocks: pop the ones past it "
    "back into the free list.",
    KV_ROLLBACK_LIVE: "keep ceil(n / block_size) blocks: the block holding position n - 1 is still in use.",
    KV_TRIM_WINDOW: "trim frees only the blocks whose positions are ALL < length - keep: the first "
    "(length - keep) // block_size entries, counted from the length, not from the table's capacity.",
    KV_TRIM_DEAD: "free every block whose positions are all < length - keep (entry -> None, id -> free list).",
    KV_TRIM_SHIFT: "mark a trimmed entry None; do not delete it (the table is indexed by position // block_size).",
    KV_CONSERVE: "every block id is in exactly one place: one table entry or the free list (never both, never twice, "
    "never lost); skip None entries when freeing.",
    KV_FREED_IN_TABLE: "a freed block must leave its table (rollback pops it, trim sets the entry to None) before "
    "it goes back to the free list.",
})
# fmt: on


@test(KV, "write the cache yourself: import nothing from minimtp but minimtp.errors (CacheFullError); no dynamic "
      "imports.", bug=KV_SHORTCUT, gate=True)  # fmt: skip
def no_library_cache(mod):
    _check_imports(mod, ("minimtp.errors",), KV_SHORTCUT)


def _conserved(cache, num_blocks: int, what: str = "") -> None:
    used = [b for t in cache.tables.values() for b in t if b is not None]
    pre = f"{what}: " if what else ""
    check(
        all(isinstance(b, int) for b in cache.free),
        KV_CONSERVE,
        lambda: (
            f"{pre}the free list holds "
            f"{[b for b in cache.free if not isinstance(b, int)][:3]}: a freed (None) table entry was freed again"
        ),
    )
    check(len(used) == len(set(used)), KV_CONSERVE, lambda: f"{pre}a block id is in two tables (or twice in one): "
          f"{dict(cache.tables)}")  # fmt: skip
    both = sorted(set(used) & set(cache.free))
    check(not both, KV_FREED_IN_TABLE, lambda: f"{pre}block(s) {both} are both in a table and in the free list: a "
          "freed block must leave the table (rollback pops it, trim sets the entry to None)")  # fmt: skip
    check(sorted(used + list(cache.free)) == list(range(num_blocks)), KV_CONSERVE,
          lambda: f"{pre}blocks leaked or duplicated: in tables {sorted(used)}, free {sorted(cache.free)}, pool of "
          f"{num_blocks} (missing {sorted(set(range(num_blocks)) - set(used) - set(cache.free))})")  # fmt: skip


def _kv_rows(T: int, dim: int, g: torch.Generator):
    return torch.randn(T, dim, generator=g), torch.randn(T, dim, generator=g)


def _read(cache, seq: int, start: int):
    """K, V of positions start .. length-1, read by the grader through the block table from the given storage
    ``cache.k`` / ``cache.v`` [num_blocks, block_size, dim] (the file's own gather() only if that is missing)."""
    if not (torch.is_tensor(getattr(cache, "k", None)) and torch.is_tensor(getattr(cache, "v", None))):
        return cache.gather(seq, start)
    bs, table = cache.block_size, cache.tables[seq]
    ks, vs = [], []
    for i in range(start, cache.lengths[seq]):
        j = i // bs
        b = table[j] if j < len(table) else "missing"
        if b is None or b == "missing":
            return i, b
        ks.append(cache.k[b, i % bs])
        vs.append(cache.v[b, i % bs])
    dim = cache.k.shape[-1]
    return (torch.stack(ks) if ks else torch.zeros(0, dim)), (torch.stack(vs) if vs else torch.zeros(0, dim))


def _check_gather(cache, seq: int, dense: list, start: int = 0, what: str = "", bug: str = KV_APPEND) -> None:
    n = cache.lengths[seq]
    check(n == len(dense), bug, f"{what}: length {n}, expected {len(dense)}")
    got = _read(cache, seq, start)
    if isinstance(got[0], int):
        i, b = got
        raise Failure(bug, f"{what}: position {i} is in table entry {i // cache.block_size}, which is "
                      f"{'freed (None)' if b is None else 'missing'}: table {cache.tables[seq]}")  # fmt: skip
    k, v = got
    check(k.shape[0] == n - start, bug, f"{what}: read {k.shape[0]} positions, expected {n - start}")
    for i in range(start, n):
        if not (torch.equal(k[i - start], dense[i][0]) and torch.equal(v[i - start], dense[i][1])):
            wrong = [j for j in range(start, n) if not torch.equal(k[j - start], dense[j][0])]
            raise Failure(bug, f"{what}: first wrong position {i} (of {start}..{n - 1}; wrong K at "
                          f"{wrong[:6]}{' ...' if len(wrong) > 6 else ''}); block table {cache.tables[seq]}, "
                          f"block size {cache.block_size}")  # fmt: skip


def _blocks(n: int, bs: int) -> int:
    return -(-n // bs)


def check_append(mod, g: torch.Generator, nb: int, bs: int, dim: int, ops: list[tuple[int, int]]) -> None:
    cache = mod.PagedKV(nb, bs, dim)
    dense: dict[int, list] = {}
    for s, _ in ops:
        if s not in dense:
            cache.add(s)
            dense[s] = []
    for s, T in ops:
        k, v = _kv_rows(T, dim, g)
        try:
            cache.append(s, k, v)
        except IndexError as e:
            raise Failure(
                KV_APPEND_BLOCKS,
                f"block size {bs}: appending {T} to sequence {s} (length {len(dense[s])}, "
                f"{len(cache.tables[s])} blocks) raised IndexError ({e}): a position past the blocks the "
                "table holds (take ceil((length + T) / block_size) - len(table) blocks)",
            ) from None
        dense[s] += list(zip(k, v))
        what = f"block size {bs}: after appending {T} to sequence {s} (length {len(dense[s])})"
        held, need = len(cache.tables[s]), _blocks(len(dense[s]), bs)
        check(held == need, KV_APPEND_BLOCKS, f"{what}: {held} blocks held, need ceil({len(dense[s])}/{bs}) = {need}")
        _check_gather(cache, s, dense[s], what=what)
        _conserved(cache, nb, what)


@test(KV, "append: grow the table by ceil((length+T)/block_size) - len(table) blocks taken from the pool, write row j "
      "at position length+j (block table[pos // block_size], slot pos % block_size), then length += T.",
      points=12, bug=KV_APPEND)  # fmt: skip
def append_and_gather(mod):
    check_append(mod, torch.Generator().manual_seed(0), 16, 4, 3, [(0, 3), (1, 5), (0, 1), (1, 7), (0, 4), (0, 0),
                                                                    (1, 4)])  # fmt: skip


def _snapshot(cache):
    st = {"tables": {s: list(t) for s, t in cache.tables.items()}, "lengths": dict(cache.lengths),
          "free": sorted(cache.free)}  # fmt: skip
    for name in ("k", "v"):
        if torch.is_tensor(getattr(cache, name, None)):
            st[name] = getattr(cache, name).clone()
    return st


def _changed(before: dict, after: dict) -> str:
    for key in ("tables", "lengths", "free"):
        if before[key] != after[key]:
            return f"{key} changed from {before[key]} to {after[key]}"
    for key in ("k", "v"):
        if key in before and not torch.equal(before[key], after.get(key, before[key])):
            b, s = (before[key] != after[key]).any(-1).nonzero()[0].tolist()
            return f"the contents changed: {key}[block {b}, slot {s}] was written"
    return ""


def check_pool_full(mod, g: torch.Generator, bs: int, dim: int, lens: tuple[int, int], spare: int) -> None:
    """A partly full pool: sequence 0 ends inside a block, sequence 1 holds some blocks, ``spare`` blocks are free.
    An append needing spare + 1 blocks must raise CacheFullError and change nothing (tables, lengths, free list,
    contents); appends that fit exactly must not raise."""
    from minimtp.errors import CacheFullError

    n0, n1 = lens
    nb = _blocks(n0, bs) + _blocks(n1, bs) + spare
    cache = mod.PagedKV(nb, bs, dim)
    cache.add(0)
    cache.add(1)
    dense = {0: [], 1: []}
    for s, n in ((0, n0), (1, n1)):
        k, v = _kv_rows(n, dim, g)
        cache.append(s, k, v)
        dense[s] += list(zip(k, v))
    room = _blocks(n0, bs) * bs - n0  # free slots in sequence 0's last block
    T = room + (spare + 1) * bs - (bs - 1)  # needs exactly spare + 1 new blocks
    before = _snapshot(cache)
    what = (f"pool of {nb} blocks of {bs}, {spare} free, sequence 0 at length {n0} ({room} free slots in its last "
            f"block): appending {T} positions (needs {spare + 1} new blocks)")  # fmt: skip
    try:
        cache.append(0, *_kv_rows(T, dim, g))
    except CacheFullError:
        pass
    except Exception as e:
        raise Failure(KV_NO_FULL, f"{what} raised {type(e).__name__} ({e}) instead of CacheFullError") from None
    else:
        raise Failure(KV_NO_FULL, f"{what} did not raise CacheFullError")
    diff = _changed(before, _snapshot(cache))
    check(not diff, KV_ATOMIC, lambda: f"{what}: the failed append changed the cache: {diff} (check the pool BEFORE "
          "taking any block or writing any slot)")  # fmt: skip
    _check_gather(cache, 0, dense[0], what=what + ", then reading sequence 0", bug=KV_ATOMIC)
    fit = room + spare * bs  # fills the pool exactly
    k, v = _kv_rows(fit, dim, g)
    try:
        cache.append(0, k, v)
    except CacheFullError:
        raise Failure(
            KV_FALSE_FULL,
            f"pool of {nb} blocks of {bs}, {spare} free, sequence 0 at length {n0}: "
            f"appending {fit} positions fits exactly ({spare} new blocks) but raised CacheFullError",
        ) from None
    dense[0] += list(zip(k, v))
    _check_gather(cache, 0, dense[0], what=f"after an append that fills the pool exactly ({fit} positions)")
    _conserved(cache, nb, "a full pool")
    before = _snapshot(cache)
    try:
        cache.append(1, *_kv_rows(_blocks(n1, bs) * bs - n1 + 1, dim, g))
    except CacheFullError:
        pass
    except Exception as e:
        raise Failure(
            KV_NO_FULL,
            f"appending to sequence 1 with no free block raised {type(e).__name__} ({e}) instead of CacheFullError",
        ) from None
    else:
        raise Failure(KV_NO_FULL, f"appending to sequence 1 (length {n1}) one position more than its last block "
                      "holds, with no free block, did not raise CacheFullError")  # fmt: skip
    diff = _changed(before, _snapshot(cache))
    check(not diff, KV_ATOMIC, lambda: f"a failed append on an empty pool changed the cache: {diff}")


@test(KV, "when the pool cannot cover an append, raise minimtp.errors.CacheFullError BEFORE changing anything "
      "(tables, lengths, free list, block contents); an append that fits exactly must succeed.", points=12,
      bug=KV_ATOMIC)  # fmt: skip
def pool_full(mod):
    check_pool_full(mod, torch.Generator().manual_seed(4), 4, 2, (10, 5), 1)


def check_rollback(mod, g: torch.Generator, bs: int, dim: int, total: int, keeps: list[int], extra: int) -> None:
    nb = _blocks(total + extra, bs) + 1
    for n_keep in keeps:
        cache = mod.PagedKV(nb, bs, dim)
        cache.add(0)
        k, v = _kv_rows(total, dim, g)
        cache.append(0, k, v)
        cache.rollback(0, n_keep)
        dense = list(zip(k, v))[:n_keep]
        held = len(cache.tables[0])
        check(held >= _blocks(n_keep, bs), KV_ROLLBACK_LIVE, f"block size {bs}: {total} positions rolled back to "
              f"{n_keep}: {held} blocks held, need ceil({n_keep}/{bs}) = {_blocks(n_keep, bs)} (a block still holding "
              "positions < n was freed)")  # fmt: skip
        _check_gather(cache, 0, dense, what=f"block size {bs}: {total} positions rolled back to {n_keep}", bug=KV_STALE)
        k2, v2 = _kv_rows(extra, dim, g)
        cache.append(0, k2, v2)
        dense += list(zip(k2, v2))
        _check_gather(cache, 0, dense, what=f"block size {bs}: {total} positions, rolled back to {n_keep}, then "
                      f"{extra} appended (they must sit at positions {n_keep}..{n_keep + extra - 1})",
                      bug=KV_STALE)  # fmt: skip
        _conserved(cache, nb, f"after rollback to {n_keep} and append")


@test(KV, "rollback(seq, n) must forget EVERY position >= n: set length = n (not the end of n's block) and free the "
      "blocks entirely past n. Otherwise the next verify step attends to the rejected drafts' stale K/V.",
      points=14, bug=KV_STALE)  # fmt: skip
def rollback_then_append(mod):
    check_rollback(mod, torch.Generator().manual_seed(1), 4, 2, 10, [7, 8, 0, 10, 1], 3)


def check_rollback_frees(mod, g: torch.Generator, nb: int, bs: int, grow: int, keep: int, rounds: int) -> None:
    cache = mod.PagedKV(nb, bs, 2)
    cache.add(0)
    cache.add(1)
    cache.append(1, *_kv_rows(bs + 1, 2, g))
    for r in range(rounds):  # many verify rounds: +grow then keep `keep` of them
        n = cache.lengths[0]
        if _blocks(n + grow, bs) - len(cache.tables[0]) > len(cache.free):
            break
        cache.append(0, *_kv_rows(grow, 2, g))
        cache.rollback(0, n + keep)
        held, want = len(cache.tables[0]), _blocks(n + keep, bs)
        what = (f"block size {bs}, round {r}: length {n} + {grow} appended, rolled back to {n + keep}: {held} "
                f"blocks held, need ceil({n + keep}/{bs}) = {want}")  # fmt: skip
        check(held <= want, KV_ROLLBACK_LEAK, what + " (the blocks past n must go back to the pool)")
        check(held >= want, KV_ROLLBACK_LIVE, what + " (a block still holding positions < n was freed)")
        _conserved(cache, nb, f"round {r}")


@test(KV, "after rollback(seq, n) the table holds exactly ceil(n / block_size) blocks; the others are back in the "
      "free pool (a verify step that is mostly rejected must not leak blocks).", points=10,
      bug=KV_ROLLBACK_LEAK)  # fmt: skip
def rollback_frees_blocks(mod):
    check_rollback_frees(mod, torch.Generator().manual_seed(2), 10, 4, 5, 2, 20)


def check_trim(mod, g: torch.Generator, bs: int, dim: int, nb: int, chunks: list[int], keep: int) -> None:
    cache = mod.PagedKV(nb, bs, dim)
    cache.add(0)
    dense = []
    for c in chunks:
        k, v = _kv_rows(c, dim, g)
        cache.append(0, k, v)
        dense += list(zip(k, v))
        before = list(cache.tables[0])
        cache.trim(0, keep)
        t, L = cache.tables[0], len(dense)
        dead = max(0, L - keep) // bs  # blocks whose positions are all < L - keep
        what = f"block size {bs}, length {L}, trim(keep={keep}): table {before} -> {t}"
        check(len(t) == len(before), KV_TRIM_SHIFT, f"{what}: trim must mark freed entries None, not remove them "
              "(the table is indexed by position // block_size)")  # fmt: skip
        live = [j for j in range(dead, len(t)) if t[j] is None and before[j] is not None]
        if live:
            raise Failure(KV_TRIM_WINDOW, f"{what}: block entry {live[0]} holds positions {live[0] * bs}.."
                          f"{live[0] * bs + bs - 1}, not all < {L - keep}: it is still in the window")  # fmt: skip
        kept = [j for j in range(dead) if t[j] is not None]
        if kept:
            raise Failure(KV_TRIM_DEAD, f"{what}: block entry {kept[0]} (positions {kept[0] * bs}.."
                          f"{kept[0] * bs + bs - 1}, all < {L - keep}) is dead and must be freed")  # fmt: skip
        _conserved(cache, nb, what)
        _check_gather(cache, 0, dense, start=dead * bs, what=what, bug=KV_TRIM_WINDOW)


@test(KV, "trim(seq, keep): free the blocks whose positions are ALL < length - keep (table entry -> None, id -> pool);"
      " never a block holding a position >= length - keep.", points=14, bug=KV_TRIM_WINDOW)  # fmt: skip
def trim_window(mod):
    check_trim(mod, torch.Generator().manual_seed(3), 4, 2, 12, [20, 6, 3], 5)
    check_trim(mod, torch.Generator().manual_seed(6), 4, 2, 8, [13, 2], 4)  # the last block partly full


def check_random(mod, g: torch.Generator, nb: int, bs: int, dim: int, steps: int, keep: int) -> None:
    rnd = lambda n: int(torch.randint(0, n, (1,), generator=g))
    cache = mod.PagedKV(nb, bs, dim)
    dense: dict[int, list] = {}
    next_id = 0
    log = []
    for step in range(steps):
        op = rnd(10)
        if op == 0 or not dense:
            cache.add(next_id)
            dense[next_id] = []
            log.append(f"add({next_id})")
            next_id += 1
            continue
        s = list(dense)[rnd(len(dense))]
        start = sum(1 for b in cache.tables[s] if b is None) * bs
        if op <= 4:
            T = rnd(2 * bs)
            if _blocks(len(dense[s]) + T, bs) - len(cache.tables[s]) > len(cache.free):
                continue
            k, v = _kv_rows(T, dim, g)
            cache.append(s, k, v)
            dense[s] += list(zip(k, v))
            log.append(f"append({s}, {T})")
        elif op <= 7:
            n = max(start, len(dense[s]) - rnd(2 * bs))
            cache.rollback(s, n)
            dense[s] = dense[s][:n]
            log.append(f"rollback({s}, {n})")
        elif op == 8:
            before = list(cache.tables[s])
            cache.trim(s, keep)
            log.append(f"trim({s}, {keep})")
            new = [j for j, (a, b) in enumerate(zip(before, cache.tables[s])) if a is not None and b is None]
            check(all(bs * (j + 1) <= len(dense[s]) - keep for j in new), KV_TRIM_WINDOW,
                  f"step {step} ({'; '.join(log[-4:])}): trim freed a block in the window")  # fmt: skip
        else:
            cache.release(s)
            del dense[s]
            log.append(f"release({s})")
            _conserved(cache, nb, f"step {step}")
            continue
        start = sum(1 for b in cache.tables[s] if b is None) * bs
        _check_gather(cache, s, dense[s], start=start, what=f"block size {bs}, step {step} (last operations: "
                      f"{'; '.join(log[-4:])})", bug=KV_RANDOM)  # fmt: skip
        _conserved(cache, nb, f"step {step} (last operations: {'; '.join(log[-4:])})")


@test(KV, "random append / rollback / trim / release sequences over 3 sequences must always read back what a plain "
      "list would hold, and conserve the pool.", points=18, bug=KV_RANDOM)  # fmt: skip
def random_operations(mod):
    check_random(mod, torch.Generator().manual_seed(5), 40, 3, 2, 250, 4)
