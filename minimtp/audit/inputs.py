"""What every audit subcommand reads: the model pair, the prompts and the sampling settings.

The pair is the flags' (``--model``, ``--assistant``; neither: the embedded default pair, as ``minimtp.flags``
resolves it), loaded with the reference loaders in float32 unless ``--dtype`` says otherwise: the oracle runs the
plain math. A prompts file is JSON (a list of strings or of token-id lists), JSON lines (a string, a list of ids,
or an object with ``"prompt"`` or ``"prompt_ids"`` per line), or plain text (one prompt per non-empty line).
"""

from __future__ import annotations

import argparse
import json
import os

from minimtp.assistant import load_assistant
from minimtp.errors import ConfigError
from minimtp.flags import pair_dirs
from minimtp.model import load_target
from minimtp.sampling import SamplingParams
from minimtp.tokenizer import load_tokenizer

# Python prompts like the embedded pair's training text (the CPython standard library)
DEFAULT_PROMPTS = [
    "def fibonacci(n):\n    ",
    "import os\n\n\ndef read_lines(path):\n",
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):\n",
    "for i in range(10):\n    print(i)\n\n",
    "def parse(line):\n    key, value = line.split('=')\n    return key.strip(), value.strip()\n\n\ndef load(path):\n",
    "import json\nimport sys\n\n\nclass Config:\n    def __init__(self, path):\n        self.path = path\n",
    '"""Utilities for working with files."""\n\nimport os\nimport shutil\n\n\ndef copy_tree(src, dst):\n',
    "def main(argv=None):\n    parser = argparse.ArgumentParser()\n",
]


def add_pair_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="local Gemma 4 checkpoint directory (default: the embedded model)")
    p.add_argument("--assistant", help="local assistant directory (default: the embedded assistant)")
    p.add_argument("--dtype", default="float32", help="float32 (default) | bfloat16 | float16: the oracle's dtype")


def add_sampling_flags(p: argparse.ArgumentParser, temperature: float = 1.0) -> None:
    p.add_argument("--temperature", type=float, default=temperature, help=f"0 = greedy (default {temperature})")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--min-p", type=float, default=None)


def sampling_params(args) -> SamplingParams:
    return SamplingParams(args.temperature, args.top_k, args.top_p, args.min_p).validate()


def load_models(args, need_assistant: bool = True):
    """(target, assistant or None, tokenizer) as the flags name them; the assistant is checked against the target."""
    ns = argparse.Namespace(model=args.model, assistant=args.assistant, no_assistant=not need_assistant)
    model_dir, asst_dir = pair_dirs(ns)
    if need_assistant and asst_dir is None:
        raise ConfigError(f"{model_dir}: pass --assistant DIR (the audit needs the drafter beside --model)")
    target = load_target(model_dir, dtype=args.dtype)
    assistant = load_assistant(asst_dir, target) if asst_dir else None
    return target, assistant, load_tokenizer(model_dir)


def read_prompts(path: str | None) -> list:
    """The prompts of ``path`` (strings or token-id lists), or DEFAULT_PROMPTS when ``path`` is None."""
    if path is None:
        return list(DEFAULT_PROMPTS)
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: no such prompts file")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if path.endswith(".json"):
        try:
            items = json.loads(text)
        except ValueError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(items, list):
            raise ConfigError(f"{path}: expected a JSON list of prompts")
    elif path.endswith(".jsonl"):
        items = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                items.append(json.loads(line))
            except ValueError as e:
                raise ConfigError(f"{path}:{n}: not valid JSON ({e})") from None
    else:
        items = [line for line in text.splitlines() if line.strip()]
    prompts = [_prompt(x, f"{path}: prompt {i}") for i, x in enumerate(items)]
    if not prompts:
        raise ConfigError(f"{path}: no prompts")
    return prompts


def _prompt(x, where: str):
    if isinstance(x, dict):
        x = x.get("prompt_ids", x.get("prompt"))
    if isinstance(x, str) and x:
        return x
    if isinstance(x, list) and x and all(isinstance(t, int) and not isinstance(t, bool) for t in x):
        return x
    raise ConfigError(f"{where}: expected a non-empty string or list of token ids")


def prompt_ids(prompts: list, tokenizer) -> list[list[int]]:
    """Token ids of each prompt: a string through the tokenizer (as a server tokenizes a completion prompt)."""
    out = []
    for p in prompts:
        if isinstance(p, str) and tokenizer is None:
            raise ConfigError("text prompts need the checkpoint's tokenizer (tokenizer.json): pass token ids")
        ids = list(tokenizer(p)["input_ids"]) if isinstance(p, str) else list(p)
        if not ids:
            raise ConfigError(f"prompt {p!r} has no tokens")
        out.append(ids)
    return out
