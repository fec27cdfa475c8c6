"""Weight rounding that minimizes each layer's output error, not each weight's own error.

Rounding every weight to its nearest int8 code is optimal weight by weight, but the errors of a
layer's weights add up in its outputs. GPTQ (Frantar et al., 2022, after Optimal Brain
Quantization) rounds one input column at a time and spreads the rounding error over the
columns not yet rounded, weighted by the layer's input statistics H = E[x x^T], so that
W_q x stays close to W x for the inputs the layer actually sees (the calibration data).

    InputMoments    accumulates H per layer during calibration (im2col patches for a conv)
    fitted_scales   the scale of each short row (a depthwise or 3-channel conv's output), chosen
                    by the same output error
    gptq_codes      the int8 codes of a weight, given its scales and H

A row of hundreds of weights keeps its absmax scale. A row of 9 or 25 (a depthwise conv's
output channel) is different: its largest weight alone sets the step of the other few, and a
smaller scale that clips it slightly often lowers the row's output error. So the scale of each
row of at most SHORT_ROW weights is chosen from SCALE_RATIOS x absmax, the one whose GPTQ codes
give the least output error (w - q s)^T H (w - q s). Kernels, layouts and requantization are
unchanged: only the per-channel scales and the codes are.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DAMPING = 0.01  # of H's mean diagonal, added to the diagonal: H is often singular
BLOCK = 64      # columns rounded before the rest of the weight is updated (one matmul)
SHORT_ROW = 32  # rows of at most this many weights get their scale fitted
SCALE_RATIOS = np.linspace(1.0, 0.6, 41)  # of absmax; the first (no clipping) wins ties


@dataclass(frozen=True)
class ConvShape:
    """What a conv2d's patches need: kernel, strides, padding (top, left, bottom, right),
    dilation, groups. NCHW data, OIHW weight."""

    kernel: tuple[int, int]
    strides: tuple[int, int]
    padding: tuple[int, int, int, int]
    dilation: tuple[int, int]
    groups: int


def conv_shape(node) -> ConvShape | None:
    """The ConvShape of a Relax conv2d node (graph.Node); None for a matmul."""
    if node.kind != "conv2d":
        return None
    kernel = tuple(int(d) for d in list(node.args[1].ty.shape)[2:])
    return ConvShape(kernel, tuple(int(v) for v in node.attr("strides")),
                     tuple(int(v) for v in node.attr("padding")),
                     tuple(int(v) for v in node.attr("dilation")), int(node.attr("groups")))


def conv_patches(x: np.ndarray, conv: ConvShape) -> np.ndarray:
    """im2col of an NCHW input: [groups, C/groups*KH*KW, N*OH*OW], in the order of an OIHW
    weight's flattened [I/groups, KH, KW] (zero padding, as the float conv)."""
    n, c, _, _ = x.shape
    top, left, bottom, right = conv.padding
    x = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))
    kh, kw = conv.kernel
    (sh, sw), (dh, dw) = conv.strides, conv.dilation
    oh = (x.shape[2] - dh * (kh - 1) - 1) // sh + 1
    ow = (x.shape[3] - dw * (kw - 1) - 1) // sw + 1
    taps = [x[:, :, i * dh:i * dh + sh * (oh - 1) + 1:sh, j * dw:j * dw + sw * (ow - 1) + 1:sw]
            for i in range(kh) for j in range(kw)]                  # each [N, C, OH, OW]
    cols = np.stack(taps, axis=2)                                   # [N, C, KH*KW, OH, OW]
    cols = cols.reshape(n, conv.groups, c // conv.groups * kh * kw, oh * ow)
    return cols.transpose(1, 2, 0, 3).reshape(conv.groups, -1, n * oh * ow)


class InputMoments:
    """H = sum of x x^T over every input vector one layer's weights multiply, per group."""

    def __init__(self, conv: ConvShape | None):
        self.conv = conv  # None: a matmul (the input's last axis is the reduction)
        self.h: np.ndarray | None = None
        self.count = 0
        self.codes: dict = {}  # (scales, kind) -> codes: realize runs more than once

    def update(self, x: np.ndarray) -> None:
        x = np.asarray(x, dtype=np.float32)
        if self.conv is None:
            cols = x.reshape(-1, x.shape[-1]).T[None]               # [1, K, P]
        else:
            cols = conv_patches(x, self.conv)                       # [G, K, P]
        cols = np.ascontiguousarray(cols)  # a strided view sends matmul to a slow path
        h = np.matmul(cols, cols.transpose(0, 2, 1)).astype(np.float64)  # sgemm, then summed
        self.h = h if self.h is None else self.h + h
        self.count += cols.shape[2]

    def hessian(self) -> np.ndarray:
        return self.h / max(self.count, 1)


def gptq_codes(weight: np.ndarray, scales: np.ndarray, moments: InputMoments,
               kind: str, qmax: int = 127) -> np.ndarray:
    """int8 codes of `weight` (conv OIHW, or matmul [K, N]) with per-output `scales` (a
    scalar for per-tensor), rounded column by column with GPTQ's error feedback."""
    key = (np.asarray(scales, np.float32).tobytes(), kind, weight.shape)
    if key not in moments.codes:
        rows, s = _rows(weight, scales, moments.hessian(), kind)
        moments.codes[key] = _from_rows(_gptq(rows, s[..., None], moments.hessian(), qmax),
                                        weight, kind)
    return moments.codes[key]


def fitted_scales(weight: np.ndarray, scales: np.ndarray, moments: InputMoments, kind: str,
                  floor: np.ndarray | None = None, qmax: int = 127) -> np.ndarray:
    """Per-output `scales` with each row of at most SHORT_ROW weights rescaled by the ratio in
    SCALE_RATIOS whose GPTQ codes give it the least output error on the calibration inputs;
    longer rows, and per-tensor scales, are returned as they are. `floor`: the least scale
    each output may have (realize's bias bound)."""
    scales = np.asarray(scales, np.float32)
    h = moments.hessian()
    rows, s = _rows(weight, scales, h, kind)
    if scales.size == 1 or rows.shape[-1] > SHORT_ROW:
        return scales
    key = ("fitted", scales.tobytes(), None if floor is None else
           np.asarray(floor, np.float32).tobytes(), kind, weight.shape)
    if key not in moments.codes:
        lowest = np.broadcast_to(np.asarray(0.0 if floor is None else floor, np.float64),
                                 (scales.size,)).reshape(s.shape)
        damped = _damped(h)
        best, best_error = s.copy(), np.full(s.shape, np.inf)
        for ratio in SCALE_RATIOS:
            trial = np.maximum(s * ratio, lowest).astype(np.float32).astype(np.float64)
            error = rows - _gptq(rows, trial[..., None], h, qmax) * trial[..., None]
            error = np.einsum("grk,gkl,grl->gr", error, damped, error)
            better = error < best_error
            best[better], best_error[better] = trial[better], error[better]
        moments.codes[key] = best.reshape(scales.shape).astype(np.float32)
    return moments.codes[key]


def _rows(weight, scales, h, kind):
    """(rows [G, R, K] of weights that share an input, their scales [G, R])."""
    if kind == "matmul":                         # [K, N] -> rows = outputs
        rows = weight.T.astype(np.float64)[None]                     # [1, N, K]
        s = np.broadcast_to(np.asarray(scales, np.float64), (weight.shape[1],))[None]
    else:
        out_channels = weight.shape[0]
        groups = h.shape[0]
        rows = weight.reshape(groups, out_channels // groups, -1).astype(np.float64)
        s = np.broadcast_to(np.asarray(scales, np.float64),
                            (out_channels,)).reshape(groups, -1)
    return rows, s


def _from_rows(codes, weight, kind):
    if kind == "matmul":
        return codes[0].T.astype(np.int8)
    return codes.reshape(weight.shape).astype(np.int8)


class _Grid:
    """The values codes may take: the integers in [qmin, qmax], or sorted `levels`."""

    def __init__(self, qmin: int, qmax: int, levels: np.ndarray | None):
        self.qmin, self.qmax = qmin, qmax
        self.levels = None if levels is None else np.asarray(levels, np.float64)

    def below(self, x: np.ndarray) -> np.ndarray:
        if self.levels is None:
            return np.clip(np.floor(x), self.qmin, self.qmax)
        index = np.searchsorted(self.levels, x, side="right") - 1
        return self.levels[np.clip(index, 0, self.levels.size - 1)]

    def above(self, x: np.ndarray) -> np.ndarray:
        if self.levels is None:
            return np.clip(np.ceil(x), self.qmin, self.qmax)
        return self.levels[np.clip(np.searchsorted(self.levels, x), 0, self.levels.size - 1)]

    def nearest(self, x: np.ndarray) -> np.ndarray:
        if self.levels is None:
            return np.round(x)
        middles = (self.levels[1:] + self.levels[:-1]) / 2
        return self.levels[np.searchsorted(middles, x)]


def _damped(h: np.ndarray) -> np.ndarray:
    """H with GPTQ's damping: an input zero on every calibration sample gets diagonal 1 (its
    weights pass no error on and keep their nearest codes), every diagonal DAMPING more."""
    h = h.copy()
    index = np.arange(h.shape[-1])
    diag = h[:, index, index]
    diag[diag <= 0] = 1.0
    h[:, index, index] = diag + DAMPING * diag.mean(axis=1, keepdims=True)
    return h


def gptq_group_codes(weight: np.ndarray, scales: np.ndarray, moments: InputMoments,
                     qmin: int, qmax: int, levels: np.ndarray | None = None) -> np.ndarray:
    """Codes in [qmin, qmax] of a matmul weight [K, N] with a scale per weight (`scales`
    [K, N]: each reduction group's scale repeated), rounded by GPTQ's error feedback; with
    `levels` (sorted), each code one of them (a palette's values) instead of an integer."""
    key = ("groups", np.asarray(scales, np.float32).tobytes(), qmin, qmax, weight.shape,
           None if levels is None else np.asarray(levels, np.float64).tobytes())
    if key not in moments.codes:
        rows = weight.T.astype(np.float64)[None]
        s = np.asarray(scales, np.float64).T[None]
        moments.codes[key] = _gptq(rows, s, moments.hessian(), qmax, qmin, levels)[0].T
    return moments.codes[key]


def _gptq(w: np.ndarray, s: np.ndarray, h: np.ndarray, qmax: int,
          qmin: int | None = None, levels: np.ndarray | None = None) -> np.ndarray:
    """w [G, R, K] rows to round with scales s [G, R, 1] (or [G, R, K]: one per weight),
    H [G, K, K] -> codes [G, R, K] in [qmin, qmax] (qmin: -qmax when None), or among the
    sorted `levels` when given."""
    qmin = -qmax if qmin is None else qmin
    grid = _Grid(qmin, qmax, levels)
    w = w.copy()
    k = h.shape[-1]
    # An input that was zero on every calibration sample: its weights keep their nearest codes
    # (H's zero row and column pass no error on). Zeroing them, as GPTQ does for language
    # models, broke EfficientNet channels that are dead on 32 photos but not on others.
    h = _damped(h)
    # the upper Cholesky factor of H^-1: row i holds how the not-yet-rounded columns absorb
    # column i's error
    u = np.linalg.cholesky(np.linalg.inv(h)).transpose(0, 2, 1)
    codes = np.empty_like(w)
    # each code stays the floor or the ceiling of its own weight (AdaRound's constraint): only
    # the direction of rounding is chosen. Unconstrained, GPTQ moved weights far along the
    # directions the calibration inputs never excite (a depthwise channel whose input was
    # constant), fitting the calibration set and costing held-out accuracy.
    lower, upper = grid.below(w / s), grid.above(w / s)
    per_weight = s.shape[-1] > 1
    for start in range(0, k, BLOCK):
        end = min(start + BLOCK, k)
        errors = np.empty(w.shape[:2] + (end - start,))
        for i in range(start, end):
            column = w[:, :, i]
            step = s[..., i] if per_weight else s[..., 0]
            q = np.clip(grid.nearest(column / step), lower[:, :, i], upper[:, :, i])
            codes[:, :, i] = q
            error = (column - q * step) / u[:, i, i][:, None]
            w[:, :, i + 1:end] -= error[:, :, None] * u[:, i, None, i + 1:end]
            errors[:, :, i - start] = error
        # GPTQ's lazy batch: the columns after the block take the block's errors at once
        w[:, :, end:] -= np.matmul(errors, u[:, start:end, end:])
    return codes
