"""The tokenizer of a local model directory: its ``tokenizer.json`` (and chat template) through transformers'
``AutoTokenizer``, never downloaded. Token ids alone need none; stop strings, grammars, token healing and text
do (``Engine(tokenizer=)``)."""

from __future__ import annotations

import os

from minimtp.errors import ConfigError


def load_tokenizer(model_dir: str):
    """``AutoTokenizer.from_pretrained(model_dir)`` offline; a one-line :class:`ConfigError` if it cannot load."""
    if not os.path.isfile(os.path.join(model_dir, "tokenizer.json")):
        raise ConfigError(f"{model_dir}: no tokenizer.json (the tokenizer is read from the model directory)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer  # transformers is slow to import; only a tokenizer needs it

    try:
        return AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except Exception as e:  # transformers raises many types; report one line
        msg = str(e).splitlines()[0] if str(e) else ""
        raise ConfigError(f"{model_dir}: cannot load the tokenizer ({type(e).__name__}: {msg})") from None
