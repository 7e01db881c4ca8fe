"""Train the default model pair: a small Gemma 4 target and its MTP assistant, on CPU, in about an hour.

Sub-commands (``python -m minimtp.train <cmd> --help``), one module each::

    tokenizer  train the byte-level BPE on the CPython standard library (also done by ``target``)   tokenizer
    target     pre-train a small ``gemma4_text`` model from scratch (resumable, checkpoints)          pretrain
    assistant  distil a ``gemma4_assistant`` drafter against the frozen target                        distill
    selfgen    the frozen target's own continuations of corpus prompts (distillation data)            selfgen
    export     write a Hugging Face directory (config.json, model.safetensors, ...) from a checkpoint  export
    accept     greedy acceptance of a target/assistant pair, measured by minimtp's engine             evaluate
    bench      1-token vs k-token forward latency of a target shape (and an assistant step)           latency
    report     redraw the loss curves (PNG) of a run                                                  report

The corpus and its validation split are in :mod:`minimtp.train.corpus`, the token streams and batches in
:mod:`minimtp.train.data`, the model configs in :mod:`minimtp.train.configs`, checkpoints and Hugging Face exports
in :mod:`minimtp.train.checkpoints`, the optimisation loop in :mod:`minimtp.train.loop`, the flags in
:mod:`minimtp.train.cli` (docs: guides/training).

Everything long runs in the background and resumes: a run directory holds ``ckpt/`` (fp32 weights as safetensors,
optimizer state, step), ``log.jsonl`` and, at the end, ``final/`` (the Hugging Face directory) and ``report.png``.
"""

from minimtp.model import load_target
from minimtp.train.checkpoints import (
    export_assistant,
    export_target,
    load_assistant_dir,
    load_checkpoint,
    save_checkpoint,
)
from minimtp.train.cli import main
from minimtp.train.configs import (
    assistant_config_dict,
    count_params,
    init_weights,
    layer_pattern,
    parse_assistant_dict,
    target_config_dict,
)
from minimtp.train.corpus import BOS, EOS, EOT, PAD, SOT, SPECIAL_TOKENS, chat_examples, read_corpus
from minimtp.train.data import Batches, prepare_data
from minimtp.train.distill import distill_loss
from minimtp.train.evaluate import DEFAULT_PROMPTS, measure_acceptance
from minimtp.train.pretrain import lm_loss
from minimtp.train.report import plot_report
from minimtp.train.tokenizer import CHAT_TEMPLATE, load_tokenizer, train_tokenizer

__all__ = [
    "main",
    "PAD",
    "EOS",
    "BOS",
    "SOT",
    "EOT",
    "SPECIAL_TOKENS",
    "CHAT_TEMPLATE",
    "read_corpus",
    "chat_examples",
    "train_tokenizer",
    "load_tokenizer",
    "prepare_data",
    "Batches",
    "layer_pattern",
    "target_config_dict",
    "assistant_config_dict",
    "parse_assistant_dict",
    "init_weights",
    "count_params",
    "save_checkpoint",
    "load_checkpoint",
    "export_target",
    "export_assistant",
    "load_target",
    "load_assistant_dir",
    "lm_loss",
    "distill_loss",
    "measure_acceptance",
    "DEFAULT_PROMPTS",
    "plot_report",
]
