"""Triton twins of minimtp's PyTorch references, installed as ``minimtp.kernels``.

* :mod:`minimtp.kernels.paged_attention` — paged attention (decode, verify, prefill);
* :mod:`minimtp.kernels.verify` — speculative verification fused over the vocabulary;
* :mod:`minimtp.kernels.runtime` — compiled or interpreted, and the error when neither can run;
* ``python -m minimtp.kernels.bench`` — GPU latency and bandwidth.

Importing any of them has no side effects: no environment variable is written and nothing in ``triton`` is
patched.

**On a CUDA GPU** the kernels are compiled at their first launch; nothing to do.

**On CPU** they run under Triton's interpreter (NumPy, slow, the same kernel source), and that is an explicit
opt-in: set ``TRITON_INTERPRET=1`` in the environment *before starting Python*::

    TRITON_INTERPRET=1 python -m minimtp.generate --attention triton --prompt "def f(x):"

Before the process starts, because ``@triton.jit`` decides interpreted versus compiled when it *decorates* a
function — Triton's own ``tl.max`` / ``tl.sum`` when ``triton`` is first imported, minimtp's kernels when these
modules are — and torch (``torch._dynamo``, pulled in by transformers) may import ``triton`` long before a
kernel module. A script can still set it in its first lines, before it imports torch, transformers or
minimtp (the tutorials do). Without it, calling a kernel with CPU tensors raises
:class:`minimtp.errors.CompatibilityError` with the fix in one line, and so does a variable set too late
(after ``triton`` was imported). The walk-through: ``docs/concepts/kernels.md``, "Testing without a GPU".
"""
