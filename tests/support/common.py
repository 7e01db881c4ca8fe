"""What many test files share: the embedded default model pair and the one-line error check.

The pair ships inside the package (``minimtp/default_model/``, package data), so a missing file is a broken
install, never a reason to skip: conftest.py stops the session (``missing_default_model``).
"""

from __future__ import annotations

import functools
import os

import minimtp
from minimtp.flags import DEFAULT_DIR
from minimtp.tokenizer import load_tokenizer

TARGET_DIR = os.path.join(DEFAULT_DIR, "target")
ASSISTANT_DIR = os.path.join(DEFAULT_DIR, "assistant")
REQUIRED = [os.path.join(TARGET_DIR, name) for name in ("config.json", "model.safetensors", "tokenizer.json")] + [
    os.path.join(ASSISTANT_DIR, name) for name in ("config.json", "model.safetensors")
]


def missing_default_model() -> list[str]:
    """The files of the embedded pair that are not there (empty for a sound install)."""
    return [path for path in REQUIRED if not os.path.isfile(path)]


@functools.cache
def default_pair(dtype: str = "float32") -> tuple:
    """(target, assistant, tokenizer) of the embedded pair, both models in ``dtype``, loaded once per process.
    Shared by every caller: build engines on them, never modify them."""
    target = minimtp.load_target(TARGET_DIR, dtype=dtype)
    assistant = minimtp.load_assistant(ASSISTANT_DIR, target, dtype=dtype)
    return target, assistant, load_tokenizer(TARGET_DIR)


def default_engine(**kw) -> minimtp.Engine:
    """A new reference :class:`minimtp.Engine` on the shared float32 default pair, with its tokenizer; ``kw``
    (block size, draft mode, ...) go to the Engine."""
    target, assistant, tokenizer = default_pair()
    return minimtp.Engine(target, assistant, tokenizer=tokenizer, **kw)


def one_line_error(excinfo, *needles: str) -> str:
    """The message of the error ``pytest.raises`` caught (``excinfo``) is one non-empty line containing every
    needle; returns it."""
    msg = str(excinfo.value)
    assert msg and "\n" not in msg, msg
    for needle in needles:
        assert needle in msg, (needle, msg)
    return msg
