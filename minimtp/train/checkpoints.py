"""Resumable training checkpoints, and the Hugging Face directories a run exports."""

from __future__ import annotations

import json
import os
import shutil

import torch
from safetensors.torch import load_file, save_file

from minimtp.assistant import Gemma4Assistant, read_assistant
from minimtp.model import Gemma4
from minimtp.train.corpus import BOS, EOS, EOT, PAD


def save_checkpoint(run_dir: str, model, opt, step: int, extra: dict) -> None:
    """fp32 weights (safetensors) + optimizer state (torch.save; own resume files only) + step, atomically."""
    final = os.path.join(run_dir, "ckpt")
    tmp = final + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    weights = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(weights, os.path.join(tmp, "model.safetensors"))
    torch.save(opt.state_dict(), os.path.join(tmp, "optim.pt"))
    with open(os.path.join(tmp, "state.json"), "w") as f:
        json.dump(dict(extra, step=step), f, indent=2)
    old = final + ".old"
    shutil.rmtree(old, ignore_errors=True)
    if os.path.isdir(final):
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(run_dir: str, model, opt=None) -> dict:
    """Load ``run_dir/ckpt`` into ``model`` (and ``opt``); returns its ``state.json`` (step, kind, config)."""
    ck = os.path.join(run_dir, "ckpt")
    model.load_state_dict(load_file(os.path.join(ck, "model.safetensors")), strict=True)
    if opt is not None:
        opt.load_state_dict(torch.load(os.path.join(ck, "optim.pt"), weights_only=True))
    with open(os.path.join(ck, "state.json")) as f:
        return json.load(f)


def _write_json(path: str, d: dict) -> None:
    with open(path, "w") as f:
        json.dump(d, f, indent=2, sort_keys=True)
        f.write("\n")


def _shipped_state(model) -> dict:
    sd = model.state_dict()
    return {k: (v.to(torch.bfloat16) if v.is_floating_point() else v).contiguous() for k, v in sd.items()}


def export_target(model: Gemma4, config_dict: dict, tok_dir: str, dest: str, info: dict | None = None) -> None:
    """A Hugging Face ``Gemma4ForCausalLM`` directory: config, bf16 safetensors (tied head omitted), generation
    config (eos = ``<eos>``, ``<end_of_turn>``), tokenizer."""
    os.makedirs(dest, exist_ok=True)
    save_file(_shipped_state(model), os.path.join(dest, "model.safetensors"), metadata={"format": "pt"})
    _write_json(os.path.join(dest, "config.json"), dict(config_dict, architectures=["Gemma4ForCausalLM"]))
    gen = {"bos_token_id": BOS, "eos_token_id": [EOS, EOT], "pad_token_id": PAD, "do_sample": False}
    _write_json(os.path.join(dest, "generation_config.json"), gen)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(tok_dir, name), os.path.join(dest, name))
    if info:
        _write_json(os.path.join(dest, "training_info.json"), info)


def export_assistant(model: Gemma4Assistant, config_dict: dict, dest: str, k: int, info: dict | None = None):
    """A Hugging Face ``Gemma4AssistantForCausalLM`` directory: config, bf16 safetensors, generation config with
    ``num_assistant_tokens = k``."""
    os.makedirs(dest, exist_ok=True)
    save_file(_shipped_state(model), os.path.join(dest, "model.safetensors"), metadata={"format": "pt"})
    _write_json(os.path.join(dest, "config.json"), dict(config_dict, architectures=["Gemma4AssistantForCausalLM"]))
    gen = {"bos_token_id": BOS, "eos_token_id": [EOS, EOT], "pad_token_id": PAD, "num_assistant_tokens": k}
    _write_json(os.path.join(dest, "generation_config.json"), gen)
    if info:
        _write_json(os.path.join(dest, "training_info.json"), info)


def load_assistant_dir(path: str, dtype=torch.float32) -> Gemma4Assistant:
    """An assistant directory loaded without a target to validate it against."""
    return read_assistant(path, dtype)
