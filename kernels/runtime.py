"""Compiled on a CUDA device, or interpreted on the CPU: which one a kernel runs as, and a one-line error when
it can run as neither.

Triton decides per kernel, at the moment ``@triton.jit`` decorates it: with ``TRITON_INTERPRET=1`` in the
environment then, the kernel becomes an ``InterpretedFunction`` (NumPy on CPU tensors), otherwise a
``JITFunction`` (compiled for the GPU at its first launch). The wrappers call :func:`check_launch` before
launching, so a wrong setup fails with :class:`minimtp.errors.CompatibilityError` instead of an error from deep
inside Triton.

**On a CUDA GPU** the kernels are compiled at their first launch; nothing to do.

**On CPU** they run under Triton's interpreter (NumPy, slow, the same kernel source), and that is an explicit
opt-in: set ``TRITON_INTERPRET=1`` in the environment *before starting Python*::

    TRITON_INTERPRET=1 python -m minimtp.generate --attention triton --prompt "def f(x):"

Before the process starts, because torch (``torch._dynamo``, pulled in by transformers) may import ``triton``
long before a kernel module, and Triton's own ``tl.max`` / ``tl.sum`` are decorated when ``triton`` is first
imported. A script can still set it in its first lines, before it imports torch, transformers or minimtp (the
tutorials do). minimtp never sets the variable itself, and importing a kernel module writes no environment
variable and patches nothing in ``triton``. The walk-through: ``docs/concepts/kernels.md``, "Testing without a
GPU".
"""

from __future__ import annotations

import torch
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

from minimtp.errors import CompatibilityError

# FMA contraction, passed to every launch rather than left to TRITON_DEFAULT_FP_FUSION: Triton 3.9 defaults it on
# and warns that 3.10 will default it off. On: the tolerances and the compile check were measured with it.
FP_FUSION = True

NEEDS_CUDA = (
    "Triton kernels need a CUDA device; on CPU set TRITON_INTERPRET=1 before starting Python (docs: concepts/kernels)"
)
SET_TOO_LATE = (
    "TRITON_INTERPRET=1 was set after triton was imported, so Triton's own tl.* functions are not interpreted; "
    "set it before starting Python (docs: concepts/kernels)"
)


def is_interpreted(kernel) -> bool:
    """Whether ``kernel`` (a ``@triton.jit`` object) runs under Triton's interpreter."""
    return isinstance(kernel, InterpretedFunction)


def check_launch(kernel, device: torch.device) -> bool:
    """``True`` if ``kernel`` will run under the interpreter, ``False`` if compiled; raises
    :class:`~minimtp.errors.CompatibilityError` if it cannot run on tensors of ``device``.

    * Interpreted: any device (the interpreter copies CUDA tensors to the host and back), provided Triton's
      standard library is interpreted too. ``tl.max``, ``tl.sum``, ``tl.cdiv``, ... are ``@triton.jit``
      functions decorated when ``triton`` is imported; if ``TRITON_INTERPRET=1`` was set after that, they stay
      compiled-mode and the first call inside an interpreted kernel fails ("Cannot call @triton.jit'd outside
      of the scope of a kernel").
    * Compiled: CUDA tensors only.
    * Anything else — the launch recorder of ``tests/support/kernel_compile_check.py`` — counts as compiled and needs no
      device.
    """
    if isinstance(kernel, InterpretedFunction):
        if isinstance(tl.standard.max, JITFunction):
            raise CompatibilityError(SET_TOO_LATE)
        return True
    if isinstance(kernel, JITFunction) and device.type != "cuda":
        raise CompatibilityError(NEEDS_CUDA)
    return False
