"""``python -m minimtp.train <cmd>``: the sub-commands and their flags."""

from __future__ import annotations

import argparse

from minimtp.train.distill import cmd_assistant
from minimtp.train.evaluate import cmd_accept
from minimtp.train.export import cmd_export
from minimtp.train.latency import cmd_bench
from minimtp.train.pretrain import cmd_target
from minimtp.train.report import cmd_report
from minimtp.train.selfgen import cmd_selfgen
from minimtp.train.tokenizer import cmd_tokenizer

DESCRIPTION = "Train the default model pair: a small Gemma 4 target and its MTP assistant, on CPU, in about an hour."


def _common(p, steps, bs, seq, lr):
    p.add_argument("--out", required=True, help="run directory (checkpoints, logs, final export)")
    p.add_argument("--steps", type=int, default=steps, help="maximum number of steps")
    p.add_argument("--minutes", type=float, default=0, help="time budget: cosine schedule over M compute minutes")
    p.add_argument("--batch-size", type=int, default=bs)
    p.add_argument("--seq-len", type=int, default=seq)
    p.add_argument("--lr", type=float, default=lr)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from OUT/ckpt if present")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32", "bf16-weights"])
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--eval-batches", type=int, default=4)
    p.add_argument("--ckpt-minutes", type=float, default=3.0)
    p.add_argument("--chat-frac", type=float, default=0.1, help="share of rows drawn from the chat stream")
    p.add_argument("--max-files", type=int, default=None, help="use only the first N stdlib files (tests)")


def _target_shape(p):
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--hidden", type=int, default=384)
    p.add_argument("--intermediate", type=int, default=1536)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--pattern", default="ssf", help="layer types, s=sliding f=full, repeated; last is full")
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--global-head-dim", type=int, default=128)
    p.add_argument("--window", type=int, default=128)
    p.add_argument("--max-positions", type=int, default=4096)


def parser() -> argparse.ArgumentParser:
    """The argument parser of every sub-command."""
    ap = argparse.ArgumentParser(prog="python -m minimtp.train", description=DESCRIPTION)
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("tokenizer", help="train the byte-level BPE on the stdlib")
    p.add_argument("--out", required=True)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--max-files", type=int, default=None)
    p.set_defaults(func=cmd_tokenizer)

    p = sub.add_parser("target", help="pre-train the target")
    _common(p, 1500, 16, 512, 2e-3)
    _target_shape(p)
    p.add_argument("--tokenizer", default=None, help="directory with a trained tokenizer (else train one)")
    p.set_defaults(func=cmd_target)

    p = sub.add_parser("assistant", help="distil the assistant against a frozen target")
    _common(p, 500, 16, 256, 2e-3)
    p.add_argument("--target", required=True, help="the target's Hugging Face directory")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--intermediate", type=int, default=1024)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--pattern", default="sf")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--draft-steps", type=int, default=4, help="recurrent steps trained per position")
    p.add_argument("--draft-tokens", type=int, default=4, help="num_assistant_tokens written to generation_config")
    p.add_argument("--init-from-target", action="store_true", help="copy the target embedding when sizes match")
    p.add_argument("--init-from", default=None, help="warm start from an assistant directory of the same shape")
    p.add_argument("--init-layers", default=None, help="with --init-from: source layers to keep, e.g. '1'")
    p.add_argument("--selfgen-frac", type=float, default=0.0, help="share of rows from the target's continuations")
    p.add_argument("--selfgen-data", default=None, help="data directory written by `selfgen` (default OUT/data)")
    p.set_defaults(func=cmd_assistant)

    p = sub.add_parser("selfgen", help="the frozen target's own continuations of corpus prompts (distillation data)")
    p.add_argument("--target", required=True, help="the target's Hugging Face directory")
    p.add_argument("--out", required=True, help="data directory (the tokenized corpus is written there too)")
    p.add_argument("--sequences", type=int, default=1024)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=256, help="row length - 1 (the assistant's --seq-len)")
    p.add_argument("--sample-frac", type=float, default=0.25, help="share of batches sampled instead of greedy")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--max-files", type=int, default=None)
    p.set_defaults(func=cmd_selfgen)

    p = sub.add_parser("export", help="Hugging Face directory from a run's latest checkpoint")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--to", required=True, help="destination directory")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("accept", help="greedy acceptance of a pair (measured by minimtp's engine)")
    p.add_argument("--target", required=True)
    p.add_argument("--assistant", required=True)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--new-tokens", type=int, default=96)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--dtype", default="fp32", choices=["bf16", "fp32"])
    p.add_argument("--engine", action="store_true", help="also time plain against speculative decoding")
    p.set_defaults(func=cmd_accept)

    p = sub.add_parser("bench", help="1-token vs k-token forward latency, 1 thread, bf16 and fp32")
    _target_shape(p)
    p.add_argument("--past", type=int, default=256)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--assistant-layers", type=int, default=0)
    p.add_argument("--assistant-hidden", type=int, default=256)
    p.add_argument("--assistant-heads", type=int, default=4)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("report", help="redraw the loss curves of a run")
    p.add_argument("--out", required=True)
    p.add_argument("--png", default=None)
    p.set_defaults(func=cmd_report)
    return ap


def main(argv=None) -> None:
    """Parse ``argv`` (default: the command line) and run the sub-command."""
    args = parser().parse_args(argv)
    args.func(args)
