"""``accept``: greedy acceptance of a target/assistant pair, measured by :class:`minimtp.Engine`.

The engine decodes the target's greedy continuation of every prompt with the assistant drafting ``k`` tokens a
round; at temperature 0 the output is the target's own greedy sequence, and the engine's counters give how many
drafts it accepted. ``--engine`` also times plain against speculative decoding on the same prompts.
"""

from __future__ import annotations

import json

import torch

from minimtp.engine import Engine
from minimtp.model import load_target
from minimtp.train.checkpoints import load_assistant_dir
from minimtp.train.loop import setup_torch
from minimtp.train.tokenizer import load_tokenizer

DEFAULT_PROMPTS = [
    "import os\nimport sys\n\n\ndef main():\n",
    "class Stack:\n    def __init__(self):\n",
    "def fibonacci(n):\n",
    '"""Utilities for parsing command line arguments."""\n\nimport re\n',
    "    def __repr__(self):\n        return",
    "for i in range(len(items)):\n",
    "try:\n    import _thread\nexcept ImportError:\n",
    "def read_config(path):\n    with open(path) as f:\n",
]


def measure_acceptance(target, asst, prompts: list[list[int]], n_new: int, k: int) -> dict:
    """Greedy acceptance of ``asst`` drafting ``k`` tokens per round for ``target``'s greedy continuations of
    ``prompts`` (``n_new`` tokens each, no stop tokens). ``per_position[j]``: the share of rounds whose draft j+1
    was accepted."""
    res = Engine(target, asst).generate(prompts, max_new_tokens=n_new, num_speculative_tokens=k, stop_token_ids=[])
    st = res.stats
    return {
        "k": k,
        "rounds": st.draft_rounds,
        "accepted": st.accepted,
        "drafted": st.drafted,
        "mean_accepted": round(st.accepted / max(1, st.draft_rounds), 3),
        "mean_acceptance_length": round(st.mean_acceptance_length, 3),
        "acceptance_rate": round(st.acceptance_rate, 3),
        "per_position": [round(r, 3) for r in st.per_position_acceptance],
    }


def time_plain_vs_speculative(target, asst, prompts: list[list[int]], n_new: int, k: int) -> dict:
    """Wall-clock time of plain and of speculative decoding, prompt by prompt on one engine after a warm-up
    (noisy on a shared machine), and whether both emitted the same tokens."""
    eng = Engine(target, asst)
    for _ in range(2):  # warm-up of every shape
        eng.generate(prompts[:1], max_new_tokens=16, num_speculative_tokens=k)
        eng.generate(prompts[:1], max_new_tokens=16, use_assistant=False)
    plain, spec = [], []
    for p in prompts:
        plain.append(eng.generate([p], max_new_tokens=n_new, use_assistant=False, stop_token_ids=[]))
        spec.append(eng.generate([p], max_new_tokens=n_new, num_speculative_tokens=k, stop_token_ids=[]))
    out = {
        "k": k,
        "identical_to_plain": all(a.tokens == b.tokens for a, b in zip(plain, spec)),
        "plain_s": round(sum(r.stats.elapsed_s for r in plain), 3),
        "spec_s": round(sum(r.stats.elapsed_s for r in spec), 3),
    }
    out["speedup"] = round(out["plain_s"] / out["spec_s"], 3)
    return out


def cmd_accept(args) -> None:
    """Print the pair's greedy acceptance on :data:`DEFAULT_PROMPTS` (and, with ``--engine``, its timing)."""
    setup_torch(args)
    dt = torch.bfloat16 if args.dtype.startswith("bf16") else torch.float32
    target = load_target(args.target, dt)
    asst = load_assistant_dir(args.assistant, dt)
    tok = load_tokenizer(args.target)
    prompts = [tok.encode(p).ids for p in DEFAULT_PROMPTS]
    print(json.dumps({"acceptance": measure_acceptance(target, asst, prompts, args.new_tokens, args.k)}))
    if args.engine:
        print(json.dumps({"timing": time_plain_vs_speculative(target, asst, prompts, args.new_tokens, args.k)}))
