"""``export``: a Hugging Face directory from the latest checkpoint of a run, even one that is still training."""

from __future__ import annotations

import argparse
import json
import os

from minimtp.assistant import Gemma4Assistant
from minimtp.config import parse_text_config
from minimtp.model import Gemma4
from minimtp.train.checkpoints import export_assistant, export_target, load_checkpoint
from minimtp.train.configs import parse_assistant_dict
from minimtp.train.distill import assistant_info
from minimtp.train.pretrain import target_info


def cmd_export(args) -> None:
    """Export a run's latest checkpoint (target or assistant) to ``--to``."""
    with open(os.path.join(args.out, "ckpt", "state.json")) as f:
        state = json.load(f)
    with open(os.path.join(args.out, "args.json")) as f:
        run_args = argparse.Namespace(**json.load(f))
    if state["kind"] == "target":
        model = Gemma4(parse_text_config(state["config"]))
        load_checkpoint(args.out, model)
        info = target_info(args.out, run_args, model, state["data"])
        export_target(model, state["config"], os.path.join(args.out, "tokenizer"), args.to, info)
    else:
        model = Gemma4Assistant(parse_assistant_dict(state["config"]))
        load_checkpoint(args.out, model)
        info = assistant_info(args.out, run_args, model, state["step"])
        export_assistant(model, state["config"], args.to, run_args.draft_tokens, info)
    print(f"step {state['step']} -> {args.to}")
