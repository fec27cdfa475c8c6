"""One place that quantizes a layer's weight: scales, fitted scales, codes, the corrected bias.

Realize emits the codes into integer kernels; the precision search's simulator multiplies them
back by their scales. Both call `quantize_weight`, so the weights the search judges are the
weights that are built.

Weights come in the layout of their kind: a conv's OIHW (output channels on axis 0), a
matmul's [K, N] (outputs on axis 1).

- scales: symmetric int8 (codes in [-127, 127]), per output channel or one per tensor;
- a (near) dead channel with a bias would overflow the int32 bias (it is stored in units of
  input scale x weight scale): its weight scale is raised until the bias fits in 2^30;
- short rows (a depthwise or 3-channel conv's outputs) get their scales fitted to the
  calibration inputs, and every row is rounded by GPTQ, when the layer's input moments were
  collected (rounding.py); else to nearest;
- bias correction: the mean output shift that rounding causes (from the layer input's
  per-channel means) is subtracted from the bias.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .observers import weight_scales
from .rounding import InputMoments, fitted_scales, gptq_codes, gptq_group_codes

CHANNEL_AXIS = {"conv2d": 0, "matmul": 1}  # the output-channel axis of each kind's weight
BIAS_LIMIT = 2.0 ** 30  # the largest |bias| in accumulator units: headroom left in int32


@dataclass(frozen=True)
class QuantWeight:
    """A weight in int8: `codes * scales` (along `axis`, or one scale) approximates it."""

    codes: np.ndarray            # int8, the weight's layout
    scales: np.ndarray           # float32: one per output channel, or one
    axis: int | None             # the weight's output-channel axis; None: per tensor
    rounding: str                # gptq | nearest | model (a pre-quantized model's own codes)
    bias: np.ndarray | None      # the float bias, bias-corrected (None: the layer has none)
    sqnr_db: float               # the weight's own error

    @property
    def channels(self) -> int:
        return int(self.codes.shape[CHANNEL_AXIS["conv2d" if self.codes.ndim == 4
                                                 else "matmul"]])

    def channel_scales(self) -> np.ndarray:
        """The scale of each output channel (a per-tensor scale repeated)."""
        return np.broadcast_to(self.scales, (self.channels,)).astype(np.float32)

    def dequantized(self) -> np.ndarray:
        shape = [1] * self.codes.ndim
        if self.axis is not None:
            shape[self.axis] = self.codes.shape[self.axis]
        return (self.codes * self.scales.reshape(shape)).astype(np.float32)


def quantize_weight(weight: np.ndarray, kind: str, *, per_channel: bool = True,
                    bias: np.ndarray | None = None, input_scale: float | None = None,
                    moments: InputMoments | None = None, means: np.ndarray | None = None,
                    given: tuple | None = None) -> QuantWeight:
    """The int8 form of `weight` (kind: conv2d or matmul).

    bias: the layer's float bias (per output channel), bias-corrected here when `means` (the
    per-channel means of the layer's input) are given. input_scale: the scale of the layer's
    8-bit input, which the int32 bias is stored in units of (None: the bias stays in float,
    e.g. a 16-bit input's). moments: the layer input's second moments (fitted scales and GPTQ
    rounding). given: a pre-quantized model's (codes, scales, axis) for this weight."""
    axis = CHANNEL_AXIS[kind]
    if given is not None:
        codes, scales, given_axis = given
        scales = np.asarray(scales, dtype=np.float32).reshape(-1)
        return _result(weight, np.asarray(codes).astype(np.int8), scales, given_axis, "model",
                       bias)
    axis = axis if per_channel else None
    scales = weight_scales(weight, axis)
    floor = None
    if bias is not None and input_scale is not None:
        floor = (np.abs(bias) / (np.float64(input_scale) * BIAS_LIMIT)).astype(np.float32)
        scales = np.maximum(scales, floor if axis is not None else floor.max()).astype(
            np.float32)
    if moments is not None and axis is not None:
        scales = fitted_scales(weight, scales, moments, kind, floor)  # short rows only
    if moments is not None:
        codes, rounding = gptq_codes(weight, scales, moments, kind), "gptq"
    else:
        codes = np.clip(np.round(weight / _along(scales, weight.ndim, axis)), -127, 127)
        codes, rounding = codes.astype(np.int8), "nearest"
    if means is not None:
        error = codes * _along(scales, weight.ndim, axis) - weight
        shift = weight_error_shift(error, means, kind)
        bias = -shift if bias is None else bias - shift
    return _result(weight, codes, scales, axis, rounding, bias)


@dataclass(frozen=True)
class GroupWeight:
    """A matmul weight [K, N] in `bits`-bit codes with a scale per group of `group`
    consecutive reduction elements: (codes - zero) * scales[k // group, n] approximates it,
    where zero is the offset 2^(bits-1) (symmetric codes, qcompile's own) or, for a model
    that arrives with asymmetric 4-bit weights, its zero point per group (integer or float).
    K is padded up to a whole number of groups; the kernels pad the input with its zero,
    so the padding's codes add nothing."""

    codes: np.ndarray            # uint8 [K_padded, N], in [0, 2^bits): offset binary
    scales: np.ndarray           # [groups, N], in `scale_dtype`
    group: int
    bits: int
    rounding: str                # gptq | nearest | given (the model's own codes)
    sqnr_db: float
    zero_points: np.ndarray | None = None  # [groups, N]; None: the offset
    palette: np.ndarray | None = None  # int8 [2^bits]: the value of each code (palettes.py)

    @property
    def offset(self) -> int:
        return 1 << (self.bits - 1)

    def values(self) -> np.ndarray:
        """The codes less the offset, or the palette's values of the codes, [K_padded, N]:
        what the W4A8 kernel multiplies."""
        if self.palette is not None:
            return self.palette.astype(np.int32)[self.codes]
        return self.codes.astype(np.int32) - self.offset

    def zeros(self) -> np.ndarray:
        """[groups, N] float32: the value each group's codes are centred on."""
        if self.zero_points is None:
            return np.full(self.scales.shape, self.offset, np.float32)
        return self.zero_points.astype(np.float32)

    def dequantized(self, rows: int | None = None) -> np.ndarray:
        """The approximated weight [rows, N] (rows: the unpadded K; None: all), computed as
        onnxruntime does: (code - zero) * scale in float32."""
        if self.palette is not None:
            centred = self.values().astype(np.float32)
        else:
            centred = self.codes.astype(np.float32) - np.repeat(self.zeros(), self.group, axis=0)
        w = centred * np.repeat(self.scales.astype(np.float32), self.group, axis=0)
        return w[:rows].astype(np.float32)

    def group_sums(self) -> np.ndarray:
        """[groups, N] int32: each group's sum of codes less the offset (the input zero
        point's correction)."""
        return self.values().reshape(-1, self.group, self.codes.shape[1]).sum(axis=1).astype(
            np.int32)

    def packed_pairs(self) -> np.ndarray:
        """[N, K_padded/2] uint8: codes k = 2j (low nibble) and 2j + 1 (high) of each row."""
        pairs = self.codes.T.reshape(self.codes.shape[1], -1, 2)
        return np.ascontiguousarray(pairs[..., 0] | (pairs[..., 1] << 4)).astype(np.uint8)

    def stored_bits(self, rows: int, zero_bytes: int | None = None) -> float:
        """Bits per weight of the `rows` x N weight stored as these codes (4-bit ones two per
        byte), its scales and its zero points (`zero_bytes`: what a kernel stores for them
        instead)."""
        if zero_bytes is None:
            zero_bytes = 0 if self.zero_points is None else self.zero_points.nbytes
        stored = self.codes.size * self.bits // 8 + self.scales.nbytes + zero_bytes + (
            0 if self.palette is None else self.palette.nbytes)
        return 8.0 * stored / (rows * self.codes.shape[1])

    def packed_columns(self) -> np.ndarray:
        """[K_padded/2, N] uint8: codes k = 2j (low nibble) and 2j + 1 (high) of each column,
        each byte row contiguous along N (the float kernel's vector axis)."""
        pairs = self.codes.reshape(-1, 2, self.codes.shape[1])
        return np.ascontiguousarray(pairs[:, 0] | (pairs[:, 1] << 4)).astype(np.uint8)


# the fractions of a group's largest magnitude / qmax tried as its scale (with calibration):
# a smaller step rounds the bulk of the weights finer and clips the few largest
SCALE_FRACTIONS = (1.0, 0.95, 0.9, 0.85, 0.8)


def fitted_group_scales(w: np.ndarray, group: int, qmin: int, qmax: int,
                        diagonal: np.ndarray | None, dtype: str) -> np.ndarray:
    """[groups, N] scales of w [K_padded, N]: max |w| / qmax per group, or, given the
    layer input's second moments (`diagonal`, [K_padded]: E[x_k^2]), the fraction of it
    (SCALE_FRACTIONS) whose rounding to nearest leaves the least error on the output,
    sum_k E[x_k^2] (w - s q)^2, per group. A scale that underflows fp16 (a dead channel's
    near-zero weights) becomes 1: the codes are 0."""
    bound = np.abs(w.reshape(-1, group, w.shape[1])).max(axis=1)

    def scales_at(fraction: float) -> np.ndarray:
        scales = np.where(bound > 0, bound * fraction / qmax, 1.0).astype(dtype)
        return np.where(scales > 0, scales, 1.0).astype(dtype)

    if diagonal is None:
        return scales_at(1.0)
    blocks = w.reshape(-1, group, w.shape[1]).astype(np.float64)
    weight = diagonal.reshape(-1, group, 1)
    best = best_error = None
    for fraction in SCALE_FRACTIONS:
        scales = scales_at(fraction)
        step = scales.astype(np.float64)[:, None, :]
        error = (weight * (blocks - np.clip(np.round(blocks / step), qmin, qmax) * step)
                 ** 2).sum(axis=1)
        if best is None:
            best, best_error = scales, error
        else:
            better = error < best_error
            best, best_error = np.where(better, scales, best), np.minimum(error, best_error)
    return best.astype(dtype)


GROUP_SIZES = (32, 64, 128)
WEIGHT_BITS = (4, 8)


def quantize_groups(weight: np.ndarray, group: int, *, bits: int = 4,
                    moments: InputMoments | None = None,
                    scale_dtype: str = "float16") -> GroupWeight:
    """A matmul weight [K, N] in symmetric `bits`-bit codes, one scale per group of `group`
    reduction elements, rounded by GPTQ when the layer input's moments are given, else to
    nearest. The group's largest magnitude maps to the largest code; with the moments and
    fewer than 8 bits, the scale is fitted (fitted_group_scales)."""
    k, n = weight.shape
    padded = -(-k // group) * group
    w = np.zeros((padded, n), np.float32)
    w[:k] = weight
    qmax, qmin = (1 << (bits - 1)) - 1, -(1 << (bits - 1))
    diagonal = None
    if moments is not None and bits < 8:  # 8 bits: the largest magnitude's step is fine
        diagonal = np.zeros(padded, np.float64)
        diagonal[:k] = np.diagonal(moments.hessian()[0])
    scales = fitted_group_scales(w, group, qmin, qmax, diagonal, scale_dtype)
    per_weight = np.repeat(scales.astype(np.float32), group, axis=0)
    if moments is not None:
        codes = gptq_group_codes(weight, per_weight[:k], moments, qmin, qmax)
        codes = np.concatenate([codes, np.zeros((padded - k, n))]) if padded > k else codes
        rounding = "gptq"
    else:
        codes, rounding = np.clip(np.round(w / per_weight), qmin, qmax), "nearest"
    codes = (codes + (1 << (bits - 1))).astype(np.uint8)
    result = GroupWeight(codes, scales, group, bits, rounding, 0.0)
    return GroupWeight(codes, scales, group, bits, rounding,
                       sqnr_db(weight, result.dequantized(k)))


TABLE_MIN_ELEMENTS = 4096  # smaller tables barely change the file; each rounding costs accuracy


def is_table(value: np.ndarray | None) -> bool:
    """Whether a constant read by a Gather (relax take) on axis 0 is a lookup table worth
    storing in int8: a float matrix of at least TABLE_MIN_ELEMENTS values (an embedding)."""
    return value is not None and value.ndim == 2 and value.dtype == np.float32 and \
        value.size >= TABLE_MIN_ELEMENTS


def quantize_table(table: np.ndarray) -> QuantWeight:
    """A lookup table [rows, width] in int8, one symmetric scale per row (each row is read on
    its own: a token's embedding), rounded to nearest: rows are values, not weights that a
    layer sums, so there is no output error to minimize."""
    scales = weight_scales(table, 0)
    codes = np.clip(np.round(table / scales[:, None]), -127, 127).astype(np.int8)
    return _result(table, codes, scales, 0, "nearest", None)


TABLE_GROUP = 32  # 4-bit tables: values per scale along a row


def stored_table(table: np.ndarray, precision: str) -> np.ndarray:
    """The values a lookup table holds once stored in `precision` (int8 | int4)."""
    if precision == "int4":
        return quantize_groups(table.T, TABLE_GROUP).dequantized(table.shape[1]).T
    return quantize_table(table).dequantized()


def _along(scales: np.ndarray, ndim: int, axis: int | None) -> np.ndarray:
    shape = [1] * ndim
    if axis is not None:
        shape[axis] = -1
    return np.asarray(scales, np.float32).reshape(shape)


def _result(weight, codes, scales, axis, rounding, bias) -> QuantWeight:
    approx = codes * _along(scales, weight.ndim, axis)
    return QuantWeight(codes, np.asarray(scales, np.float32), axis, rounding,
                       None if bias is None else np.asarray(bias, np.float32),
                       sqnr_db(weight, approx))


def weight_error_shift(error: np.ndarray, means: np.ndarray, kind: str) -> np.ndarray:
    """Bias correction: the mean shift of each output that rounding the weights causes,
    error . E[x] (error = dequantized int8 weight - fp32 weight, E[x] the per-channel mean of
    the layer's input over the calibration data). Subtracted from the bias, it removes the
    systematic part of the weight error (Nagel et al., "Data-Free Quantization", 2019)."""
    means = np.asarray(means, dtype=np.float64)
    if kind == "matmul":  # [K, N]
        return (means @ error.astype(np.float64)).astype(np.float32)
    out_channels, per_group = error.shape[0], error.shape[1]
    groups = means.size // per_group
    group_means = means.reshape(groups, per_group)
    of_output = np.repeat(group_means, out_channels // groups, axis=0)  # [O, I/g]
    return np.einsum("oikl,oi->o", error.astype(np.float64), of_output).astype(np.float32)


def sqnr_db(reference: np.ndarray, approx: np.ndarray) -> float:
    noise = float(np.sum((reference.astype(np.float64) - approx) ** 2))
    signal = float(np.sum(reference.astype(np.float64) ** 2))
    if noise == 0:
        return float("inf")
    return 10.0 * np.log10(signal / noise) if signal > 0 else float("-inf")


__all__ = ["CHANNEL_AXIS", "GROUP_SIZES", "GroupWeight", "QuantWeight", "WEIGHT_BITS",
           "TABLE_GROUP", "is_table", "quantize_groups", "quantize_table", "quantize_weight",
           "sqnr_db", "stored_table", "weight_error_shift"]
