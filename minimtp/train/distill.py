"""Distilling the assistant against the frozen target (multi-step, teacher-forced).

For every position p of a batch the assistant runs ``draft_steps`` recurrent steps at position p (step j reads the
embedding of token p+j-1 and the previous step's hidden state, step 1 the target's hidden state at p-1) and is
trained to match the target's next-token distribution at p+j-1: cross-entropy with the target's probabilities,
i.e. KL plus the target's entropy. Step inputs are the corpus tokens (teacher forcing), for which the target's
distributions are exact labels (docs: concepts/gemma4-assistant).
"""

from __future__ import annotations

import os
import sys

import torch

from minimtp.assistant import Gemma4Assistant, read_assistant
from minimtp.attention import DraftDenseContext
from minimtp.model import Gemma4, load_target
from minimtp.train.checkpoints import export_assistant, load_checkpoint
from minimtp.train.configs import assistant_config_dict, count_params, init_weights, parse_assistant_dict
from minimtp.train.data import Batches, prepare_data
from minimtp.train.loop import RunLog, autocast, make_optimizer, run_args, save_args, setup_torch, start_run, train_loop
from minimtp.train.report import plot_report


def distill_loss(target: Gemma4, asst: Gemma4Assistant, x: torch.Tensor, k: int, dtype: str = "bf16"):
    """Multi-step distillation loss on a batch ``x`` ``[B, S]`` (all positions p >= 1 in parallel).

    Step j (1..k) at position p: input = target embedding of x[p+j-1] and the hidden state (target's at p-1 for
    j = 1, the previous step's projection after), K/V of the target at positions < p. Label: the target's
    next-token distribution at p+j-1. Returns (mean over steps of the soft cross-entropy, metrics with per-step
    KL and top-1 agreement with the target)."""
    B, S = x.shape
    with torch.no_grad(), autocast(dtype):
        t_logits, t_hidden, kv = target.forward_with_kv(x)
        t_emb = target.embed(x)
    t_logp = torch.log_softmax(t_logits.float(), dim=-1)
    t_p = t_logp.exp()
    t_ent = -(t_p * t_logp).sum(-1)  # [B, S]
    t_arg = t_logits.argmax(-1)
    H = t_hidden.shape[-1]
    pos = torch.arange(S).repeat(B)
    ctx = DraftDenseContext(asst.config.text, kv, pos.view(B, S))
    hid = torch.cat([torch.zeros(B, 1, H, dtype=t_hidden.dtype), t_hidden[:, :-1]], 1).reshape(B * S, H)
    total, metrics = 0.0, {}
    for j in range(1, k + 1):
        src = torch.arange(S) + (j - 1)  # the token the step reads / the label position
        valid = ((torch.arange(S) >= 1) & (src < S)).repeat(B)
        srcc = src.clamp(max=S - 1)
        tok = t_emb[:, srcc].reshape(B * S, H)
        with autocast(dtype):
            logits, hid = asst.step(tok, hid, pos, ctx)
        logp = torch.log_softmax(logits.float(), dim=-1)
        lbl = t_p[:, srcc].reshape(B * S, -1)
        ce = -(lbl * logp).sum(-1)
        loss_j = ce[valid].mean()
        total = total + loss_j
        with torch.no_grad():
            kl = (ce - t_ent[:, srcc].reshape(-1))[valid].mean().item()
            agree = (logits.argmax(-1) == t_arg[:, srcc].reshape(-1))[valid].float().mean().item()
        metrics[f"kl{j}"], metrics[f"top1_{j}"] = round(kl, 4), round(agree, 4)
    return total / k, metrics


def warm_start(asst: Gemma4Assistant, path: str, layers: str | None = None) -> None:
    """Load a shipped assistant of the same shape into ``asst``; with ``layers`` ("1" or "0,1") keep only those
    source layers (layer j ← source layer keep[j]: a shallower drafter)."""
    src = read_assistant(path, torch.float32).state_dict()
    if layers:
        keep = [int(i) for i in layers.split(",")]
        src = {k: v for k, v in src.items() if not k.startswith("model.layers.")} | {
            k.replace(f"model.layers.{i}.", f"model.layers.{j}.", 1): v
            for j, i in enumerate(keep)
            for k, v in src.items()
            if k.startswith(f"model.layers.{i}.")
        }
    missing = asst.load_state_dict(src, strict=False)
    if missing.missing_keys or missing.unexpected_keys:
        raise SystemExit(f"error: --init-from {path}: shape/key mismatch {missing}")


def assistant_info(run: str, args, model, steps: int | None = None) -> dict:
    """``training_info.json`` of an assistant run: size, steps (default: the last logged), time, the last
    validation metrics, settings."""
    recs = RunLog(os.path.join(run, "log.jsonl")).read()
    vals = [r for r in recs if "val_loss" in r]
    return {
        "params": count_params(model),
        "steps": (recs[-1]["step"] if recs else 0) if steps is None else steps,
        "train_minutes": round(sum(r["s"] for r in recs) / 60, 1),
        "final_val": {k: v for k, v in vals[-1].items() if k.startswith("val_")} if vals else {},
        "args": run_args(args),
    }


def cmd_assistant(args) -> None:
    """``assistant``: distil (or resume) an assistant run in ``--out`` and export it to ``OUT/final``."""
    setup_torch(args)
    run = args.out
    resume = start_run(args)
    target = load_target(args.target, torch.float32)
    # the tokenized corpus: the selfgen data directory already holds it (prepare_data returns at once there)
    data = (args.selfgen_data or os.path.join(run, "data")) if args.selfgen_frac else os.path.join(run, "data")
    prepare_data(args.target, data, args.max_files)
    cfg_dict = assistant_config_dict(args, target.config)
    acfg = parse_assistant_dict(cfg_dict, args.draft_tokens)
    torch.manual_seed(args.seed)
    asst = Gemma4Assistant(acfg)
    init_weights(asst)
    if args.init_from_target:  # the target's embedding is a good start for the tied head when sizes match
        if target.config.hidden_size == acfg.text.hidden_size:
            with torch.no_grad():
                asst.model.embed_tokens.weight.copy_(target.model.embed_tokens.weight)
    if args.init_from and not resume:  # warm start: continue distilling a shipped assistant
        warm_start(asst, args.init_from, args.init_layers)
    opt = make_optimizer(asst, args.lr, args.weight_decay)
    step0 = load_checkpoint(run, asst, opt)["step"] if resume else 0
    save_args(run, args)
    n = count_params(asst)
    print(f"assistant: {n / 1e6:.2f}M params, start at step {step0}", file=sys.stderr)
    frac = args.selfgen_frac
    train_b = Batches(data, "train", args.batch_size, args.seq_len, args.seed, args.chat_frac, frac)
    val_b = Batches(data, "val", args.batch_size, args.seq_len, args.seed + 1, 0.0, frac)

    def loss_fn(step):
        asst.train()
        return distill_loss(target, asst, train_b.get(step), args.draft_steps, args.dtype)

    @torch.no_grad()
    def eval_fn():
        asst.eval()
        ms = [distill_loss(target, asst, val_b.get(i), args.draft_steps, args.dtype) for i in range(args.eval_batches)]
        out = {"val_loss": round(sum(m[0].item() for m in ms) / len(ms), 4)}
        for key in ms[0][1]:
            out["val_" + key] = round(sum(m[1][key] for m in ms) / len(ms), 4)
        return out

    extra = {"kind": "assistant", "params": n, "config": cfg_dict}
    train_loop(args, asst, opt, run, step0, loss_fn, eval_fn, extra)
    asst.eval()
    info = assistant_info(run, args, asst)
    export_assistant(asst, cfg_dict, os.path.join(run, "final"), args.draft_tokens, info)
    plot_report(run)
    print(f"exported {os.path.join(run, 'final')}", file=sys.stderr)
