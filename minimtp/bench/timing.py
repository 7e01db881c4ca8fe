"""What the benchmarks share: wall-time medians, the latency of a target forward and of a drafting step over the
engine's paged cache, the cost of top-p at Gemma's vocabulary, and loading the pair the common flags name.

``minimtp.train``'s ``bench`` command times its target shapes with :func:`target_forward_ms` and
:func:`assistant_step_ms` too.
"""

from __future__ import annotations

import os
import statistics
import time

import torch

from minimtp.attention import DraftPagedContext, PagedContext, get_attention_backend
from minimtp.errors import ConfigError
from minimtp.fast.top_p import process_logits as fast_process_logits
from minimtp.flags import DEFAULT_DIR, load_pair
from minimtp.kv_cache import KVCache
from minimtp.sampling import SamplingParams, process_logits
from minimtp.tokenizer import load_tokenizer


def median_ms(fn, reps: int) -> float:
    """Median wall time of ``fn()`` over ``reps`` calls, in milliseconds."""
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def prefilled_cache(target, past: int, room: int, attention_backend: str = "torch", seed: int = 0):
    """A one-sequence paged KV cache (sequence 0) holding ``past`` random tokens run through ``target``, with room
    for ``room`` more.

    Returns ``(cache, forward, ids, hidden)``: ``forward(start, count)`` runs ``ids[start: start + count]`` at those
    positions over the cache (logits for every row, as a verify step), ``ids`` holds ``past + room`` random token
    ids, ``hidden`` is the target's hidden state at ``past - 1``."""
    cfg = target.config
    weight = target.model.embed_tokens.weight
    block = 16
    blocks = -(-(past + room) // block) + 1
    cache = KVCache(cfg, {t: blocks for t in set(cfg.layer_types)}, block, None, weight.dtype, weight.device)
    cache.add(0)
    attend = get_attention_backend(attention_backend)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, cfg.vocab_size, (past + room,), generator=gen).to(weight.device)

    def forward(start: int, count: int):
        cache.reserve(0, start + count)
        ctx = PagedContext(cache, attend, [0], [start], [count])
        pos = torch.arange(start, start + count, device=weight.device)
        return target.run(ids[start : start + count], pos, ctx)

    with torch.inference_mode():
        hidden = forward(0, past).hidden[-1:]
    return cache, forward, ids, hidden


def target_forward_ms(target, past=256, ks=(1, 2, 3, 5), reps=30, rounds=3, warmup=10, **kw) -> dict:
    """Median latency (ms) of a k-token forward of ``target`` over a paged cache of ``past`` tokens (logits for all
    k rows, as the verify step of a round), for each k in ``ks``.

    Every shape is warmed up first (oneDNN builds primitives per shape) and the shapes are interleaved over
    ``rounds`` against drift; ``kw``: attention_backend."""
    cache, forward, _, _ = prefilled_cache(target, past, max(ks), **kw)

    def step(k):
        forward(past, k)
        cache.truncate(0, past)

    res = {k: [] for k in ks}
    with torch.inference_mode():
        for k in ks:
            for _ in range(warmup):
                step(k)
        for _ in range(rounds):
            for k in ks:
                res[k].append(median_ms(lambda k=k: step(k), reps))
    return {k: statistics.median(v) for k, v in res.items()}


def assistant_step_ms(target, assistant, past: int = 256, reps: int = 50, rounds: int = 3, **kw) -> float:
    """Median latency (ms) of one drafting step of ``assistant`` (its forward and the argmax) at position ``past``
    over ``target``'s paged cache of ``past`` tokens, as in a round of the engine; ``kw``: attention_backend."""
    cache, _, ids, hidden = prefilled_cache(target, past, 1, **kw)
    attend = get_attention_backend(kw.get("attention_backend", "torch"))
    ctx = DraftPagedContext(cache, assistant.config.text, attend, [0], [past])
    pos = torch.tensor([past], device=hidden.device)

    def step():
        logits, _ = assistant.step(target.embed(ids[past : past + 1]), hidden, pos, ctx)
        logits.float().argmax(-1)

    with torch.inference_mode():
        for _ in range(20):
            step()
        return statistics.median(median_ms(step, reps) for _ in range(rounds))


def top_p_ms(V: int = 262_144, rows: int = 1, peaked: bool = True, reps: int = 7) -> tuple[float, float]:
    """Milliseconds per row of ``process_logits`` at T = 1, top-p 0.95 alone, on ``rows`` random float32 logit rows
    (8·randn, a small nucleus, if ``peaked``; else 3·randn): (reference, fast twin), median of ``reps`` each."""
    scale = 8.0 if peaked else 3.0
    x = scale * torch.randn(rows, V, generator=torch.Generator().manual_seed(0))
    params = SamplingParams(1.0, top_p=0.95)
    reference = median_ms(lambda: process_logits(x, params), reps) / rows
    twin = median_ms(lambda: fast_process_logits(x, params), reps) / rows
    return reference, twin


def load_bench_pair(args):
    """(model dir, assistant dir, tokenizer, (target, assistant, engine)) as the shared flags ask, after setting the
    thread count; the embedded pair without --model. Raises MinimtpError (one line)."""
    torch.set_flush_denormal(True)
    torch.set_num_threads(args.threads)
    model_dir = args.model or os.path.join(DEFAULT_DIR, "target")
    asst_dir = args.assistant
    if not asst_dir:
        if args.model:
            raise ConfigError("--assistant DIR is required with --model")
        asst_dir = os.path.join(DEFAULT_DIR, "assistant")
    tokenizer = load_tokenizer(model_dir)
    return model_dir, asst_dir, tokenizer, load_pair(model_dir, asst_dir, args, tokenizer=tokenizer)
