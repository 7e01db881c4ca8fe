"""Ahead-of-time compile every kernel variant the engine can launch, for sm_80 and sm_90, without a GPU.

Run by ``tests/test_kernel_compile.py`` in a separate process, because the interpreter must be off in the process
that compiles (see docs/concepts/kernels.md); the script removes ``TRITON_INTERPRET`` from its own environment
before it imports torch or triton, so it runs the same from a shell that exports it:

    python tests/support/kernel_compile_check.py [--arch 80 90] [--json out.json]
    python tests/support/kernel_compile_check.py --bad-dot   # must FAIL

(``MINIMTP_KERNEL_COMPILE_ONLY=1``, which older instructions put in front, is no longer needed and is ignored.)

How: each ``@triton.jit`` object in the kernel modules is replaced by a :class:`LaunchRecorder`; the real Python
wrappers then run on small CPU tensors and every ``kernel[grid](*args, **kwargs)`` is recorded instead of
launched. Each distinct launch is bound and specialised exactly as Triton's runtime would (same binder, same
signature / constexpr / alignment attributes), compiled to cubin for each target with the bundled ptxas, and its
shared-memory use is checked against the per-block limit of that architecture.

Exit status: 0 if every variant compiled within the limit, 1 otherwise.
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing
import os
import sys
import time
import traceback

# The compiler cannot run interpreted, and @triton.jit reads TRITON_INTERPRET when it decorates: drop it first.
if "triton" in sys.modules:
    sys.exit("kernel_compile_check.py must start before triton is imported (it turns the interpreter off)")
os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: E402

SHARED_LIMIT = {80: 166912, 90: 232448}  # max dynamic shared memory per block: A100 163 KiB, H100 227 KiB


class LaunchRecorder:
    """Stands in for a ``@triton.jit`` kernel: ``rec[grid](*args, **kwargs)`` records instead of launching."""

    def __init__(self, fn: JITFunction, name: str):
        self.fn, self.name, self.launches = fn, name, []

    def __getitem__(self, grid):
        def record(*args, **kwargs):
            self.launches.append((tuple(grid), args, kwargs))

        return record


def compile_launch(fn: JITFunction, args: tuple, kwargs: dict, arch: int):
    """Specialise one recorded launch the way ``JITFunction.run`` does, and compile it for ``sm_<arch>``."""
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    kwargs = dict(kwargs, debug=False)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, options)
    return triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)


def _variant_key(rec: LaunchRecorder, args, kwargs) -> str:
    """What makes two launches the same compiled kernel: dtypes, constexprs and options (not sizes)."""
    parts = []
    for p, a in zip(rec.fn.params, args):
        if p.is_constexpr:
            parts.append(f"{p.name}={a}")
        elif isinstance(a, torch.Tensor):
            parts.append(f"{p.name}:{str(a.dtype).removeprefix('torch.')}")
    parts += [f"{k}={v}" for k, v in sorted(kwargs.items())]
    return f"{rec.name}({', '.join(parts)})"


# ----------------------------------------------------------------------------------------------------------------
# The launches the engine can make
# ----------------------------------------------------------------------------------------------------------------

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
HEAD_DIMS = (16, 32, 64, 128, 256, 512)


# (q_lens, seq_lens, num_splits, window, (Hq, Hkv)) of each launch shape; every dtype x head dim gets all five.
# Together they cover: both row counts BLOCK_M (16 for decode, 64 (32 at D=512) for verify and prefill), window
# on and off with and without split-KV, GQA group 8 and 1, and the reduce kernel. fp16 shares bf16's layout and
# gets two of them. (--full: the whole product.)
PAGED_SHAPES = {
    "decode": ([1, 1, 1, 1], [40, 7, 100, 1], 1, 16, (8, 1)),
    "verify": ([5, 1, 8, 3], [45, 9, 100, 3], 1, 0, (8, 1)),
    "prefill": ([100, 37], [100, 60], 1, 16, (4, 4)),
    "split-decode": ([1, 1], [40, 100], 4, 0, (8, 1)),
    "split-verify": ([5, 8], [45, 100], 4, 16, (8, 1)),
}


def record_paged_attention(recorders: dict, full: bool = False) -> None:
    from minimtp.kernels import paged_attention as pa
    from minimtp.kernels.paged_attention import _random_case

    for name in ("_paged_attention_kernel", "_reduce_segments_kernel"):
        recorders[name] = LaunchRecorder(getattr(pa, name), f"paged_attention.{name}")
        setattr(pa, name, recorders[name])
    shapes = list(PAGED_SHAPES.values())
    if full:
        shapes = [(*s[:3], w, h) for s in shapes for w in (0, 16) for h in ((8, 2), (4, 4), (8, 1))]
    for dtype, D, (name, (q_lens, seq_lens, splits, window, (Hq, Hkv))) in itertools.product(
        DTYPES.values(), HEAD_DIMS, zip(PAGED_SHAPES, shapes) if not full else enumerate(shapes)
    ):
        if dtype == torch.float16 and name not in ("verify", "split-decode") and not full:
            continue  # fp16 lays out like bf16: two shapes suffice to prove it compiles
        args = _random_case(q_lens, seq_lens, Hq, Hkv, D, 16, dtype, "cpu")
        pa.paged_attention(*args, window=window, scale=D**-0.5, num_splits=splits)


def record_verify(recorders: dict) -> None:
    """Greedy (logits fp32 / bf16 / fp16) and stochastic (with and without draft probabilities) verification at
    Gemma's vocabulary (8 chunks of 4 tiles of 8192), and a small vocabulary (one 64-wide tile)."""
    from minimtp.kernels import verify as vk

    names = ("_greedy_argmax_kernel", "_greedy_finish_kernel", "_race_kernel", "_race_finish_kernel")
    for name in names:
        recorders[name] = LaunchRecorder(getattr(vk, name), f"verify.{name}")
        setattr(vk, name, recorders[name])
    B, K = 2, 4
    for V in (262144, 50):
        drafts = torch.zeros(B, K, dtype=torch.int64)
        num_drafts = torch.full((B,), K, dtype=torch.int64)
        for dtype in DTYPES.values():
            vk.verify_greedy(torch.zeros(B, K + 1, V, dtype=dtype), drafts, num_drafts)
        p, q = torch.zeros(B, K + 1, V), torch.zeros(B, K, V)
        u, e = torch.zeros(B, K, dtype=torch.float64), torch.ones(B, V)
        for draft_probs in (q, None):
            vk.verify(p, drafts, draft_probs, num_drafts, u, e)


# ----------------------------------------------------------------------------------------------------------------
# A kernel that must NOT compile: fp16 tl.dot with K = 8 (the interpreter runs it, ptx lowering rejects it)
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _bad_dot_kernel(a_ptr, b_ptr, c_ptr, K: tl.constexpr):
    m = tl.arange(0, 16)
    k = tl.arange(0, K)
    a = tl.load(a_ptr + m[:, None] * K + k[None, :])
    b = tl.load(b_ptr + k[:, None] * 16 + m[None, :])
    tl.store(c_ptr + m[:, None] * 16 + m[None, :], tl.dot(a, b))


def record_bad_dot(recorders: dict) -> None:
    rec = recorders["_bad_dot_kernel"] = LaunchRecorder(_bad_dot_kernel, "bad_dot")
    a, b = torch.zeros(16, 8, dtype=torch.float16), torch.zeros(8, 16, dtype=torch.float16)
    c = torch.zeros(16, 16)
    rec[(1,)](a, b, c, K=8, enable_fp_fusion=True)


# ----------------------------------------------------------------------------------------------------------------


_VARIANTS: list = []


def _compile_task(task) -> dict:
    i, arch = task
    key, (rec, args, kwargs) = _VARIANTS[i]
    t = time.perf_counter()
    row = {"variant": key, "arch": f"sm_{arch}"}
    try:
        kernel = compile_launch(rec.fn, args, kwargs, arch)
        row["shared"] = kernel.metadata.shared
        row["ok"] = kernel.metadata.shared <= SHARED_LIMIT[arch]
        if not row["ok"]:
            row["error"] = f"shared memory {kernel.metadata.shared} > limit {SHARED_LIMIT[arch]}"
    except Exception as e:  # a compile error is a result, not a crash of the check
        row["ok"] = False
        row["error"] = f"{type(e).__name__}: {e}"[-2000:]
        traceback.print_exc(limit=2)
    row["seconds"] = round(time.perf_counter() - t, 3)
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, nargs="+", default=[80, 90], choices=sorted(SHARED_LIMIT))
    ap.add_argument("--only", choices=["paged_attention", "verify"], help="one kernel module only")
    ap.add_argument(
        "--bad-dot", action="store_true", help="compile a deliberately invalid kernel (fp16, K = 8: must fail)"
    )
    ap.add_argument("--json", help="write the per-variant results here")
    ap.add_argument("--full", action="store_true", help="paged attention: every shape x window x GQA layout")
    ap.add_argument("--match", help="only variants whose description contains this substring")
    ap.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1), help="parallel compile processes")
    ap.add_argument("--list", action="store_true", help="list the distinct variants, compile nothing")
    opts = ap.parse_args(argv)

    t0 = time.perf_counter()
    recorders: dict = {}
    if opts.bad_dot:
        record_bad_dot(recorders)
    else:
        if opts.only in (None, "paged_attention"):
            record_paged_attention(recorders, full=opts.full)
        if opts.only in (None, "verify"):
            record_verify(recorders)
    variants = {}
    for rec in recorders.values():
        for _grid, args, kwargs in rec.launches:
            key = _variant_key(rec, args, kwargs)
            if opts.match is None or opts.match in key:
                variants.setdefault(key, (rec, args, kwargs))
    print(f"{len(variants)} distinct variants from {sum(len(r.launches) for r in recorders.values())} launches")
    if opts.list:
        print("\n".join(variants))
        return 0

    global _VARIANTS
    _VARIANTS = list(variants.items())
    tasks = [(i, arch) for i in range(len(_VARIANTS)) for arch in opts.arch]
    results, failures = [], 0
    if opts.jobs > 1:  # fork: the workers inherit the recorded launches
        pool = multiprocessing.get_context("fork").Pool(opts.jobs)
        rows = pool.imap_unordered(_compile_task, tasks)
    else:
        pool, rows = None, map(_compile_task, tasks)
    for row in rows:
        failures += not row["ok"]
        results.append(row)
        status = "ok" if row["ok"] else "FAIL " + row["error"].splitlines()[-1][:200]
        print(
            f"{row['arch']} {row.get('shared', '-'):>7} B {row['seconds']:6.2f} s  {row['variant']}  {status}",
            flush=True,
        )
    if pool is not None:
        pool.close()
        pool.join()

    summary = {
        "variants": len(variants),
        "compiles": len(results),
        "failures": failures,
        "seconds": round(time.perf_counter() - t0, 1),
        "results": results,
    }
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump(summary, f, indent=1)
    print(f"{len(results)} compiles, {failures} failures, {summary['seconds']} s")
    return 1 if failures or not results else 0


if __name__ == "__main__":
    sys.exit(main())
