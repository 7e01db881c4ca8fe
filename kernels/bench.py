"""GPU benchmark of the Triton kernels: latency and achieved memory bandwidth versus the device's peak.

    python -m minimtp.kernels.bench                      # decode + verify shapes, contexts 512 .. 32k, bf16
    python -m minimtp.kernels.bench --batch 1 8 --contexts 1024 8192 --head-dim 512 --heads 32 4 --out b.png

Attention (decode q_len 1 and verify q_len k+1) is timed over context lengths beside the PyTorch reference
(``minimtp.attention.paged_attention``), with the split-KV choice reported; the verification kernels are timed
at Gemma's vocabulary. Bandwidth counts the bytes a kernel must move at least (keys and values it can see, the
queries and outputs; for verification the probability / logit rows it reads), divided by the median latency
from ``triton.testing.do_bench``. Prints a table and writes a PNG (matplotlib).

Needs a CUDA device and the interpreter off (``TRITON_INTERPRET`` unset); otherwise it says so and exits
(``--help`` works anywhere). Not run in CI.
"""

from __future__ import annotations

import argparse
import math
import sys
from functools import partial

# Peak DRAM bandwidth (GB/s) by device-name substring, used when --peak-gbps is not given.
PEAK_GBPS = {
    "H200": 4800,
    "H100 SXM": 3350,
    "H100 NVL": 3900,
    "H100 PCIe": 2000,
    "H100": 3350,
    "A100-SXM4-80GB": 2039,
    "A100 80GB PCIe": 1935,
    "A100": 1555,
    "L40S": 864,
    "L4": 300,
    "A10G": 600,
    "RTX 4090": 1008,
    "RTX 3090": 936,
}
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description="Latency and achieved memory bandwidth of the Triton paged-attention and verification kernels "
        "(decode and verify shapes over context lengths) beside the PyTorch reference. Needs a CUDA GPU.",
    )
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="batch sizes (default 1 8)")
    ap.add_argument("--contexts", type=int, nargs="+", default=[512, 2048, 8192, 32768], help="keys per sequence")
    ap.add_argument("--q-lens", type=int, nargs="+", default=[1, 5], help="1 = decode, k+1 = verify (default 1 5)")
    ap.add_argument("--heads", type=int, nargs=2, default=[8, 1], metavar=("HQ", "HKV"), help="default 8 1 (E2B)")
    ap.add_argument("--head-dim", type=int, default=256)
    ap.add_argument("--window", type=int, default=0, help="sliding window (0 = full attention)")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    ap.add_argument("--vocab", type=int, default=262144, help="vocabulary of the verification benchmark")
    ap.add_argument("--k", type=int, default=4, help="drafts per sequence in the verification benchmark")
    ap.add_argument("--no-torch", action="store_true", help="skip the (slow) PyTorch reference")
    ap.add_argument("--peak-gbps", type=float, help="device peak bandwidth in GB/s (default: from the device name)")
    ap.add_argument("--out", default="kernel_bench.png", help="PNG to write (default kernel_bench.png)")
    return ap.parse_args(argv)


def peak_bandwidth(name: str, override: float | None) -> float | None:
    if override:
        return override
    for key, gbps in PEAK_GBPS.items():
        if key in name:
            return float(gbps)
    return None


def attention_case(B, context, q_len, Hq, Hkv, D, block_size, dtype, device):
    import torch

    blocks_per_seq = math.ceil(context / block_size)
    num_blocks = B * blocks_per_seq
    k = torch.randn(num_blocks, block_size, Hkv, D, dtype=dtype, device=device)
    v = torch.randn_like(k)
    tables = torch.randperm(num_blocks, device=device).view(B, blocks_per_seq).to(torch.int32)
    q = torch.randn(B * q_len, Hq, D, dtype=dtype, device=device)
    seq_lens = torch.full((B,), context, dtype=torch.int32, device=device)
    cu = torch.arange(0, B * q_len + 1, q_len, dtype=torch.int32, device=device)
    return q, k, v, tables, seq_lens, cu


def attention_bytes(B, context, q_len, Hq, Hkv, D, window, elem) -> int:
    keys = min(context, window + q_len - 1) if window else context
    return B * (2 * keys * Hkv * D + 2 * q_len * Hq * D) * elem


def main(argv=None) -> int:
    opts = parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("kernels/bench.py needs a CUDA GPU (the interpreter would time Python, not the kernels).")
        return 2
    import triton
    from triton.testing import do_bench

    from minimtp.kernels import paged_attention as pa
    from minimtp.kernels import verify as vk
    from minimtp.kernels.runtime import is_interpreted

    if is_interpreted(pa._paged_attention_kernel):
        print("kernels/bench.py times the compiled kernels: unset TRITON_INTERPRET (it is set to 1 here).")
        return 2

    from minimtp.attention import paged_attention as torch_attention
    from minimtp.speculative import verify as torch_verify

    device = torch.device("cuda")
    props = torch.cuda.get_device_properties(device)
    peak = peak_bandwidth(props.name, opts.peak_gbps)
    dtype = getattr(torch, DTYPES[opts.dtype])
    elem = torch.finfo(dtype).bits // 8
    Hq, Hkv = opts.heads
    D = opts.head_dim
    print(f"{props.name}, {props.multi_processor_count} SMs, peak {peak or '?'} GB/s, triton {triton.__version__}")
    print(f"attention: Hq {Hq}, Hkv {Hkv}, D {D}, {opts.dtype}, window {opts.window}, block {opts.block_size}")

    rows = []
    print(f"{'B':>3} {'q_len':>5} {'context':>7} {'splits':>6} {'triton us':>10} {'GB/s':>7} {'% peak':>6}", end="")
    print(f" {'torch us':>10}")
    for B in opts.batch:
        for q_len in opts.q_lens:
            for context in opts.contexts:
                args = attention_case(B, context, q_len, Hq, Hkv, D, opts.block_size, dtype, device)
                kw = dict(window=opts.window, scale=D**-0.5)
                ms = do_bench(partial(pa.paged_attention, *args, **kw), warmup=25, rep=100)
                cfg = pa._launch_config(D, dtype, False)
                block_q = min(triton.next_power_of_2(q_len), max(1, cfg["max_rows"] // (Hq // Hkv)))
                grid = ((B * q_len) // block_q + B) * Hkv
                splits = pa.choose_num_splits(
                    grid, q_len, args[3].shape[1] * opts.block_size, cfg["tile_n"], props.multi_processor_count
                )
                torch_ms = None
                if not opts.no_torch and B * context <= 65536 * 8:
                    torch_ms = do_bench(partial(torch_attention, *args, **kw), warmup=5, rep=20)
                gbps = attention_bytes(B, context, q_len, Hq, Hkv, D, opts.window, elem) / (ms * 1e-3) / 1e9
                row = dict(B=B, q_len=q_len, context=context, splits=splits, us=ms * 1e3, gbps=gbps, torch_us=None)
                if torch_ms is not None:
                    row["torch_us"] = torch_ms * 1e3
                rows.append(row)
                pct = f"{100 * gbps / peak:6.1f}" if peak else "     ?"
                t_us = f"{row['torch_us']:10.1f}" if row["torch_us"] is not None else f"{'-':>10}"
                print(f"{B:>3} {q_len:>5} {context:>7} {splits:>6} {ms * 1e3:10.1f} {gbps:7.0f} {pct} {t_us}")
                del args
                torch.cuda.empty_cache()

    V, K = opts.vocab, opts.k
    print(f"\nverification: V {V}, K {K}")
    print(f"{'B':>3} {'kernel':>14} {'triton us':>10} {'GB/s':>7} {'% peak':>6} {'torch us':>10}")
    vrows = []
    for B in opts.batch:
        g = torch.Generator(device=device).manual_seed(0)
        p = torch.softmax(torch.randn(B, K + 1, V, device=device, generator=g), -1)
        q = torch.softmax(torch.randn(B, K, V, device=device, generator=g), -1)
        drafts = torch.randint(0, V, (B, K), device=device, generator=g)
        nd = torch.full((B,), K, device=device)
        u = torch.rand(B, K, dtype=torch.float64, device=device, generator=g)
        e = torch.empty(B, V, device=device).exponential_(generator=g)
        logits = torch.log(p).to(dtype)
        cases = {
            "verify_greedy": (
                partial(vk.verify_greedy, logits, drafts, nd),
                None,
                B * (K + 1) * V * elem,
            ),
            "verify": (
                partial(vk.verify, p, drafts, q, nd, u, e),
                partial(torch_verify, p, drafts, q, nd, u, e),
                B * 3 * V * 4,  # p_n, q_n and E of the scanned row (+ K scalar gathers)
            ),
        }
        for name, (fn, ref_fn, nbytes) in cases.items():
            ms = do_bench(fn, warmup=25, rep=100)
            torch_ms = do_bench(ref_fn, warmup=5, rep=20) if ref_fn and not opts.no_torch else None
            gbps = nbytes / (ms * 1e-3) / 1e9
            pct = f"{100 * gbps / peak:6.1f}" if peak else "     ?"
            t_us = f"{torch_ms * 1e3:10.1f}" if torch_ms is not None else f"{'-':>10}"
            print(f"{B:>3} {name:>14} {ms * 1e3:10.1f} {gbps:7.0f} {pct} {t_us}")
            vrows.append(dict(B=B, kernel=name, us=ms * 1e3, gbps=gbps))

    plot(rows, peak, opts, props.name)
    print(f"wrote {opts.out}")
    return 0


def plot(rows, peak, opts, device_name) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_b) = plt.subplots(1, 2, figsize=(12, 4.5))
    for B in opts.batch:
        for q_len in opts.q_lens:
            sel = [r for r in rows if r["B"] == B and r["q_len"] == q_len]
            ctx = [r["context"] for r in sel]
            label = f"B={B}, q_len={q_len}"
            (line,) = ax_t.plot(ctx, [r["us"] for r in sel], "o-", label=f"triton {label}")
            torch_pts = [(r["context"], r["torch_us"]) for r in sel if r["torch_us"] is not None]
            if torch_pts:
                ax_t.plot(*zip(*torch_pts), "x--", color=line.get_color(), label=f"torch {label}")
            ax_b.plot(ctx, [r["gbps"] for r in sel], "o-", color=line.get_color(), label=label)
    if peak:
        ax_b.axhline(peak, color="k", ls=":", label=f"peak {peak:.0f} GB/s")
    for ax, ylabel in ((ax_t, "latency (us)"), (ax_b, "achieved bandwidth (GB/s)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context length (keys)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    ax_t.set_yscale("log")
    Hq, Hkv = opts.heads
    fig.suptitle(f"paged attention on {device_name}: Hq {Hq}, Hkv {Hkv}, D {opts.head_dim}, {opts.dtype}")
    fig.tight_layout()
    fig.savefig(opts.out, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
