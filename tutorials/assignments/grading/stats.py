"""Statistics: Pearson χ² goodness-of-fit tests at significance ALPHA."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .core import ALPHA, Failure

# ------------------------------------------------------------------------------------------------ statistics


def chi2_sf(x: float, df: int) -> float:
    """P(χ²_df > x) = Q(df/2, x/2) (regularised upper incomplete gamma)."""
    if df <= 0:
        return 1.0
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), torch.tensor(x / 2.0)))


def chi2_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, float, int, list]:
    """Pearson's χ² of ``counts`` against ``probs`` with cells of expected count < 5 pooled: (statistic, p-value,
    degrees of freedom, cells [(label index or list of pooled indices, observed, expected)])."""
    counts, probs = counts.flatten().double(), probs.flatten().double()
    n = float(counts.sum())
    idx = probs.gt(0).nonzero()[:, 0]
    e_all = probs / probs[idx].sum() * n
    order = idx[torch.argsort(e_all[idx])]
    cells = [([int(i)], float(counts[i]), float(e_all[i])) for i in order]
    while len(cells) > 1 and cells[0][2] < 5:  # pool the smallest cells until each expects >= 5
        (a, ca, ea), (b, cb, eb) = cells[0], cells[1]
        cells = sorted([(a + b, ca + cb, ea + eb), *cells[2:]], key=lambda c: c[2])
    stat = sum((c - e) ** 2 / e for _, c, e in cells)
    return stat, chi2_sf(stat, len(cells) - 1), len(cells) - 1, cells


def chi2_test(counts: torch.Tensor, probs: torch.Tensor, what: str, bug: str = "output distribution is not p",
              label: Callable[[int], str] | None = None, alternatives: dict | None = None) -> None:  # fmt: skip
    """Pearson χ² goodness of fit at level ALPHA; any count in a zero-probability cell fails outright. On failure
    the evidence is the cell with the largest contribution (observed vs expected); ``alternatives`` {bug class:
    wrong distribution}: the first one the counts fit (p-value > 1e-3) names the bug class instead of ``bug``."""
    label = label or (lambda i: f"token {i}")
    counts, probs = counts.flatten().double(), probs.flatten().double()
    n = float(counts.sum())
    zero = (probs <= 0) & (counts > 0)
    if bool(zero.any()):
        i = int(zero.nonzero()[0, 0])
        bug = _best_alternative(counts, alternatives) or bug
        raise Failure(bug, f"{what}: {int(counts[zero].sum())} of {int(n)} samples are outcomes of probability 0, "
                      f"e.g. {label(i)} ({int(counts[i])} times)")  # fmt: skip
    stat, pv, df, cells = chi2_pvalue(counts, probs)
    if pv < ALPHA:
        worst = max(cells, key=lambda c: (c[1] - c[2]) ** 2 / c[2])
        names = ", ".join(label(i) for i in worst[0][:4]) + (" ..." if len(worst[0]) > 4 else "")
        bug = _best_alternative(counts, alternatives) or bug
        raise Failure(bug, f"{what}: χ² = {stat:.1f}, df {df}, p-value {pv:.1e} < α = {ALPHA:g}; largest "
                      f"contribution: {names}: observed {int(worst[1])} ({worst[1] / n:.3f}), expected "
                      f"{worst[2]:.1f} ({worst[2] / n:.3f}), of {int(n)} samples")  # fmt: skip


def _best_alternative(counts: torch.Tensor, alternatives: dict | None) -> str | None:
    for name, probs in (alternatives or {}).items():
        probs = torch.as_tensor(probs).flatten().double()
        if bool(((probs <= 0) & (counts > 0)).any()):
            continue
        if chi2_pvalue(counts, probs)[1] > 1e-3:
            return name
    return None
