"""The training corpus: the running interpreter's standard library, a validation split, and chat examples.

The ``.py`` files of ``sysconfig.get_paths()['stdlib']`` without test folders (PSF-2.0). The Python version and a
SHA-256 of the sorted file list are recorded, because the content depends on the interpreter. About 2 % of the
files (chosen by a hash of their path) are held out for validation. The "chat" stream: for every documented
function, the first line of its docstring as a user request and the function's source as the model's answer.
"""

from __future__ import annotations

import ast
import hashlib
import os
import sys
import sysconfig
import textwrap

PAD, EOS, BOS, SOT, EOT = 0, 1, 2, 3, 4
SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"]
TEST_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__"}


def stdlib_files(root: str | None = None) -> tuple[str, list[str]]:
    """(stdlib root, sorted relative paths of its ``.py`` files outside test folders and site-packages)."""
    root = root or sysconfig.get_paths()["stdlib"]
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in TEST_DIRS)
        for name in filenames:
            if name.endswith(".py"):
                out.append(os.path.relpath(os.path.join(dirpath, name), root))
    return root, sorted(out)


def is_validation(relpath: str) -> bool:
    """Whether a file is held out: one in 50, by a hash of its relative path."""
    return int(hashlib.sha1(relpath.encode()).hexdigest(), 16) % 50 == 0


def read_corpus(root: str | None = None, max_files: int | None = None) -> tuple[dict, list[str], list[str]]:
    """(info, train texts, validation texts). ``info`` records the interpreter and a hash of the file list."""
    root, files = stdlib_files(root)
    if max_files:
        files = files[:max_files]
    train, val, n_bytes = [], [], 0
    for rel in files:
        with open(os.path.join(root, rel), encoding="utf-8", errors="replace") as f:
            text = f.read()
        n_bytes += len(text.encode())
        (val if is_validation(rel) else train).append(text)
    if not val and len(train) > 1:  # a small subset (tests) may contain no held-out file
        val.append(train.pop())
    info = {
        "source": "CPython standard library (.py, without test/, tests/, idle_test/), PSF-2.0",
        "python_version": sys.version.split()[0],
        "stdlib": root,
        "n_files": len(files),
        "n_validation_files": len(val),
        "n_bytes": n_bytes,
        "file_list_sha256": hashlib.sha256("\n".join(files).encode()).hexdigest(),
    }
    return info, train, val


def chat_examples(texts: list[str], max_chars: int = 1600) -> list[str]:
    """Documented functions as single-turn chats: the docstring's first line → the function's source."""
    out = []
    for text in texts:
        try:
            tree = ast.parse(text)
        except (SyntaxError, ValueError):
            continue
        lines = text.splitlines()
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            doc = ast.get_docstring(node)
            first = min([node.lineno] + [d.lineno for d in node.decorator_list])
            src = "\n".join(lines[first - 1 : node.end_lineno])
            if not doc or not src or len(src) > max_chars or node.name.startswith("__"):
                continue
            request = doc.strip().splitlines()[0].strip()
            if len(request) < 12:
                continue
            code = textwrap.dedent(src).strip()
            out.append(
                f"<start_of_turn>user\nWrite a Python function `{node.name}`: {request}<end_of_turn>\n"
                f"<start_of_turn>model\n```python\n{code}\n```<end_of_turn>\n"
            )
    return out
