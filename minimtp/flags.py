"""The flags `python -m minimtp.generate` and `python -m minimtp.serve` share, and what they load.

The model pair (``--model``, ``--assistant``, ``--no-assistant``; neither: the embedded default pair in
``minimtp/default_model``), its dtypes, the engine (the CPU fast path unless ``--reference``) and its backends,
and the sampling defaults a checkpoint's ``generation_config.json`` gives (``--generation-config``).
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from minimtp.assistant import load_assistant
from minimtp.engine import Engine
from minimtp.errors import ConfigError, GenerationError
from minimtp.fast import FastEngine
from minimtp.model import load_target

DEFAULT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "default_model")
SAMPLING_KEYS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty")


def add_pair_flags(p: argparse.ArgumentParser) -> None:
    """The model-pair, engine and generation-config flags."""
    p.add_argument("--model", help="local Gemma 4 checkpoint directory (default: the embedded model)")
    p.add_argument("--assistant", help="local Gemma 4 assistant directory (default: the embedded assistant)")
    p.add_argument("--no-assistant", action="store_true", help="plain decoding, no speculation")
    p.add_argument(
        "--num-speculative-tokens",
        "-k",
        type=int,
        default=None,
        help="drafts per round (default: the assistant's num_assistant_tokens, else 6)",
    )
    p.add_argument("--dtype", default="auto", help="float32 | bfloat16 | float16 | auto (the checkpoint's dtype)")
    p.add_argument(
        "--draft-dtype",
        default="auto",
        help="assistant dtype: float32 | bfloat16 | float16 | int8 (weight-only, a fast-path twin) | auto (int8 on "
        "CPU for a 16-bit target, else the target's dtype; the target's dtype with --reference)",
    )
    p.add_argument(
        "--reference",
        action="store_true",
        help="run the pure PyTorch reference (minimtp.Engine) instead of the CPU fast path (minimtp.fast.FastEngine)",
    )
    p.add_argument("--draft-mode", choices=["argmax", "sample"], default="argmax")
    p.add_argument("--attention", choices=["torch", "triton"], default="torch", help="paged-attention backend")
    p.add_argument("--verifier", choices=["torch", "triton"], default="torch", help="verification backend")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument(
        "--generation-config",
        default="minimtp",
        help="auto: sampling defaults from the model's generation_config.json (flags still win); a directory: from "
        "its generation_config.json; minimtp (default): greedy unless flags say otherwise",
    )


def pair_dirs(args) -> tuple[str, str | None]:
    """(target directory, assistant directory or None) the flags name, checked to exist."""
    model_dir = args.model or os.path.join(DEFAULT_DIR, "target")
    asst_dir = None
    if not args.no_assistant:
        asst_dir = args.assistant or (None if args.model else os.path.join(DEFAULT_DIR, "assistant"))
    if args.model is None and not os.path.isdir(model_dir):
        raise ConfigError(f"{model_dir}: the embedded default model is missing from this install; pass --model DIR")
    for d, what in ((model_dir, "model"), (asst_dir, "assistant")):
        if d is not None and not os.path.isdir(d):
            raise ConfigError(f"{d}: no such {what} directory")
    return model_dir, asst_dir


def checkpoint_dtype(model_dir: str) -> str:
    """The dtype ``config.json`` records (float32 if it records none we run)."""
    try:
        with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, ValueError):
        return "float32"
    dt = cfg.get("dtype") or cfg.get("torch_dtype") or (cfg.get("text_config") or {}).get("dtype")
    return dt if dt in ("float32", "bfloat16", "float16") else "float32"


def draft_dtype(arg: str, target, reference: bool = False) -> str | None:
    """The assistant's dtype. ``auto``: weight-only ``int8`` on CPU when the target runs in 16 bits, else the target's
    dtype (None). A draft step is a chain of one-row matmuls that stream every drafter weight once, so on a CPU its
    cost follows the bytes of the weights: int8 halves them (measured: docs/benchmarks.md). The drafter only
    proposes; the target's distribution is untouched (docs: concepts/speculative-decoding). int8 is a fast-path
    twin (``minimtp.fast``): the reference drafts in a float dtype."""
    if arg == "int8" and reference:
        raise GenerationError(
            "--draft-dtype int8 needs the fast path: drop --reference, or pick float32/bfloat16/float16"
        )
    if arg != "auto":
        return arg
    w = target.model.embed_tokens.weight
    fast_cpu = not reference and w.device.type == "cpu"
    return "int8" if (fast_cpu and w.dtype in (torch.bfloat16, torch.float16)) else None


def load_pair(model_dir: str, asst_dir: str | None, args, tokenizer=None):
    """(target, assistant or None, engine) as the flags ask: ``--dtype``, ``--draft-dtype``, ``--reference``,
    ``--attention``, ``--verifier``, ``--draft-mode``; the engine gets ``tokenizer``."""
    dtype = checkpoint_dtype(model_dir) if args.dtype == "auto" else args.dtype
    target = load_target(model_dir, dtype=dtype)
    want = draft_dtype(args.draft_dtype, target, args.reference)
    assistant = None
    if asst_dir:  # an int8 drafter is quantized from its bfloat16 weights by the fast path
        assistant = load_assistant(asst_dir, target, dtype="bfloat16" if want == "int8" else want)
    kw = dict(
        attention_backend=args.attention,
        verify_backend=getattr(args, "verifier", "torch"),
        draft_mode=getattr(args, "draft_mode", "argmax"),
        tokenizer=tokenizer,
    )
    if args.reference:
        return target, assistant, Engine(target, assistant, **kw)
    return target, assistant, FastEngine(target, assistant, draft_dtype="int8" if want == "int8" else None, **kw)


def sampling_settings(args, model_dir: str) -> tuple[dict, str]:
    """The sampling settings (GenerationSettings fields) and a line saying where they came from: the flags, else
    (with ``--generation-config auto`` or DIR) the model's ``generation_config.json`` (transformers' keys; vLLM's
    flag), else greedy. ``do_sample: false`` there means greedy, as in transformers."""
    given = {k: getattr(args, k) for k in SAMPLING_KEYS if getattr(args, k, None) is not None}
    found: dict = {}
    if args.generation_config != "minimtp":
        d = model_dir if args.generation_config == "auto" else args.generation_config
        path = os.path.join(d, "generation_config.json")
        try:
            with open(path, encoding="utf-8") as f:
                gc = json.load(f)
        except FileNotFoundError:
            gc = {} if args.generation_config == "auto" else None
        except (OSError, ValueError) as e:
            raise ConfigError(f"{path}: cannot read the generation config ({e})") from None
        if gc is None:
            raise ConfigError(f"{path}: no such file (--generation-config takes auto, minimtp or a directory)")
        found = {k: gc[k] for k in SAMPLING_KEYS if gc.get(k) is not None}
        used = ", ".join(found)
        if gc.get("do_sample") is True and "temperature" not in found:  # transformers' default temperature
            used = ", ".join(["do_sample=true", *found])
            found = {"temperature": 1.0, **found}
        if gc.get("do_sample") is False:
            found = {"temperature": 0.0}
            used = "do_sample=false"
    settings = {**found, **given}
    shown = ", ".join(f"{k}={v}" for k, v in settings.items() if k != "temperature" or v) or "greedy"
    if settings.get("temperature", 0) == 0 and shown != "greedy":
        shown = "greedy, " + shown
    src = [f"{used} from generation_config.json"] if found else []
    src += ["flags"] if given else []
    return settings, f"[settings: {shown} ({'; '.join(src) or 'defaults'})]"
