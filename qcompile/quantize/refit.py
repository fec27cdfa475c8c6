"""The closed-form refit behind reconstruction: one layer's float weights, fitted so that the
layer reproduces the fp32 model's outputs from the inputs the quantized model gives it.

For a layer with weight rows W [G, R, K] (G groups sharing an input, R outputs each, K inputs
per output; a bias, when the layer has one, is the last column of W against a constant-1 input)
and, over the calibration samples, its input x in the fp32 model and x~ in the quantized one:

    W' = argmin || W' x~ - W x ||^2 + lam || W' - W ||^2  =  (W C + lam W) (H~ + lam I)^-1

with H~ = sum x~ x~^T and C = sum x x~^T. Rounding W' with GPTQ on H~ then minimizes the whole
error: the part W' cannot fit and the rounding's are orthogonal.

lam is chosen per group by FOLDS-fold cross-validation over the samples (fit on the other
folds, score on the one left out) from RIDGE, fractions of H~'s mean diagonal, and "keep W",
which wins unless a fit lowers the held-out error by MARGIN: a layer with many inputs and few
samples (a classifier on 32 photos, a 1152-input projection on 7x7 maps) fits the calibration
data's noise; unregularized, such fits cut EfficientNet-Lite0's int8 calibration error and
cost it 3 points of held-out top-1. The bias is not penalized.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

RIDGE = (0.001, 0.01, 0.1, 1.0, 10.0, None)  # None: keep the weight as it is
FOLDS = 4
MARGIN = 0.02  # of the held-out error that a fit must remove to replace the weight


@dataclass
class FitStats:
    """Sums over samples of one fold: H~ = x~ x~^T, C = x x~^T, F = x x^T, per group."""

    h: np.ndarray | None = None
    c: np.ndarray | None = None
    f: np.ndarray | None = None
    count: int = 0

    def add(self, float_cols: np.ndarray, quant_cols: np.ndarray) -> None:
        """Columns [G, K, P] of the fp32 and the quantized model's input for P outputs."""
        x = np.ascontiguousarray(float_cols, np.float64)
        xq = np.ascontiguousarray(quant_cols, np.float64)
        h, c, f = (xq @ xq.transpose(0, 2, 1), x @ xq.transpose(0, 2, 1),
                   x @ x.transpose(0, 2, 1))
        if self.h is None:
            self.h, self.c, self.f = h, c, f
        else:
            self.h += h
            self.c += c
            self.f += f
        self.count += x.shape[2]

    def __add__(self, other: "FitStats") -> "FitStats":
        return FitStats(self.h + other.h, self.c + other.c, self.f + other.f,
                        self.count + other.count)


@dataclass(frozen=True)
class Refit:
    rows: np.ndarray        # [G, R, K] the refitted weights
    error_before: float     # sum || W x~ - W x ||^2 / sum || W x ||^2 on all samples
    error_after: float      # the same with W'
    kept: int               # groups whose weights cross-validation kept as they were
    ridge: tuple = field(default=())  # per RIDGE entry, how many groups chose it


def refit(rows: np.ndarray, folds: list[FitStats], free: int = 0) -> Refit:
    """W' for weight rows [G, R, K] from per-fold statistics (FOLDS of them). `free`: the last
    `free` columns (a bias) carry no penalty."""
    rows = np.asarray(rows, np.float64)
    every = folds[0]
    for fold in folds[1:]:
        every = every + fold
    scores = np.zeros((len(RIDGE), rows.shape[0]))
    for held, fold in enumerate(folds):
        rest = [f for i, f in enumerate(folds) if i != held]
        fitted_on = rest[0]
        for f in rest[1:]:
            fitted_on = fitted_on + f
        constant = _quadratic(rows, fold.f)
        for i, ridge in enumerate(RIDGE):
            scores[i] += _error(_fit(rows, fitted_on, ridge, free), rows, fold) + constant
    best = scores.argmin(axis=0)
    keep = len(RIDGE) - 1
    best[scores[best, np.arange(len(best))] > (1.0 - MARGIN) * scores[keep]] = keep
    fits = {i: _fit(rows, every, RIDGE[i], free) for i in set(best.tolist())}
    new = np.stack([fits[b][g] for g, b in enumerate(best)])
    target = float(_quadratic(rows, every.f).sum())
    before = _error(rows, rows, every).sum() + target
    after = _error(new, rows, every).sum() + target
    scale = max(target, 1e-30)
    return Refit(new, max(before, 0.0) / scale, max(after, 0.0) / scale,
                 int(np.sum(np.asarray([RIDGE[b] is None for b in best]))),
                 tuple(int(n) for n in np.bincount(best, minlength=len(RIDGE))))


def _fit(rows: np.ndarray, stats: FitStats, ridge: float | None, free: int) -> np.ndarray:
    if ridge is None:
        return rows
    k = stats.h.shape[-1]
    mean_diag = np.einsum("gkk->g", stats.h) / k
    lam = np.maximum(ridge * mean_diag, 1e-12)[:, None] * np.ones(k)  # [G, K]
    if free:
        lam[:, k - free:] = 1e-12 * np.maximum(mean_diag, 1.0)[:, None]
    a = stats.h.copy()
    index = np.arange(k)
    a[:, index, index] += lam
    rhs = rows @ stats.c + rows * lam[:, None, :]                  # [G, R, K]
    # W' A = rhs with A symmetric: A W'^T = rhs^T
    return np.linalg.solve(a, rhs.transpose(0, 2, 1)).transpose(0, 2, 1)


def _error(new: np.ndarray, rows: np.ndarray, stats: FitStats) -> np.ndarray:
    """Per group, sum || W' x~ - W x ||^2 less sum || W x ||^2 (the same for every W')."""
    return _quadratic(new, stats.h) - 2.0 * np.sum((rows @ stats.c) * new, axis=(1, 2))


def _quadratic(w: np.ndarray, h: np.ndarray) -> np.ndarray:
    """Per group, sum over rows of w H w^T (as matmuls: einsum's three operands loop in C
    without BLAS, 100 s for a 1000 x 1280 classifier's folds)."""
    return np.sum((w @ h) * w, axis=(1, 2))


__all__ = ["FOLDS", "FitStats", "MARGIN", "RIDGE", "Refit", "refit"]
