"""How every twin enters a model: one walk over its modules, replacing the ones a rule picks."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn


def swap_(module: nn.Module, replace: Callable[[nn.Module], nn.Module | None]) -> int:
    """Replace, in place, every descendant ``m`` of ``module`` for which ``replace(m)`` returns a module (the
    replacement's own children are not visited). Returns how many were replaced."""
    n = 0
    for name, child in list(module.named_children()):
        new = replace(child)
        if new is not None:
            setattr(module, name, new)
            n += 1
        else:
            n += swap_(child, replace)
    return n
