"""``bench``: the 1-token against the k-token forward latency of a target shape (and an assistant step), with
random weights, in bf16 and fp32; the timing is :func:`minimtp.bench.timing.target_forward_ms` and
:func:`minimtp.bench.timing.assistant_step_ms` (the engine's paged cache and attention)."""

from __future__ import annotations

import argparse
import json

import torch

from minimtp.assistant import Gemma4Assistant
from minimtp.bench.timing import assistant_step_ms, target_forward_ms
from minimtp.config import parse_text_config
from minimtp.model import Gemma4
from minimtp.train.configs import (
    assistant_config_dict,
    count_params,
    init_weights,
    parse_assistant_dict,
    target_config_dict,
)


def _random_model(model: torch.nn.Module, dtype) -> torch.nn.Module:
    """``model`` with the training initialisation (seed 0), in ``dtype``, for inference."""
    torch.manual_seed(0)
    init_weights(model)
    return model.to(dtype).eval().requires_grad_(False)


def cmd_bench(args) -> None:
    """Print the latencies (ms) of k = 1, 2, 3, 5 token forwards after ``--past`` tokens, their ratios to k = 1,
    and with ``--assistant-layers`` the step of an assistant of that shape."""
    torch.set_flush_denormal(True)
    torch.set_num_threads(args.threads or 1)
    cfg = parse_text_config(target_config_dict(args))
    out = {"params_M": round(count_params(Gemma4(cfg)) / 1e6, 2), "threads": torch.get_num_threads(), "past": args.past}
    for name, dt in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        target = _random_model(Gemma4(cfg), dt)
        r = target_forward_ms(target, args.past)
        out[name] = {f"k{k}_ms": round(v, 3) for k, v in r.items()}
        out[name].update({f"k{k}_ratio": round(v / r[1], 3) for k, v in r.items() if k != 1})
        if args.assistant_layers:
            a = argparse.Namespace(
                hidden=args.assistant_hidden,
                intermediate=4 * args.assistant_hidden,
                layers=args.assistant_layers,
                pattern="s" * (args.assistant_layers - 1) + "f",
                heads=args.assistant_heads,
            )
            acfg = parse_assistant_dict(assistant_config_dict(a, cfg))
            asst = _random_model(Gemma4Assistant(acfg), dt)
            out[name]["assistant_step_ms"] = round(assistant_step_ms(target, asst, args.past), 3)
    print(json.dumps(out))
