"""Grading the library's holes: a filled library file (``grading/holes.py``: ``LIBRARY_FILE``) seen through the
assignment's API, so that the same tests grade a ``student.py`` and the student's own ``minimtp``.

* ``spec_sampling``: ``verify`` is the file's (``minimtp.speculative.verify``); drafting is the engine's rule, not a
  hole, so the two tests of ``propose`` are left out and the others count for the 80 points.
* ``kv_rollback``: ``PagedKV`` is one sliding-window layer of the file's ``KVCache``: ``append`` is ``reserve``
  (then the K/V written through ``slot_mapping`` / ``write``, as the model writes them), ``rollback`` is
  ``truncate``, ``trim(seq, keep)`` is ``trim_window(seq, length)`` with ``keep`` positions kept.
* ``paged_attention_kernel``: the file's ``paged_attention`` wrapper launches the file's kernel.
* ``distil_drafter``: ``distill_loss(target, drafter, x, teach, k)`` is the file's ``distill_loss(target, drafter,
  x, k, dtype="fp32")[0]``; ``teacher`` and ``train`` are the starter file's given ones.

The integrity gate of this mode (``check_library_file``) reads the file's syntax tree: a top-level import outside
the file's own (``holes.LIBRARY_IMPORTS``), or any import, exec or eval inside a hole, fails it.
"""

from __future__ import annotations

import ast
import os
import types

import torch

from . import holes
from .core import Failure, check
from .integrity import _DYNAMIC, _Imports

LIBRARY_SHORTCUT = "library shortcut"


def is_library_file(assignment: str, source: str) -> bool:
    """Whether ``source`` is the assignment's library file (it defines every hole, and not every function of the
    starter file) rather than a starter-style file."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return False
    names = set(holes._function_nodes(tree, {h.name for h in holes.graded(assignment)}))
    if names != {h.name for h in holes.graded(assignment)}:
        return False
    from .originality import ADIR, STUDENT_FUNCTIONS
    from .similarity import functions

    starter = ADIR / assignment / "student.py"
    given = [q for q, _, _ in functions(starter.read_text(encoding="utf-8"))] if starter.is_file() else []
    given = given or STUDENT_FUNCTIONS[assignment]
    return not set(given) <= {q for q, _, _ in functions(source)}  # a starter-style file defines all of them


def check_library_file(assignment: str, mod) -> None:
    """The gate of a library file: its top-level imports are the library's own, and the holes import nothing, call
    no dynamic import, exec or eval."""
    tree = ast.parse(mod.__source__)
    allowed = holes.LIBRARY_IMPORTS[assignment]
    for node in tree.body:
        if isinstance(node, ast.Import):
            mods = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            mods = [("." * node.level) + (node.module or "")]
        else:
            continue
        for m in mods:
            check(
                m in allowed,
                LIBRARY_SHORTCUT,
                f"line {node.lineno}: imports {m}, which "
                f"{holes.LIBRARY_FILE[assignment]} does not import (its imports: {', '.join(sorted(allowed))})",
            )
    imp = _Imports(tree)
    nodes = holes._function_nodes(tree, {h.name for h in holes.graded(assignment)})
    for name, fn in nodes.items():
        for node in ast.walk(fn):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                raise Failure(
                    LIBRARY_SHORTCUT,
                    f"line {node.lineno}: an import inside {name} (the hole): write "
                    "the answer with what the file already imports",
                )
            if isinstance(node, ast.Call):
                f = imp.resolve(node.func) or ""
                bare = isinstance(node.func, ast.Name) and f in ("exec", "eval", "compile", "__import__")
                if bare or f.split(".")[-1] in _DYNAMIC:
                    raise Failure(
                        LIBRARY_SHORTCUT,
                        f"line {node.lineno}: {f}(...) inside {name}: dynamic imports, exec and eval are not allowed",
                    )


def installed_file(assignment: str) -> str:
    """The library file of the installed minimtp (what ``python -m minimtp.generate`` runs)."""
    import importlib.util

    name = holes.LIBRARY_FILE[assignment][: -len(".py")].replace("/", ".")
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.origin:
        raise FileNotFoundError(f"no module {name} is installed")
    return os.path.abspath(spec.origin)


# ------------------------------------------------------------------------------------------------ the adapters


def _paged_kv(KVCache):
    from minimtp.config import SLIDING

    class PagedKV:
        """One sliding-window layer of the library's KVCache, with the kv_rollback starter file's API."""

        def __init__(self, num_blocks: int, block_size: int, dim: int):
            # the fields of a TextConfig the cache reads: one sliding-window layer, one KV head of ``dim``
            cfg = types.SimpleNamespace(layer_types=(SLIDING,), kv_modes=("store",), kv_heads=(1,), head_dims=(dim,),
                                        sliding_window=0)  # fmt: skip
            self.cache = KVCache(cfg, {SLIDING: num_blocks}, block_size, sliding_keep=0)
            self.block_size = block_size

        @property
        def k(self) -> torch.Tensor:
            return self.cache.k[0][:, :, 0]

        @property
        def v(self) -> torch.Tensor:
            return self.cache.v[0][:, :, 0]

        @property
        def tables(self) -> dict:
            return {s: t[SLIDING] for s, t in self.cache.tables.items()}

        @property
        def lengths(self) -> dict:
            return self.cache.lengths

        @property
        def free(self) -> list:
            return self.cache.free_blocks[SLIDING]

        def add(self, seq: int) -> None:
            self.cache.add(seq)

        def release(self, seq: int) -> None:
            self.cache.release(seq)

        def gather(self, seq: int, start: int = 0):
            pos = range(start, self.lengths[seq])
            ids = self.tables[seq]
            k = [self.k[ids[i // self.block_size], i % self.block_size] for i in pos]
            v = [self.v[ids[i // self.block_size], i % self.block_size] for i in pos]
            dim = self.k.shape[-1]
            return (torch.stack(k) if k else torch.zeros(0, dim)), (torch.stack(v) if v else torch.zeros(0, dim))

        def append(self, seq: int, k: torch.Tensor, v: torch.Tensor) -> None:
            n = self.cache.lengths[seq]
            self.cache.reserve(seq, n + k.shape[0])  # raises CacheFullError, changing nothing, when it cannot
            slots = self.cache.slot_mapping([seq], [n], [k.shape[0]])[SLIDING]
            self.cache.write(0, slots, k[:, None], v[:, None])

        def rollback(self, seq: int, n: int) -> None:
            self.cache.truncate(seq, n)

        def trim(self, seq: int, keep: int) -> None:
            self.cache.keep = keep
            self.cache.trim_window(seq, self.cache.lengths[seq])

    return PagedKV


def _propose(draft_logits, params, mode, noise):
    """The engine's drafting rule (``Engine._draft`` in minimtp/engine.py, shipped whole in the release): not a hole,
    so library mode does not grade it; the verification tests draft with it."""
    from minimtp.sampling import process_logits, sample

    if mode != "sample":
        return torch.argmax(draft_logits, dim=-1), None
    processed = process_logits(draft_logits, params)
    return sample(processed, noise), processed


def adapt(assignment: str, mod) -> types.ModuleType:
    """The assignment's API over the library module ``mod`` (its source stays ``__source__``, for the gate)."""
    api = types.ModuleType(mod.__name__ + "_api")
    api.__source__ = mod.__source__
    api.__file__ = getattr(mod, "__file__", "")
    api.library = mod
    if assignment == "spec_sampling":
        api.verify = mod.verify
        api.propose = _propose
    elif assignment == "kv_rollback":
        api.PagedKV = _paged_kv(mod.KVCache)
    elif assignment == "paged_attention_kernel":
        api.paged_attention = mod.paged_attention
    elif assignment == "distil_drafter":
        from .distil_drafter import _given_train

        @torch.no_grad()
        def teacher(target, x):
            logits, hidden, kv = target.forward_with_kv(x)
            return torch.softmax(logits, -1), hidden, kv

        def distill_loss(target, drafter, x, teach, k=2):
            return mod.distill_loss(target, drafter, x, k, dtype="fp32")[0]

        api.teacher = teacher
        api.distill_loss = distill_loss
        api.train = lambda target, drafter, data, **kw: _given_train(api, target, drafter, data, **kw)
    return api
