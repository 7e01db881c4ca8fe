"""Pre-training the target: next-token cross-entropy of a fresh ``gemma4_text`` model on the corpus.

bf16 autocast over fp32 master weights (``--dtype``), the schedule and checkpoints of :mod:`minimtp.train.loop`;
at the end the run is exported to ``OUT/final`` (a Hugging Face directory) and its curves to ``OUT/report.png``.
"""

from __future__ import annotations

import os
import shutil
import sys

import torch
import torch.nn.functional as F

from minimtp.config import parse_text_config
from minimtp.model import Gemma4
from minimtp.train.checkpoints import export_target, load_checkpoint
from minimtp.train.configs import count_params, init_weights, target_config_dict
from minimtp.train.corpus import PAD, read_corpus
from minimtp.train.data import Batches, prepare_data
from minimtp.train.loop import RunLog, autocast, make_optimizer, run_args, save_args, setup_torch, start_run, train_loop
from minimtp.train.report import plot_report
from minimtp.train.tokenizer import load_tokenizer, train_tokenizer


def lm_loss(model: Gemma4, x: torch.Tensor, dtype: str) -> torch.Tensor:
    """Mean next-token cross-entropy of ``model`` on rows ``x`` ``[B, S+1]`` (``<pad>`` ignored)."""
    with autocast(dtype):
        logits = model(x[:, :-1])
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), ignore_index=PAD)


def target_info(run: str, args, model, meta: dict) -> dict:
    """``training_info.json`` of a target run: size, steps, tokens, time, final losses, settings, corpus."""
    recs = RunLog(os.path.join(run, "log.jsonl")).read()
    vals = [r["val_loss"] for r in recs if "val_loss" in r]
    tail = [r["loss"] for r in recs[-50:]]
    return {
        "params": count_params(model),
        "steps": recs[-1]["step"] if recs else 0,
        "tokens_seen": (recs[-1]["step"] if recs else 0) * args.batch_size * args.seq_len,
        "train_minutes": round(sum(r["s"] for r in recs) / 60, 1),
        "final_train_loss": round(sum(tail) / max(1, len(tail)), 4),
        "final_val_loss": vals[-1] if vals else None,
        "args": run_args(args),
        "corpus": meta,
    }


def _tokenizer_dir(run: str, args) -> str:
    """``run/tokenizer``: copied from ``--tokenizer`` or trained on the corpus, unless it is already there."""
    tok_dir = os.path.join(run, "tokenizer")
    if not os.path.isfile(os.path.join(tok_dir, "tokenizer.json")):
        if args.tokenizer:
            os.makedirs(tok_dir, exist_ok=True)
            for name in ("tokenizer.json", "tokenizer_config.json"):
                shutil.copy(os.path.join(args.tokenizer, name), os.path.join(tok_dir, name))
        else:
            _, train, _ = read_corpus(max_files=args.max_files)
            train_tokenizer(train, args.vocab, tok_dir)
    return tok_dir


def cmd_target(args) -> None:
    """``target``: pre-train (or resume) a target run in ``--out`` and export it to ``OUT/final``."""
    setup_torch(args)
    run = args.out
    resume = start_run(args)  # the run's own settings win over the command line (except --steps, ...)
    tok_dir = _tokenizer_dir(run, args)
    args.vocab = load_tokenizer(tok_dir).get_vocab_size()
    meta = prepare_data(tok_dir, os.path.join(run, "data"), args.max_files)
    cfg_dict = target_config_dict(args)
    cfg = parse_text_config(cfg_dict)
    torch.manual_seed(args.seed)
    model = Gemma4(cfg)
    init_weights(model)
    if args.dtype == "bf16-weights":
        model.to(torch.bfloat16)
    opt = make_optimizer(model, args.lr, args.weight_decay)
    step0 = load_checkpoint(run, model, opt)["step"] if resume else 0
    save_args(run, args)
    n = count_params(model)
    print(f"target: {n / 1e6:.2f}M params, data {meta['tokens']}, start at step {step0}", file=sys.stderr)
    train_b = Batches(os.path.join(run, "data"), "train", args.batch_size, args.seq_len, args.seed, args.chat_frac)
    val_b = Batches(os.path.join(run, "data"), "val", args.batch_size, args.seq_len, args.seed + 1, 0.0)
    dt = "bf16" if args.dtype.startswith("bf16") else "fp32"

    def loss_fn(step):
        model.train()
        return lm_loss(model, train_b.get(step), dt), {}

    @torch.no_grad()
    def eval_fn():
        model.eval()
        losses = [lm_loss(model, val_b.get(i), dt).item() for i in range(args.eval_batches)]
        return {"val_loss": round(sum(losses) / len(losses), 4)}

    extra = {"kind": "target", "params": n, "config": cfg_dict, "data": meta}
    train_loop(args, model, opt, run, step0, loss_fn, eval_fn, extra)
    info = target_info(run, args, model, meta)
    export_target(model, cfg_dict, tok_dir, os.path.join(run, "final"), info)
    plot_report(run)
    print(f"exported {os.path.join(run, 'final')}", file=sys.stderr)
