"""The optimisation loop shared by pre-training and distillation: run directory, schedule, logging, checkpoints.

AdamW (β = 0.9/0.95, weight decay on matrices), linear warm-up then cosine decay to 10 % of the peak rate,
gradient clipping at 1.0, periodic validation and atomic checkpoints; a run resumes from ``OUT/ckpt``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time

import torch

from minimtp.train.checkpoints import save_checkpoint

# flags a resumed run may change; every other setting comes from the run's own args.json
RESUME_OVERRIDES = ("steps", "minutes", "resume", "threads", "ckpt_minutes", "out")


def setup_torch(args) -> None:
    """Flush subnormals (softmax over 8k logits produces them: 10x slowdowns otherwise) and set the threads."""
    torch.set_flush_denormal(True)
    if args.threads:
        torch.set_num_threads(args.threads)


def start_run(args) -> bool:
    """Create the run directory; with ``--resume`` and a checkpoint there, restore the run's saved settings
    (except :data:`RESUME_OVERRIDES`) into ``args``. Returns whether the run resumes."""
    os.makedirs(args.out, exist_ok=True)
    resume = args.resume and os.path.isfile(os.path.join(args.out, "ckpt", "state.json"))
    if resume:
        with open(os.path.join(args.out, "args.json")) as f:
            saved = json.load(f)
        for k, v in saved.items():
            if k not in RESUME_OVERRIDES:
                setattr(args, k, v)
    return resume


def save_args(run_dir: str, args) -> None:
    """Write the run's settings to ``run_dir/args.json``."""
    with open(os.path.join(run_dir, "args.json"), "w") as f:
        json.dump(run_args(args), f, indent=2)


def run_args(args) -> dict:
    """The command-line settings as a dict (without the sub-command's function)."""
    return {k: v for k, v in vars(args).items() if k != "func"}


def cosine_lr(step: int, total: int, peak: float, warmup: int, floor: float = 0.1) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay from ``peak`` to ``floor · peak`` at ``total``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t)))


def make_optimizer(model, lr: float, weight_decay: float):
    """AdamW with weight decay on matrices (not embeddings, norms or scalars)."""
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim >= 2 and "embed" not in n]
    other = [p for n, p in model.named_parameters() if p.requires_grad and not (p.ndim >= 2 and "embed" not in n)]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": other, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8)


def autocast(dtype: str):
    """bf16 autocast on CPU for ``"bf16"``, nothing otherwise."""
    if dtype in ("bf16", "bfloat16"):
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


class RunLog:
    """``log.jsonl`` of a run: one JSON record per step."""

    def __init__(self, path: str):
        self.path = path

    def write(self, **rec):
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")

    def read(self) -> list[dict]:
        if not os.path.isfile(self.path):
            return []
        with open(self.path) as f:
            return [json.loads(line) for line in f if line.strip()]


def train_loop(args, model, opt, run_dir: str, step0: int, loss_fn, eval_fn, extra: dict) -> int:
    """The shared optimisation loop: LR schedule, clipping, logging, periodic eval and checkpoints, tqdm.

    With ``--minutes M`` the cosine schedule runs over M minutes of *training compute* (the summed step times,
    kept across resumes) instead of over ``--steps``, and training stops when they are spent: on a shared,
    noisy 2-core machine the step time varies 5x, so a step count is a poor way to hit a time budget."""
    from tqdm import tqdm

    log = RunLog(os.path.join(run_dir, "log.jsonl"))
    recs = log.read()
    if recs and recs[-1]["step"] > step0:  # steps logged after the last checkpoint are redone
        recs = [r for r in recs if r["step"] <= step0]
        with open(log.path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in recs)
    elapsed = sum(r["s"] for r in recs)
    budget = args.minutes * 60 if getattr(args, "minutes", 0) else 0.0
    t_last_ckpt, t0 = time.time(), time.time()
    total = args.steps
    bar = tqdm(range(step0, total), initial=step0, total=total, mininterval=5, file=sys.stderr)
    step = step0
    for step in bar:
        if budget:
            progress = min(1.0, elapsed / budget)
            lr = cosine_lr(step, step + 1, args.lr, args.warmup) if step < args.warmup else None
            lr = lr or args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
        else:
            lr = cosine_lr(step, total, args.lr, args.warmup)
        for g in opt.param_groups:
            g["lr"] = lr
        ts = time.time()
        loss, metrics = loss_fn(step)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0).item()
        opt.step()
        opt.zero_grad(set_to_none=True)
        rec = dict(step=step + 1, loss=round(loss.item(), 4), lr=lr, gnorm=round(gnorm, 3))
        rec["s"] = round(time.time() - ts, 3)
        elapsed += rec["s"]
        rec["elapsed_min"] = round(elapsed / 60, 2)
        rec.update(metrics)
        done = step + 1 == total or (budget and elapsed >= budget)
        if (step + 1) % args.eval_every == 0 or done:
            rec.update(eval_fn())
        log.write(**rec)
        bar.set_postfix(loss=f"{rec['loss']:.3f}", **({"val": f"{rec['val_loss']:.3f}"} if "val_loss" in rec else {}))
        if time.time() - t_last_ckpt > args.ckpt_minutes * 60 or done:
            save_checkpoint(run_dir, model, opt, step + 1, extra)
            t_last_ckpt = time.time()
        if done:
            break
    bar.close()
    print(f"trained steps {step0}..{step + 1} in {(time.time() - t0) / 60:.1f} min", file=sys.stderr)
    return step + 1
