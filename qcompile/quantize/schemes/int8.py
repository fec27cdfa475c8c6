"""Static int8: an int8 x (u)int8 -> int32 kernel with the requantization fused.

The weight is int8 (symmetric, per output channel or per tensor: weights.py), the input the
calibrated integer tensor, the bias and the input zero point's correction folded into one int32
constant, and the output requantized in the same fused kernel to the next layer's parameters,
with the following ReLU/ReLU6/clip as its integer bounds. When nothing after the layer takes
integers (or it is a model output, e.g. logits), the accumulator is dequantized straight to
float. A 16-bit input (int8_a16.py) runs the same kernel on its two bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ..byte_planes import byte_planes, combined_planes, plane_zero_point
from ..ops.linear import fused_chain
from ..values import QValue
from ..weights import quantize_weight
from .base import Scheme, SimLayerOp, stays_float

if TYPE_CHECKING:
    from ..ops.linear import LayerOp
    from ..realize import Realizer


@dataclass(frozen=True)
class Int8(Scheme):
    name = "int8"
    in_rules = True
    takes_integers = True
    int8_kernel = True
    int8_weights = True

    method: str = "minmax"        # the calibration method of the layer's input
    per_channel: bool = True      # weight scales per output channel
    activations: str = "uint8"    # the layer's input integer type
    symmetric: bool = False

    def emit(self, r: Realizer, layer: LayerOp):
        if layer.unsupported is not None:
            return stays_float(r, layer, layer.unsupported)
        result = _static(r, layer, self.per_channel)
        if result is NotImplemented:
            return stays_float(r, layer, _float_reason(r))
        return result

    def fake(self, sim: SimLayerOp) -> None:
        qp = sim.input_qparams(self)
        sim.round_input(qp)
        qw = quantize_weight(sim.weight, sim.kind, per_channel=self.per_channel, bias=sim.bias,
                             input_scale=None if qp.bits == 16 else qp.scale,
                             moments=sim.moments, means=sim.means)
        sim.set_weight(qw.dequantized())
        bias = qw.bias if qw.bias is not None else np.zeros(qw.channels, np.float32)
        step = (np.float32(qp.scale) * qw.channel_scales()).astype(np.float32)
        sim.set_bias((np.round(bias / step) * step).astype(np.float32))  # the int32 bias


def _float_reason(r: Realizer) -> str:
    if r.config.weight_codes is not None:
        return "the pre-quantized model keeps it in float (no QDQ on its input or weights)"
    return "its input has no calibration"


def _static(r: Realizer, layer: LayerOp, per_channel: bool):
    """The layer as an integer kernel: quantize the weight, fold the bias and the zero-point
    correction, requantize or dequantize the accumulator, fuse the activation bounds.
    NotImplemented when its input has no quantization parameters (or, in a pre-quantized
    model, its weight has no int8 codes)."""
    op = r.relax.op
    node, weight = layer.node, layer.weight
    channels = layer.channels
    last, bias, lo, hi, absorbed = fused_chain(r, node, channels)
    x = node.args[0]
    given_qp = r.config.input_qparams.get(node.name)
    if not r.has_qparams(x) and given_qp is None:
        return NotImplemented
    xq = r.quant_of(x, given_qp)
    given = r.config.weight_codes.find(weight) if r.config.weight_codes is not None else None
    if given is not None and given[2] not in (layer.channel_axis, None):
        given = None
    if given is None and r.config.weight_codes is not None:
        return NotImplemented  # a QDQ model that keeps this layer's weights in float
    in_scale = np.float32(xq.qp.scale)
    wide = xq.qp.bits == 16  # the input runs as two bytes; the correction is added in float
    qw = quantize_weight(weight, node.kind, per_channel=per_channel, bias=bias,
                         input_scale=None if wide else in_scale,
                         moments=r.config.input_moments.get(node.name),
                         means=r.config.input_means.get(x), given=given)
    # int32 constant: bias / (s_x * s_w) - zp_x * sum(w_q) over each output's reduction
    acc_scale = (in_scale * qw.channel_scales()).astype(np.float32)
    zero_point = plane_zero_point(xq.qp, r.config.plane_dtype) if wide else xq.qp.zero_point
    correction = -np.int64(zero_point) * qw.codes.astype(np.int64).sum(axis=layer.reduce_axes)
    if qw.bias is not None:
        correction = correction + np.round(qw.bias / acc_scale).astype(np.int64)
    acc = layer.accumulate(r, xq, qw.codes,
                           split=(lambda data: byte_planes(r, data, xq.qp)) if wide else None)
    bshape = [1] * len(last.shape)
    bshape[1 if node.kind == "conv2d" else len(last.shape) - 1] = channels
    if wide:
        accf = combined_planes(r, acc, correction.astype(np.float32).reshape(bshape))
    else:
        acc = r._emit(op.add(acc, r._const(correction.astype(np.int32).reshape(bshape),
                                           "int32")))
        accf = op.astype(acc, "float32")
    r.absorbed.update(absorbed)
    output_qp = None
    if r.wants_integers(last) and last.var in r.qparams:
        output_qp = r.qparams[last.var]
        multiplier = (acc_scale / np.float32(output_qp.scale)).astype(np.float32)
        lo_q = None if lo is None else output_qp.zero_point + int(np.round(lo / output_qp.scale))
        hi_q = None if hi is None else output_qp.zero_point + int(np.round(hi / output_qp.scale))
        out = QValue(r.requantize_float(
            op.multiply(accf, r._const(multiplier.reshape(bshape), "float32")),
            output_qp, lo_q, hi_q), output_qp)
    else:
        real = op.multiply(accf, r._const(acc_scale.reshape(bshape), "float32"))
        if lo is not None or hi is not None:
            real = r.clamp(real, lo, hi)
        out = r._emit(real)
    r.layers.append(layer.result(
        "int8-a16" if wide else "int8", input_qp=xq.qp, output_qp=output_qp,
        weight_scales=tuple(float(s) for s in qw.scales), weight_sqnr_db=qw.sqnr_db,
        rounding=qw.rounding, fused=tuple(r.graph.nodes[i].name for i in absorbed),
        output_var=last.var))
    r.env[last.var] = out
    return out


__all__ = ["Int8"]
