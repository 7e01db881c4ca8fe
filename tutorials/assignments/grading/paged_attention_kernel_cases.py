"""paged_attention_kernel, continued: the attention cases against a dense reference."""

from __future__ import annotations

import torch

from .core import TESTS, Failure, Test, check
from .paged_attention_kernel import (
    _TORCH_MATH,
    PA,
    PA_CAUSAL,
    PA_DRESSED,
    PA_GQA,
    PA_HEAD_DIM,
    PA_LAYOUT,
    PA_LOOP,
    PA_MAX_INIT,
    PA_NAN,
    PA_NO_CAUSAL,
    PA_NORM,
    PA_ONLINE,
    PA_OUTPUT,
    PA_PRECISION,
    PA_QPOS,
    PA_SCALE,
    PA_STRIDES,
    PA_TABLE,
    PA_WINDOW,
    PA_WINDOW_IGNORED,
)


def _attn_case(q_lens, seq_lens, Hq, Hkv, D, bs, seed, nan_below=None, negative=False, strided=False):
    """Random q / pool / shuffled tables. Blocks 0 and the last hold NaN and no table entry points at them (a load
    that is not masked reads block 0 through a masked table load's ``other=0``). ``nan_below[b] = p``: every table
    entry of sequence b whose block lies entirely below position p points at the last block (a block a sliding-window
    cache has freed). ``negative``: every score is very negative (q . k < -100: the running max must start at -inf).
    ``strided``: q and the pools are non-contiguous views (the wrapper must pass the real strides)."""
    g = torch.Generator().manual_seed(seed)
    B = len(seq_lens)
    nb = max(-(-L // bs) for L in seq_lens) + 1
    num_blocks = B * nb + 2
    tables = (torch.randperm(num_blocks - 2, generator=g)[: B * nb] + 1).view(B, nb).to(torch.int32)
    k = torch.randn(num_blocks, bs, Hkv, D, generator=g)
    v = torch.randn(num_blocks, bs, Hkv, D, generator=g)
    q = torch.randn(sum(q_lens), Hq, D, generator=g)
    if negative:
        q, k = 40 * q.abs(), -k.abs()
    if strided:  # the same values as views into [.., 2 * D] buffers: not the contiguous strides
        q, k, v = (torch.cat([t, torch.zeros_like(t)], -1)[..., :D] for t in (q, k, v))  # head stride 2 * D
    for t in (k, v):
        t[0], t[-1] = float("nan"), float("nan")
    if nan_below is not None:
        for b, p in enumerate(nan_below):
            tables[b, : p // bs] = num_blocks - 1
    cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    return q, k, v, tables, torch.tensor(seq_lens, dtype=torch.int32), cu


def _attn_dense(q, k_cache, v_cache, tables, seq_lens, cu_q_lens, window, scale, shift=0, causal=True,
                head_map="group", win_shift=0, use_table=True, pos_from_zero=False,
                normalise=True, tile_table=0) -> torch.Tensor:  # fmt: skip
    """Attention in float64, straight from the definition, with switches that reproduce the classic mistakes."""
    T, Hq, D = q.shape
    bs, Hkv = k_cache.shape[1], k_cache.shape[2]
    out = torch.zeros(T, Hq, D, dtype=torch.float64)
    heads = torch.arange(Hq)
    kh = {"group": heads // (Hq // Hkv), "mod": heads % Hkv, "zero": heads * 0, "last": heads * 0 + Hkv - 1}[head_map]
    cu = cu_q_lens.tolist()
    for b, L in enumerate(seq_lens.tolist()):
        ql = cu[b + 1] - cu[b]
        kpos = torch.arange(L)
        blocks = tables[b].long()[kpos // bs] if use_table else kpos // bs
        if tile_table:  # every key of a tile read through the table entry of the tile's first key
            blocks = tables[b].long()[(kpos // tile_table * tile_table) // bs]
        K = k_cache[blocks, kpos % bs].double()[:, kh]  # [L, Hq, D]
        V = v_cache[blocks, kpos % bs].double()[:, kh]
        for r in range(ql):
            pos = (r if pos_from_zero else L - ql + r) + shift
            vis = kpos <= pos if causal else torch.ones(L, dtype=torch.bool)
            if window > 0:
                vis = vis & (kpos > pos - window - win_shift)
            if not bool(vis.any()):
                out[cu[b] + r] = float("nan")
                continue
            s = torch.einsum("nhd,hd->hn", K[vis], q[cu[b] + r].double()) * scale
            w = torch.softmax(s, -1) if normalise else torch.exp(s - s.amax(-1, keepdim=True))
            out[cu[b] + r] = torch.einsum("hn,nhd->hd", w, V[vis])
    return out


def _rows(q_lens, seq_lens, window) -> list[tuple[int, int, int, int]]:
    """(sequence, absolute position, first visible key lo, last visible key pos) of every packed query row."""
    rows = []
    for b, (ql, L) in enumerate(zip(q_lens, seq_lens)):
        for r in range(ql):
            pos = L - ql + r
            rows.append((b, pos, max(pos - window + 1, 0) if window > 0 else 0, pos))
    return rows


def _attn_keys(args, scale, b: int, row: int, s: int, e: int) -> torch.Tensor:
    """Attention of query row ``row`` (of sequence b) over keys s..e-1 only, in float64 [Hq, D]; NaN if s >= e."""
    q, k_cache, v_cache, tables = args[0], args[1], args[2], args[3]
    Hq, D = q.shape[1], q.shape[2]
    if s >= e:
        return torch.full((Hq, D), float("nan"), dtype=torch.float64)
    bs, Hkv = k_cache.shape[1], k_cache.shape[2]
    kh = torch.arange(Hq) // (Hq // Hkv)
    kpos = torch.arange(s, e)
    blocks = tables[b].long()[kpos // bs]
    K = k_cache[blocks, kpos % bs].double()[:, kh]  # [n, Hq, D]
    V = v_cache[blocks, kpos % bs].double()[:, kh]
    w = torch.softmax(torch.einsum("nhd,hd->hn", K, q[row].double()) * scale, -1)
    return torch.einsum("hn,nhd->hd", w, V)


def _same(a: torch.Tensor, b: torch.Tensor, tol: float) -> bool:
    """Equal NaN pattern and the rest within ``tol``."""
    a, b = a.double(), b.double()
    return bool((torch.isnan(a) == torch.isnan(b)).all()) and float((a - b).nan_to_num(0.0).abs().max()) <= tol


def _loop_bounds(got, args, window, scale, q_lens, seq_lens, want) -> tuple[str, str] | None:
    """PA_LOOP if every wrong row is exactly attention over a truncated range of its visible keys lo..pos: keys
    lo..e-1 with e <= pos (the loop over key tiles stops early; none at all: 0 / 0 = NaN) or s..pos with s > lo (it
    starts late). The masks and the math are then right; the loop does not cover the keys they allow."""
    rows = _rows(q_lens, seq_lens, window)
    bad = [i for i in range(len(rows)) if not _same(got[i], want[i], 1e-4)]
    if not bad:
        return None
    found = []
    for i in bad:
        b, pos, lo, hi = rows[i]
        cands = [(lo, e) for e in range(hi, lo - 1, -1)] + [(s, hi + 1) for s in range(lo + 1, hi + 2)]
        hit = next(((s, e) for s, e in cands if _same(got[i], _attn_keys(args, scale, b, i, s, e), 1e-4)), None)
        if hit is None:
            return None
        found.append((i, pos, lo, hit))
    parts = []
    for i, pos, lo, (s, e) in found[:3]:
        seen = "no key at all (l = 0, so the output is 0 / 0 = NaN)" if s >= e else f"only keys {s}..{e - 1}"
        parts.append(f"row {i} (position {pos}, visible keys {lo}..{pos}) accumulated {seen}")
    more = f" (and {len(found) - 3} more rows)" if len(found) > 3 else ""
    n_ok = len(rows) - len(bad)
    ok = f"; the other {n_ok} row{'s are' if n_ok > 1 else ' is'} right" if n_ok else ""
    return PA_LOOP, ("; ".join(parts) + more + ok + ". The masks and the softmax are right but the loop over key "
                     "tiles does not visit every visible key: it must run from the "
                     "first visible key lo to pos INCLUSIVE, range(lo, pos + 1, TILE_N) (the end of a range is "
                     "exclusive)")  # fmt: skip


def _attn_variants(got, args, window, scale, Hq, Hkv) -> tuple[str, str] | None:
    """The first classic mistake whose dense output (``_attn_dense`` with its switches) the kernel reproduces."""
    D = args[0].shape[-1]
    variants = []
    if scale != 1.0:
        variants.append((PA_SCALE, "the output is attention with scale 1: the scores were not multiplied by `scale`",
                         dict(scale=1.0)))  # fmt: skip
    if abs(scale - D**-0.5) > 1e-9:
        variants.append((PA_SCALE, f"the output is attention with scale 1/sqrt(head_dim) = {D**-0.5:.4f} instead of "
                         f"the `scale` argument {scale:g}", dict(scale=D**-0.5)))  # fmt: skip
    variants += [
        (PA_SCALE, f"the output is attention with scale {scale:g}^2: the scale was applied twice",
         dict(scale=scale * scale)),
        (PA_CAUSAL, "the output is attention where each query also sees the key right after it (pos + 1)",
         dict(shift=1)),
        (PA_CAUSAL, "the output is attention where each query misses its own key (pos - 1)", dict(shift=-1)),
        (PA_NO_CAUSAL, "the output is attention without a causal mask: queries see the keys of later drafts",
         dict(causal=False)),
        (PA_QPOS, "the output is attention with the query at position r (its index in the sequence's queries) "
         "instead of seq_len - q_len + r", dict(pos_from_zero=True)),
        (PA_GQA, f"the output is attention with kv_head = h % {Hkv} instead of h // {Hq // Hkv}",
         dict(head_map="mod")),
        (PA_GQA, "the output is attention where every query head reads KV head 0", dict(head_map="zero")),
        (PA_GQA, f"the output is attention where every query head reads KV head {Hkv - 1}", dict(head_map="last")),
        (PA_WINDOW, f"the output is attention with a window of {window + 1} keys instead of {window}",
         dict(win_shift=1)),
        (PA_WINDOW, f"the output is attention with a window of {window - 1} keys instead of {window}",
         dict(win_shift=-1)),
        (PA_WINDOW_IGNORED, "the output is full causal attention: the window was ignored", dict(window=0)),
        (PA_TABLE, "the output is attention over physical block j = logical block j: the block table was not read",
         dict(use_table=False)),
        (PA_TABLE, "the output is attention where each tile of 16 keys reads all its keys through the table entry of "
         "its first key: every key needs its own lookup table[kpos // block_size]", dict(tile_table=16)),
        (PA_NORM, "the output is the softmax numerator: acc was not divided by the denominator l",
         dict(normalise=False)),
    ]  # fmt: skip
    for bug, why, kw in variants:
        if (
            kw.get("win_shift")
            and not window
            or (kw.get("head_map") and Hq == Hkv)
            or kw.get("window") == 0
            and (not window)
        ):
            continue
        a = dict(window=window, scale=scale)
        a.update({k: kw[k] for k in ("window", "scale") if k in kw})
        alt = _attn_dense(*args, a["window"], a["scale"], **{k: v for k, v in kw.items() if k not in a})
        if bool(torch.isnan(alt).any()) != bool(torch.isnan(got).any()):
            continue
        diff = (got.double() - alt).nan_to_num(0.0).abs().max()
        if float(diff) <= 1e-3 and not bool((torch.isnan(got) != torch.isnan(alt)).any()):
            return bug, why
    return None


def _attn_diagnose(got, args, window, scale, q_lens, seq_lens, Hq, Hkv, want, nan_window,
                   got_finite=None) -> tuple[str, str]:  # fmt: skip
    """Name the bug class: the first classic mistake whose output the kernel reproduces, else a heuristic.
    ``got_finite``: the kernel's output on the same case with every NaN of the pools replaced by 0 (None: not run)."""
    D = args[0].shape[-1]
    if bool(torch.isnan(got).any()):
        r = int(torch.isnan(got).any(-1).any(-1).nonzero()[0, 0])
        for bug, why, kw in [
            (PA_WINDOW, f"the output (NaN included) is attention with a window of {window + 1} keys instead of "
             f"{window}: the extra key lies in a freed block", dict(win_shift=1)),
            (PA_WINDOW_IGNORED, "the output (NaN included) is full causal attention: the window was ignored and "
             "freed blocks were read", dict(window=0)),
        ]:  # fmt: skip
            if not window:
                continue
            alt = _attn_dense(*args, kw.get("window", window), scale, win_shift=kw.get("win_shift", 0))
            same_nan = bool((torch.isnan(got) == torch.isnan(alt)).all())
            if same_nan and float((got.double() - alt).nan_to_num(0.0).abs().max()) <= 1e-3:
                return bug, why
        persists = got_finite is not None and bool(torch.isnan(got_finite).any())
        if persists:  # NaN although no block of the pools holds NaN any more: not (only) a read of a freed block
            finite = [args[0], args[1].nan_to_num(0.0), args[2].nan_to_num(0.0), *args[3:]]
            found = _attn_variants(got_finite, finite, window, scale, Hq, Hkv) or _loop_bounds(
                got_finite, finite, window, scale, q_lens, seq_lens, _attn_dense(*finite, window, scale)
            )
            if found:
                return found
        if not nan_window and D & (D - 1):
            return PA_HEAD_DIM, (f"NaN in the output from query row {r}, with head dim {D} (padded to a power of two) "
                                 "and no freed block in this case: the loads read past the head dim (mask d < HEAD_D "
                                 "on every load and store)")  # fmt: skip
        if persists:
            r = int(torch.isnan(got_finite).any(-1).any(-1).nonzero()[0, 0])
            return PA_OUTPUT, (f"NaN in the output from query row {r} even when every freed block holds 0 instead of "
                               "NaN: the kernel made it (0 / 0, a row that accumulated no key: l = 0; inf - inf in "
                               "the running max) or read memory outside the pools (an index past the block table "
                               "or the pool); check the loop bounds, the masks and where m starts")  # fmt: skip
        return PA_NAN, (f"NaN in the output from query row {r}: the kernel loaded K/V outside the visible keys "
                        "(freed blocks of a sliding window hold garbage: mask every load)")  # fmt: skip
    found = _attn_variants(got, args, window, scale, Hq, Hkv) or _loop_bounds(
        got, args, window, scale, q_lens, seq_lens, want
    )
    if found:
        return found
    if bool(torch.isnan(got).any()):
        r = int(torch.isnan(got).any(-1).any(-1).nonzero()[0, 0])
        return PA_NAN, (f"NaN in the output from query row {r}: the kernel loaded K/V outside the visible keys "
                        "(freed blocks of a sliding window hold garbage: mask every load)")  # fmt: skip
    err = (got.double() - want.double()).abs().amax(-1)  # [T, Hq]
    nkeys = []
    cu = [0, *torch.tensor(q_lens).cumsum(0).tolist()]
    for b, L in enumerate(seq_lens):
        for r in range(q_lens[b]):
            pos = L - q_lens[b] + r
            nkeys.append(pos + 1 - (max(0, pos - window + 1) if window > 0 else 0))
    bad_rows = [i for i in range(len(nkeys)) if float(err[i].max()) > 1e-4]
    near_start = [i for i in range(len(nkeys)) if window > 0 and nkeys[i] < window]  # pos - window + 1 < 0
    if bad_rows and set(bad_rows) <= set(near_start):
        return PA_WINDOW, (f"only queries closer than the window ({window}) to the start of their sequence are wrong "
                           f"(rows {bad_rows}): clamp the window start at 0, max(pos - window + 1, 0)")  # fmt: skip
    good_rows = [i for i in range(len(nkeys)) if i not in bad_rows]
    if bad_rows and good_rows and min(nkeys[i] for i in bad_rows) > max(nkeys[i] for i in good_rows):
        return PA_ONLINE, (f"rows that see <= {max(nkeys[i] for i in good_rows)} keys are right, every row that "
                           f"sees more ({min(nkeys[i] for i in bad_rows)}+) is wrong: the running max / denominator "
                           "across tiles (rescale acc and l by exp(m_old - m_new))")  # fmt: skip
    wrong_heads = [h for h in range(Hq) if float(err[:, h].max()) > 1e-4]
    if Hq != Hkv and 0 < len(wrong_heads) < Hq:
        return PA_GQA, f"query heads {wrong_heads} are wrong and the others right: check kv_head = h // (Hq / Hkv)"
    del cu
    if D & (D - 1):
        return PA_HEAD_DIM, (f"wrong rows with head dim {D}, which is padded to a power of two: the padding lanes "
                             "must be masked on every load and store (d < HEAD_D)")  # fmt: skip
    if float(err.max()) < 0.05:
        return PA_PRECISION, (f"every row is close but not within 1e-4 (max error {float(err.max()):.1e}): load K/V "
                              "and q as fp32 and keep m, l and acc in fp32")  # fmt: skip
    return PA_OUTPUT, "no classic mistake reproduces it"


class _TorchCalls(torch.overrides.TorchFunctionMode):
    """Records the torch functions called while it is active (the runtime half of the integrity check)."""

    def __init__(self):
        super().__init__()
        self.names: set[str] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.names.add(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))


def _attn_ok(mod, args, window, scale, want) -> bool:
    got = torch.as_tensor(mod.paged_attention(*args, window=window, scale=scale))
    return tuple(got.shape) == tuple(want.shape) and bool(((got - want).abs() <= 1e-4).all())


def check_attention(mod, name, q_lens, seq_lens, Hq, Hkv, D, bs, window, scale, nan_window=False, seed=None,
                    negative=False, strided=False) -> None:  # fmt: skip
    from minimtp.attention import paged_attention as reference

    nan_below = None
    if nan_window:  # positions below the first query's window start are never visible to anyone
        nan_below = [max(0, L - ql - window + 1) for L, ql in zip(seq_lens, q_lens)]
    args = _attn_case(q_lens, seq_lens, Hq, Hkv, D, bs, seed=len(name) if seed is None else seed, nan_below=nan_below,
                      negative=negative, strided=strided)  # fmt: skip
    want = reference(*args, window=window, scale=scale)
    calls = _TorchCalls()
    with calls:
        got = mod.paged_attention(*(args if strided else [a.clone() for a in args]), window=window, scale=scale)
    math_ops = sorted(calls.names & _TORCH_MATH)
    check(not math_ops, PA_DRESSED, f"paged_attention called torch {math_ops} at run time: the attention must be "
          "computed by the Triton kernel")  # fmt: skip
    got = torch.as_tensor(got)
    case = (f"q_lens {q_lens}, seq_lens {seq_lens}, Hq:Hkv {Hq}:{Hkv}, head dim {D}, block size {bs}, window "
            f"{window}, scale {scale:g}" + (", every score < -100" if negative else "")
            + (", non-contiguous q / K / V" if strided else ""))  # fmt: skip
    check(tuple(got.shape) == tuple(want.shape), PA_LAYOUT,
          f"{case}: output shape {tuple(got.shape)}, expected {tuple(want.shape)}")  # fmt: skip
    bad = torch.isnan(got) | ((got - want).abs() > 1e-4)
    if not bool(bad.any()):
        return
    if negative and not bool(torch.isfinite(got).all()):  # the same case with ordinary scores passed just before
        bug, why = PA_MAX_INIT, ("only the case where every score is very negative fails: exp(s - m) underflows to 0 "
                                 "when the running max m starts at 0; start it at -inf")  # fmt: skip
    elif strided and _attn_ok(mod, [a.contiguous() for a in args], window, scale, want):
        bug, why = PA_STRIDES, ("only the case with non-contiguous q / K / V fails: pass q.stride(), k_cache.stride() "
                                "... to the kernel instead of assuming a contiguous layout")  # fmt: skip
    else:
        got_finite = None
        if bool(torch.isnan(got).any()):  # NaN read from a freed block, or made by the kernel? Run it without NaN
            finite = [a.nan_to_num(0.0) if i in (1, 2) else a.clone() for i, a in enumerate(args)]
            got_finite = torch.as_tensor(mod.paged_attention(*finite, window=window, scale=scale))
        bug, why = _attn_diagnose(got, args, window, scale, q_lens, seq_lens, Hq, Hkv, want, nan_window, got_finite)
    err = (got.double() - want.double()).abs().nan_to_num(float("inf")).amax(dim=(0, 2))
    group = Hq // Hkv
    heads = ", ".join(f"h{h}->kv{h // group}: {float(e):.1e}" for h, e in enumerate(err))
    row = int(bad.any(-1).any(-1).nonzero()[0, 0])
    cu = [0, *torch.tensor(q_lens).cumsum(0).tolist()]
    b = max(i for i in range(len(q_lens)) if cu[i] <= row)
    r = row - cu[b]
    raise Failure(bug, f"{case}: {why}.\nmax error per query head (head -> its KV head): {heads}\nfirst wrong query: "
                  f"row {row} = sequence {b}, query {r} of {q_lens[b]}, absolute position "
                  f"{seq_lens[b] - q_lens[b] + r} (seq_len {seq_lens[b]})")  # fmt: skip


def _attn_test(name, q_lens, seq_lens, Hq, Hkv, D, bs, window, scale, nan_window=False, hint="", points=0,
               extra=()):  # fmt: skip
    def fn(mod):
        check_attention(mod, name, q_lens, seq_lens, Hq, Hkv, D, bs, window, scale, nan_window)
        for kw in extra:  # more cases of the same invariant
            check_attention(mod, name + str(sorted(kw)), **{**dict(q_lens=q_lens, seq_lens=seq_lens, Hq=Hq, Hkv=Hkv,
                            D=D, bs=bs, window=window, scale=scale, nan_window=nan_window), **kw})  # fmt: skip

    fn.__name__ = "kernel: " + name
    TESTS.setdefault(PA, []).append(Test(fn.__name__, fn, hint, points=points, bug=PA_OUTPUT))


_MASK = ("query r of a sequence with seq_len keys and q_len queries sits at position seq_len - q_len + r and sees "
         "keys j <= that position (and j > position - window). An off-by-one here passes decode (q_len = 1) and "
         "fails verify/prefill, where queries must not see the keys of the drafts after them; the scores are "
         "(k . q) * scale.")  # fmt: skip
_attn_test("decode (q_len 1), GQA 4:2", [1, 1], [5, 19], 4, 2, 8, 4, 0, 1.0, points=12,
           extra=[dict(negative=True), dict(strided=True)],
           hint="decode: one query per sequence at position seq_len - 1 sees every key; check the online softmax "
           "(running max m, denominator l, rescale by exp(m_old - m_new)), the block-table lookup and the KV head "
           "h // (Hq / Hkv).")  # fmt: skip
_attn_test("verify (q_len 3), scale 0.5", [3, 3], [7, 12], 4, 2, 8, 4, 0, 0.5, hint=_MASK, points=14)
_attn_test("prefill + decode + short prompt", [6, 1, 2], [6, 9, 2], 4, 1, 16, 4, 0, 1.0, hint=_MASK, points=14)
_WINDOW = (
    "sliding window W: query i sees keys i-W < j <= i. Never load K/V outside that range (mask the loads or start "
    "the loop at the window): a sliding cache frees old blocks, their table entries are garbage."
)
_attn_test("sliding window 4, freed blocks hold NaN", [3, 1], [14, 11], 4, 2, 8, 4, 4, 1.0, True, _WINDOW, points=14)
_attn_test("GQA 8:1, head dim 12, scale 0.3, 40 keys (several tiles)", [2, 1], [40, 23], 8, 1, 12, 4, 0, 0.3,
           hint="query head h reads KV head h // (Hq / Hkv); a head dim that is not a power of two is padded to "
           "D_PAD: mask the padding on every load and store; scores are (k . q) * scale; the online softmax "
           "must rescale across tiles.", points=14)  # fmt: skip
_attn_test("block size 8, window 5, 61 keys, freed blocks hold NaN", [2, 3, 3], [61, 30, 3], 4, 2, 8, 8, 5, 0.7, True,
           _WINDOW, points=12)  # fmt: skip
