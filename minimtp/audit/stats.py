"""The statistics the audits state: ratio standard errors, Pearson's χ² test with pooled cells, its power.

* ``ratio_se``: the delta-method standard error of R = Σ a_s / Σ b_s over independent units s (sequences).
* ``chi2_sf``: P(χ²_ν > x) = Q(ν/2, x/2), the regularized upper incomplete gamma (``torch.special.gammaincc``).
* ``ncx2_sf``: the noncentral χ²_ν(λ) tail, a Poisson(λ/2) mixture of central tails.
* ``detectable_tv``: the smallest total-variation distance the test detects. Pearson's statistic under an
  alternative p' is approximately χ²_ν(λ) with λ = N Σ (p'_i - p_i)² / p_i, and by Cauchy-Schwarz
  (Σ |d_i|)² <= Σ d_i² / p_i · Σ p_i, so λ >= 4 N TV(p, p')². Every alternative at TV >= sqrt(λ* / 4N) therefore has
  power >= that of λ*, the noncentrality at which the level-α test has the stated power.
"""

from __future__ import annotations

import math

import torch


def ratio_se(a: list[float], b: list[float]) -> float:
    """Standard error of Σa / Σb, the units (a_s, b_s) independent: sqrt(n/(n-1) Σ (a_s - R b_s)²) / Σ b."""
    n = len(a)
    B = sum(b)
    if n < 2 or B <= 0:
        return 0.0
    R = sum(a) / B
    return math.sqrt(n / (n - 1) * sum((x - R * y) ** 2 for x, y in zip(a, b))) / B


def chi2_sf(x: float, df: int) -> float:
    """P(χ²_df > x)."""
    if df <= 0:
        return 1.0
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), torch.tensor(x / 2.0).double()))


def chi2_isf(alpha: float, df: int) -> float:
    """The x with P(χ²_df > x) = alpha (bisection on chi2_sf)."""
    lo, hi = 0.0, max(10.0, 4.0 * df)
    while chi2_sf(hi, df) > alpha:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        if chi2_sf(mid, df) > alpha:
            lo = mid
        else:
            hi = mid
    return hi


def ncx2_sf(x: float, df: int, lam: float) -> float:
    """P(χ²_df(λ) > x) = Σ_j Poisson(j; λ/2) P(χ²_{df+2j} > x)."""
    h = lam / 2
    top = int(h + 12 * math.sqrt(h) + 60)
    total = 0.0
    for j in range(top + 1):
        w = math.exp(-h + j * math.log(h) - math.lgamma(j + 1)) if h > 0 else float(j == 0)
        total += w * chi2_sf(x, df + 2 * j)
    return min(1.0, total)


def detectable_tv(n: int, df: int, alpha: float, power: float = 0.9) -> float:
    """The smallest total-variation distance (on the pooled cells) detected with probability >= ``power`` at
    level ``alpha`` by Pearson's test with ``df`` degrees of freedom on ``n`` samples (module docstring)."""
    if n <= 0 or df <= 0:
        return math.inf
    crit = chi2_isf(alpha, df)
    lo, hi = 0.0, 1.0
    while ncx2_sf(crit, df, hi) < power:
        hi *= 2
    for _ in range(60):
        mid = (lo + hi) / 2
        if ncx2_sf(crit, df, mid) < power:
            lo = mid
        else:
            hi = mid
    return math.sqrt(hi / (4 * n))


def pooled_chi2(observed: list[int], probs: list[float], min_expected: float = 5.0) -> tuple[float, int]:
    """Pearson's χ² of counts against probabilities (Σ probs = 1, one cell per outcome), cells with expected count
    < ``min_expected`` pooled into one (and that one, if still small, into the smallest other cell). (χ², df)."""
    n = sum(observed)
    cells = sorted(zip(probs, observed), reverse=True)
    big = [(p, o) for p, o in cells if p * n >= min_expected]
    small = [(p, o) for p, o in cells if p * n < min_expected]
    if small:
        pooled = (sum(p for p, _ in small), sum(o for _, o in small))
        if pooled[0] * n >= min_expected or not big:
            big.append(pooled)
        else:
            p, o = big.pop()
            big.append((p + pooled[0], o + pooled[1]))
    chi2 = sum((o - n * p) ** 2 / (n * p) for p, o in big if p > 0)
    return chi2, len(big) - 1


def normal_sf(z: float) -> float:
    """P(Z > z) for a standard normal Z."""
    return 0.5 * math.erfc(z / math.sqrt(2))
