"""``python -m minimtp.bench serve``: the server under load - throughput and latency by concurrency, with and
without the assistant, and what the HTTP layer costs.

Method (docs: guides/serving): one server (``python -m minimtp.serve`` in a child process, on a free loopback
port); for each concurrency level c, ``--requests-per-level`` streaming ``/v1/completions``
requests from ``openai.AsyncOpenAI``, c in flight at a time, greedy, ``ignore_eos`` (exactly ``--max-tokens``
tokens each), the code prompts of ``minimtp.bench.speedup.PROMPTS`` in turn; with the assistant (per-request
``num_speculative_tokens`` = the default k) and without (0) on the same server, both warmed up at each level.

* TTFT: from sending a request to its first chunk with text.
* ITL: each later chunk with text adds its gap since the previous one divided by its tokens, once per token (as
  the server's histogram does). The stream carries text, not ids, so a chunk's tokens are counted afterwards by
  re-tokenizing the text so far (serve.json gives that total beside the exact ``usage``); a chunk that adds no
  token folds its gap into the next.
* aggregate tok/s: the level's completion tokens (``usage``) / its wall time.
* overhead: tok/s of the server at concurrency 1 over the same prompts through ``Engine.generate`` in this process
  (the same pair and flags, loaded after the server has stopped). The server runs in its own process, as deployed.
  The greedy texts of every level are compared with the offline ones.
* load: ``--load-streams`` streams at once (default 64), ``--load-rounds`` times (default 3), half greedy and half
  seeded sampling (temperature 1, seed = the stream's index), with and without the assistant in turn: each text must
  equal the same request run alone through ``Engine.generate`` (exact), and the server's resident memory (VmRSS of
  its process) is read before the first round and after each.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import torch

from minimtp.bench.speedup import PROMPTS
from minimtp.bench.timing import load_bench_pair
from minimtp.config import load_assistant_config
from minimtp.errors import MinimtpError
from minimtp.fast import weights_dtype
from minimtp.flags import DEFAULT_DIR
from minimtp.serve import build_parser as serve_parser
from minimtp.tokenizer import load_tokenizer

# the model-pair flags of python -m minimtp.serve (and .generate), passed on to the server
PAIR = (
    "--model",
    "--assistant",
    "--num-speculative-tokens",
    "--dtype",
    "--draft-dtype",
    "--reference",
    "--draft-mode",
    "--attention",
    "--verifier",
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m minimtp.bench serve", description=__doc__.split("\n\n")[0])
    for a in serve_parser()._actions:
        if set(a.option_strings) & set(PAIR):
            p._add_action(a)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is stable on a 2-vCPU VM)")
    p.add_argument("--concurrency", default="1,4,16,64", help="comma-separated levels (1 is always run)")
    p.add_argument("--requests-per-level", type=int, default=None, help="default: max(8, 2 x concurrency)")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens per request (ignore_eos)")
    p.add_argument("--max-num-seqs", type=int, default=None, help="server batch size (default: the top level)")
    p.add_argument("--load-streams", type=int, default=64, help="concurrent streams of the load rounds (0: none)")
    p.add_argument("--load-rounds", type=int, default=3, help="rounds of --load-streams streams")
    p.add_argument("--out", default="bench_results", help="directory for serve.md, serve.json and serve.png")
    return p


def start_server(args, max_num_seqs: int):
    """(server process, port): ``python -m minimtp.serve`` with the bench's settings on a free loopback port, in its
    own process (as a real deployment: the client's Python work does not share the server's interpreter lock)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "minimtp.serve", "--port", str(port), "--threads", str(args.threads)]
    cmd += ["--max-num-seqs", str(max_num_seqs), "--max-waiting", str(max(max_num_seqs, args.load_streams))]
    cmd += ["--max-model-len", str(256 + args.max_tokens)]  # the prompts are short; the pool fits max_num_seqs
    for flag in PAIR:
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is True:
            cmd.append(flag)
        elif value not in (None, False):
            cmd += [flag, str(value)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    for _ in range(1200):
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited: {proc.stderr.read().strip().splitlines()[-1:]}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
            return proc, port
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("the server did not answer /health within 120 s")


async def one_request(client, model: str, prompt: str, max_tokens: int, k: int) -> dict:
    """One streamed completion: its text, its tokens (``usage``), and for every chunk with text its time since the
    request was sent and the text's length after it."""
    t0 = time.perf_counter()
    stream = await client.completions.create(
        model=model,
        prompt=prompt,
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True, "num_speculative_tokens": k},
    )
    times = []
    ends = []
    text = ""
    tokens = 0
    async for chunk in stream:
        now = time.perf_counter()
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
        delta = chunk.choices[0].text if chunk.choices else ""
        if delta:
            text += delta
            times.append(now - t0)
            ends.append(len(text))
    return dict(prompt=prompt, text=text, tokens=tokens, times=times, ends=ends, e2e_s=time.perf_counter() - t0)


async def run_level(client, model: str, prompts: list[str], c: int, n: int, max_tokens: int, k: int):
    """n requests, c in flight at a time: (results, wall seconds)."""
    gate = asyncio.Semaphore(c)

    async def task(i):
        async with gate:
            return await one_request(client, model, prompts[i % len(prompts)], max_tokens, k)

    t0 = time.perf_counter()
    res = await asyncio.gather(*(task(i) for i in range(n)))
    return res, time.perf_counter() - t0


def itl_samples(r: dict, count) -> tuple[list[float], int]:
    """Inter-token gaps of one streamed request (module docstring) and the re-tokenized token count."""
    prefix = [count(r["text"][:e]) for e in r["ends"]]
    if not prefix:
        return [], 0
    gaps = []
    last_t = r["times"][0]
    last_n = prefix[0]
    for t, n in zip(r["times"][1:], prefix[1:]):
        if n > last_n:
            gaps += [(t - last_t) / (n - last_n)] * (n - last_n)
            last_t = t
            last_n = n
    return gaps, prefix[-1]


def _percentile_ms(xs: list[float], q: float) -> float:
    """The q-th percentile of ``xs`` (seconds) in milliseconds, NaN if empty."""
    return float(np.percentile(xs, q)) * 1e3 if xs else float("nan")


def summarize(res: list[dict], wall: float, c: int, k: int, count) -> dict:
    """One level's row: tokens, aggregate tok/s, p50/p99 TTFT and ITL, p50 end-to-end latency."""
    ttft = [r["times"][0] for r in res if r["times"]]
    itl = []
    counted = 0
    for r in res:
        gaps, n = itl_samples(r, count)
        itl += gaps
        counted += n
    tokens = sum(r["tokens"] for r in res)
    return dict(
        concurrency=c,
        k=k,
        requests=len(res),
        tokens=tokens,
        retokenized_tokens=counted,
        wall_s=wall,
        tok_s=tokens / wall,
        ttft_p50_ms=_percentile_ms(ttft, 50),
        ttft_p99_ms=_percentile_ms(ttft, 99),
        itl_p50_ms=_percentile_ms(itl, 50),
        itl_p99_ms=_percentile_ms(itl, 99),
        e2e_p50_ms=_percentile_ms([r["e2e_s"] for r in res], 50),
    )


async def run_levels(port: int, model: str, levels: list[int], args, ks: list[int], count):
    """Every level, each draft length of ``ks`` (warm-ups first): (summary rows, {(c, k): [(prompt, text)]})."""
    import openai  # a dev extra (pip install minimtp[dev]); --help works without it

    prompts = PROMPTS["code"]
    client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="bench", max_retries=0, timeout=3600)
    rows = []
    texts = {}
    for c in levels:
        n = args.requests_per_level or max(8, 2 * c)
        for kk in ks:
            await run_level(client, model, prompts, c, c, min(4, args.max_tokens), kk)  # warm-up at this level
        for kk in ks:
            res, wall = await run_level(client, model, prompts, c, n, args.max_tokens, kk)
            rows.append(summarize(res, wall, c, kk, count))
            texts[(c, kk)] = [(r["prompt"], r["text"]) for r in res]
    await client.close()
    return rows, texts


def load_request(i: int, k: int, max_tokens: int) -> dict:
    """Stream i of a load round: greedy for even i, seeded sampling for odd i; the draft length k or plain."""
    body = dict(prompt=PROMPTS["code"][i % len(PROMPTS["code"])], max_tokens=max_tokens, temperature=0.0)
    if i % 2:
        body |= dict(temperature=1.0, seed=i)
    return body | dict(num_speculative_tokens=k if i % 4 < 2 else 0)


def rss_mib(pid: int) -> float:
    """The resident memory of process ``pid`` (VmRSS, Linux), in MiB; NaN where /proc does not tell."""
    try:
        with open(f"/proc/{pid}/status") as f:
            line = next(x for x in f if x.startswith("VmRSS:"))
        return int(line.split()[1]) / 1024
    except (OSError, StopIteration):
        return float("nan")


async def run_load(port: int, model: str, args, k: int, pid: int) -> dict:
    """The load rounds (module docstring): every round's texts, and the server's RSS before and after each."""
    import openai

    client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="bench", max_retries=0, timeout=3600)

    async def one(i: int) -> str:
        body = load_request(i, k, args.max_tokens)
        prompt = body.pop("prompt")
        extra = {"ignore_eos": True, "num_speculative_tokens": body.pop("num_speculative_tokens")}
        stream = await client.completions.create(model=model, prompt=prompt, stream=True, extra_body=extra, **body)
        return "".join([chunk.choices[0].text async for chunk in stream if chunk.choices])

    rss = [rss_mib(pid)]
    rounds = []
    for _ in range(args.load_rounds):
        rounds.append(await asyncio.gather(*(one(i) for i in range(args.load_streams))))
        rss.append(rss_mib(pid))
    await client.close()
    return dict(rounds=rounds, rss_mib=rss)


def offline_load(engine, tok, args, k: int) -> list[str]:
    """Each load stream's text, its request run alone through ``engine.generate``."""
    texts = []
    for i in range(args.load_streams):
        body = load_request(i, k, args.max_tokens)
        kk = body["num_speculative_tokens"]
        gen = dict(max_new_tokens=args.max_tokens, temperature=body["temperature"], seed=body.get("seed"))
        gen |= dict(stop_token_ids=[], num_speculative_tokens=max(kk, 1), use_assistant=kk > 0)
        texts.append(engine.generate([tok(body["prompt"])["input_ids"]], **gen).texts[0])
    return texts


def offline(engine, tok, args, k: int, n: int) -> tuple[float, dict]:
    """tok/s of the concurrency-1 level's n prompts through ``engine.generate`` one by one, and each prompt's text."""
    prompts = PROMPTS["code"]
    gen = dict(
        max_new_tokens=args.max_tokens,
        temperature=0.0,
        stop_token_ids=[],
        num_speculative_tokens=max(k, 1),
        use_assistant=k > 0,
    )
    engine.generate([tok(prompts[0])["input_ids"]], **{**gen, "max_new_tokens": min(4, args.max_tokens)})  # warm-up
    tokens = 0
    texts = {}
    t0 = time.perf_counter()
    for i in range(n):
        prompt = prompts[i % len(prompts)]
        r = engine.generate([tok(prompt)["input_ids"]], **gen)
        tokens += len(r.tokens[0])
        texts[prompt] = r.texts[0] if r.texts else None
    return tokens / (time.perf_counter() - t0), texts


def markdown(rows: list[dict], header: str) -> str:
    """The table of the levels' rows under ``header``."""
    cols = "concurrency | assistant | requests | aggregate tok/s | p50 TTFT ms | p99 TTFT ms | p50 ITL ms | p99 ITL ms"
    out = [header, "", f"| {cols} |", "|---" * 8 + "|"]
    for r in rows:
        assistant = f"yes (k={r['k']})" if r["k"] else "no"
        out.append(
            f"| {r['concurrency']} | {assistant} | {r['requests']} | {r['tok_s']:.1f} | {r['ttft_p50_ms']:.0f} | "
            f"{r['ttft_p99_ms']:.0f} | {r['itl_p50_ms']:.1f} | {r['itl_p99_ms']:.1f} |"
        )
    return "\n".join(out)


def plot(rows: list[dict], path: str) -> None:
    """serve.png: aggregate tok/s and p50 TTFT against concurrency, with and without the assistant."""
    import matplotlib  # an optional extra (pip install minimtp[plots])

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8))
    levels = sorted({r["concurrency"] for r in rows})
    for k in sorted({r["k"] for r in rows}, reverse=True):
        rs = [r for r in rows if r["k"] == k]
        label = f"assistant (k = {k})" if k else "no assistant"
        for ax, key in zip(axes, ("tok_s", "ttft_p50_ms")):
            ax.plot([r["concurrency"] for r in rs], [r[key] for r in rs], "o-", label=label)
    for ax, ylabel in zip(axes, ("aggregate tok/s", "p50 TTFT (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(levels, [str(c) for c in levels])
        ax.set_ylim(bottom=0)
        ax.set_xlabel("concurrent requests")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _default_k(args) -> int:
    """The assistant's num_assistant_tokens (what the server drafts by default), else 6."""
    asst_dir = args.assistant or os.path.join(DEFAULT_DIR, "assistant")
    return load_assistant_config(asst_dir).num_assistant_tokens or 6


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.model and not args.assistant:
        print("error: --assistant DIR is required with --model", file=sys.stderr)
        return 2
    levels = sorted({1, *(int(x) for x in args.concurrency.split(","))})
    torch.set_flush_denormal(True)
    torch.set_num_threads(args.threads)
    model = "minimtp-default" if args.model is None else os.path.basename(args.model.rstrip("/"))
    try:
        proc, port = start_server(args, args.max_num_seqs or max(levels))
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        tok = load_tokenizer(args.model or os.path.join(DEFAULT_DIR, "target"))
        k = args.num_speculative_tokens
        if k is None:
            k = _default_k(args)
        ks = [k, 0] if k else [0]  # with the assistant (the default k), then plain

        def count(text: str) -> int:
            return len(tok(text, add_special_tokens=False)["input_ids"]) if text else 0

        rows, texts = asyncio.run(run_levels(port, model, levels, args, ks, count))
        load = asyncio.run(run_load(port, model, args, k, proc.pid)) if args.load_streams else None
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    try:  # the server is gone: the same pair, loaded here, runs the concurrency-1 prompts offline
        _, _, _, (_, _, engine) = load_bench_pair(args)
    except MinimtpError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    n1 = rows[0]["requests"]
    overhead = {}
    for kk in ks:
        tps, off_texts = offline(engine, tok, args, kk, n1)
        server_tps = next(r["tok_s"] for r in rows if r["concurrency"] == 1 and r["k"] == kk)
        overhead[kk] = dict(offline_tok_s=tps, server_tok_s=server_tps, ratio=server_tps / tps)
        for r in rows:
            if r["k"] == kk:
                r["same_text_as_offline"] = sum(off_texts.get(p) == t for p, t in texts[(r["concurrency"], kk)])
    header = (
        f"minimtp bench serve: {model} ({weights_dtype(engine.target)}, assistant "
        f"{weights_dtype(engine.assistant)}), {'reference Engine' if args.reference else 'FastEngine'}, "
        f"{args.threads} thread(s), greedy, {args.max_tokens} tokens per request (ignore_eos), code prompts, "
        f"streaming /v1/completions"
    )
    md = markdown(rows, header)
    parts = []
    for kk, o in overhead.items():
        name = f"assistant (k={kk})" if kk else "no assistant"
        parts.append(
            f"{name}: server {o['server_tok_s']:.1f} tok/s vs offline {o['offline_tok_s']:.1f} tok/s = "
            f"**{o['ratio']:.2f}x**"
        )
    md += "\n\nServer overhead at concurrency 1 (the same prompts through `Engine.generate`, same pair): "
    md += "; ".join(parts)
    same = []
    for r in rows:
        plain = "" if r["k"] else " plain"
        same.append(f"c={r['concurrency']}{plain} {r['same_text_as_offline']}/{r['requests']}")
    md += "\n\nGreedy texts equal to offline `Engine.generate`: " + ", ".join(same)
    if load is not None:
        alone = offline_load(engine, tok, args, k)
        load["exact"] = [sum(a == b for a, b in zip(texts_r, alone)) for texts_r in load["rounds"]]
        rss = ", ".join(f"{x:.0f}" for x in load["rss_mib"])
        md += (
            f"\n\nLoad: {args.load_streams} concurrent streams x {args.load_rounds} rounds (half greedy, half seeded "
            f"sampling; k={k} and plain): texts equal to the same request alone "
            + ", ".join(f"{e}/{args.load_streams}" for e in load["exact"])
            + f"; server RSS before and after each round: {rss} MiB"
        )
    os.makedirs(args.out, exist_ok=True)
    report = {"rows": rows, "overhead": {str(kk): o for kk, o in overhead.items()}, "k": k, "args": vars(args)}
    report["load"] = load
    with open(os.path.join(args.out, "serve.md"), "w") as f:
        f.write(md + "\n")
    with open(os.path.join(args.out, "serve.json"), "w") as f:
        json.dump(report, f, indent=1)
    plot(rows, os.path.join(args.out, "serve.png"))
    print(md)
    print(f"\nwrote {args.out}/serve.md, serve.json, serve.png")
    return 0
