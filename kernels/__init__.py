"""Triton twins of minimtp's PyTorch references, installed as ``minimtp.kernels``.

On a machine without a CUDA device the kernels run under Triton's interpreter: ``TRITON_INTERPRET=1`` must be
set before any ``@triton.jit`` decorator runs, so it is set here, before the kernel modules are imported
(``MINIMTP_KERNEL_COMPILE_ONLY=1`` leaves it unset, for the ahead-of-time compile tests).
"""

import os


def _want_interpreter() -> bool:
    if os.environ.get("MINIMTP_KERNEL_COMPILE_ONLY") == "1":
        return False
    try:
        import torch

        return not torch.cuda.is_available()
    except Exception:  # pragma: no cover
        return True


if _want_interpreter():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
