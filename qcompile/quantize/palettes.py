"""Palettes (weight sharing): each weight a 4-bit index into one table of 16 int8 values per
layer, times its group's scale.

    w[k, n] ~ scale[k // group, n] * palette[code[k, n]]

The group scales take each group's range, as for uniform 4-bit codes (the largest magnitude
maps to 127); the palette takes the shape of the layer's weights within their groups: its
entries are the weighted k-means centres (optimal in one dimension: fit_palette) of the weights
divided by their group's scale, each weighted by what its error costs on the output: its
input's mean square on the calibration data (the diagonal of the Hessian GPTQ uses) times its
scale squared; the entry nearest zero is made zero, so that zeros stay exact (a pruned
channel, a group too small for an fp16 scale). Bell-shaped weights get more levels near zero
than a uniform grid gives them (NF4, QLoRA's 4-bit format, is the same idea with a fixed
table). Then, twice, each weight takes its nearest entry and each group's scale is refitted by
weighted least squares to its codes; with the calibration moments, the codes are then
rounded by GPTQ (rounding.py), each weight to the entry just below or just above it. On
EfficientNet-Lite0's 1x1 convolutions and classifier (groups of 32, GPTQ on 32 photos): 20.2
dB of weight SQNR on average against 18.8 for uniform 4-bit codes (bench/palettes.py).

The table has int8 entries, so the kernel turns an index into a value with one table lookup
(`vpshufb` / `tbl`, schedules/cpu/palette_lookup.py) and multiplies it on the int8 dot-product
instructions, as the uniform 4-bit kernel does after its shift.
"""

from __future__ import annotations

import hashlib

import numpy as np

from .rounding import InputMoments, gptq_group_codes
from .weights import GroupWeight, fitted_group_scales, sqnr_db

SIZE = 16            # entries: 4-bit codes
BINS = 512           # histogram bins the centres are chosen over (the entries are integers)
REFITS = 2           # nearest entry, then the group scales by least squares: rounds


def fit_palette(values: np.ndarray, weights: np.ndarray, size: int = SIZE,
                bins: int = BINS) -> np.ndarray:
    """Sorted float centres [size] of `values` (1-D) minimizing sum weights * (v - c)^2 over
    each value's nearest centre: optimal over clusters of whole histogram bins (`bins` of equal
    width over the values' range), by dynamic programming on the bins' prefix sums (in one
    dimension, clusters are runs of consecutive values). Lloyd's algorithm from quantiles
    stopped at twice this error on a layer whose few loud inputs dominate."""
    v = np.asarray(values, np.float64)
    w = np.asarray(weights, np.float64)
    w = w / w.max()  # the costs of a layer of tiny weights are tiny: keep the sums well scaled
    lo, hi = float(v.min()), float(v.max())
    edges = np.linspace(lo, hi, bins + 1)
    which = np.clip(np.searchsorted(edges, v, side="right") - 1, 0, bins - 1)
    mass = np.bincount(which, w, bins)
    keep = mass > 0
    mass = mass[keep]
    first = np.bincount(which, w * v, bins)[keep]
    second = np.bincount(which, w * v * v, bins)[keep]
    count = mass.size
    if count <= size:
        centres = first / mass
        return np.sort(np.concatenate([centres, np.full(size - count, centres[-1])]))
    m0, m1, m2 = (np.concatenate([[0.0], np.cumsum(a)]) for a in (mass, first, second))
    i, j = np.triu_indices(count)  # a cluster of bins i..j
    cost = np.full((count, count), np.inf)
    total = m0[j + 1] - m0[i]
    mean_sum = m1[j + 1] - m1[i]
    spread = m2[j + 1] - m2[i] - mean_sum ** 2 / np.where(total > 0, total, 1.0)
    cost[i, j] = np.maximum(spread, 0.0)
    best = cost[0].copy()               # best[j]: bins 0..j in one cluster
    starts = [np.zeros(count, int)]
    for _ in range(1, size):
        candidates = np.concatenate([[np.inf], best[:-1]])[:, None] + cost  # [start, end]
        starts.append(np.argmin(candidates, axis=0))
        best = candidates[starts[-1], np.arange(count)]
    centres, end = [], count - 1
    for step in range(size - 1, -1, -1):
        start = starts[step][end] if step else 0
        centres.append((m1[end + 1] - m1[start]) / (m0[end + 1] - m0[start]))
        end = start - 1
    return np.sort(np.array(centres))


def quantize_palette(weight: np.ndarray, group: int, *,
                     moments: InputMoments | None = None) -> GroupWeight:
    """A matmul weight [K, N] as 4-bit palette codes with a scale per group of `group`
    reduction elements (the module docstring). Deterministic: the same weight and moments give
    the same palette."""
    key = ("palette", group, weight.shape, hashlib.sha1(np.ascontiguousarray(
        weight, np.float32).tobytes()).hexdigest())
    if moments is not None and key in moments.codes:
        return moments.codes[key]
    k, n = weight.shape
    padded = -(-k // group) * group
    w = np.zeros((padded, n), np.float64)
    w[:k] = weight
    diagonal = np.ones(padded)
    if moments is not None:
        diagonal = np.zeros(padded)
        diagonal[:k] = np.diagonal(moments.hessian()[0])
        diagonal += 1e-6 * max(float(diagonal.max()), 1e-30)  # dead inputs still count a bit
    scales = fitted_group_scales(w, group, -127, 127, None, "float16").astype(np.float64)
    step = np.repeat(scales, group, axis=0)
    cost = diagonal[:, None] * step ** 2
    centres = fit_palette((w / step).ravel(), cost.ravel())
    palette = np.clip(np.round(centres), -127, 127)
    palette[np.argmin(np.abs(palette))] = 0  # zero stays exact (pruned or dead weights)
    palette = np.sort(palette).astype(np.int8)
    entries = palette.astype(np.float64)
    edges = (entries[1:] + entries[:-1]) / 2
    for _ in range(REFITS):
        codes = np.searchsorted(edges, w / step).astype(np.uint8)
        values = entries[codes].reshape(-1, group, n)
        blocks = w.reshape(-1, group, n)
        d = diagonal.reshape(-1, group, 1)
        num, den = (d * blocks * values).sum(axis=1), (d * values * values).sum(axis=1)
        scales = np.where((num > 0) & (den > 0), num / np.where(den > 0, den, 1.0), scales)
        scales = np.where(scales.astype(np.float16) > 0, scales, 1.0)  # as fitted_group_scales
        step = np.repeat(scales.astype(np.float16).astype(np.float64), group, axis=0)
    codes = np.searchsorted(edges, w / step).astype(np.uint8)
    rounding = "nearest"
    if moments is not None:  # GPTQ, each weight's value the entry below or above it
        values = gptq_group_codes(weight, step[:k], moments, -127, 127, levels=entries)
        codes[:k] = np.searchsorted(entries, values)
        rounding = "gptq"
    result = GroupWeight(codes, scales.astype(np.float16), group, 4, rounding, 0.0,
                         palette=palette)
    result = GroupWeight(codes, result.scales, group, 4, rounding,
                         sqnr_db(weight, result.dequantized(k)), palette=palette)
    if moments is not None:
        moments.codes[key] = result
    return result


__all__ = ["SIZE", "fit_palette", "quantize_palette"]
