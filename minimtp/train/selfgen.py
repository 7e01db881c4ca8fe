"""``selfgen``: distillation data the way the drafter is used, the frozen target's own continuations.

Each row is ``<bos>`` + ``--prompt-len`` corpus tokens + the target's continuation (greedy, or sampled at
``--temperature`` for a ``--sample-frac`` share of the batches), ``--seq-len + 1`` tokens in all, written to
``OUT/selfgen_{train,val}.npy`` next to the tokenized corpus. A drafter is judged on the target's outputs, not on
human code; training on them (as Medusa-2's and EAGLE's self-distillation do) aligns the two. The continuations
are decoded by :class:`minimtp.Engine` without an assistant (batched prompts, plain decoding).
"""

from __future__ import annotations

import os
import sys

import numpy as np
import torch

from minimtp.engine import Engine
from minimtp.model import load_target
from minimtp.train.corpus import BOS
from minimtp.train.data import prepare_data
from minimtp.train.loop import setup_torch


def cmd_selfgen(args) -> None:
    """Write ``--sequences`` training rows (and a fiftieth as many validation rows) to ``--out``."""
    from tqdm import tqdm

    setup_torch(args)
    prepare_data(args.target, args.out, args.max_files)
    target = load_target(args.target, torch.bfloat16)
    engine = Engine(target)
    n_new = args.seq_len - args.prompt_len  # <bos> + prompt + continuation = seq_len + 1 tokens
    for split, n in (("train", args.sequences), ("val", max(args.batch, args.sequences // 50))):
        code = np.load(os.path.join(args.out, f"{split}.npy"))
        rng = np.random.default_rng([args.seed, 0 if split == "train" else 1])
        rows = []
        for b0 in tqdm(range(0, n, args.batch), desc=f"selfgen {split}", file=sys.stderr):
            m = min(args.batch, n - b0)
            starts = rng.integers(0, len(code) - args.prompt_len, m)
            prompts = [[BOS] + code[i : i + args.prompt_len].tolist() for i in starts]
            sampled = rng.random() < args.sample_frac
            res = engine.generate(
                prompts,
                max_new_tokens=n_new,
                temperature=args.temperature if sampled else 0.0,
                seed=int(rng.integers(1 << 31)),
                stop_token_ids=[],
            )
            rows.extend(p + t for p, t in zip(prompts, res.tokens))
        np.save(os.path.join(args.out, f"selfgen_{split}.npy"), np.asarray(rows, dtype=np.uint16))
        print(f"wrote {len(rows)} x {len(rows[0])} tokens to selfgen_{split}.npy", file=sys.stderr)
