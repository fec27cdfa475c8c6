"""Dynamic int8, for MatMul/Gemm (transformers, whose activation ranges change per input):
int8 weights (per output column), the input quantized at run time with a scale and zero point
per row (per token) from the row's own min and max (onnxruntime's DynamicQuantizeLinear on
each row: one range for the whole tensor lets one token's large values cost every other
token its resolution, and makes a token's result depend on the tokens batched with it), an
int8 x int8 -> int32 matmul, and the zero point's correction and both scales applied to the
accumulator. With `group_size` (a language model, whose few very large input channels one
scale per row cannot hold beside the rest: decoder/compile.py sets it), the input is
quantized per row in groups along K instead, symmetric, and the weights scaled per group,
on the 4-bit layers' kernel (run_time_groups.py). Convolutions stay fp32. No calibration
data."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ..weights import quantize_groups, quantize_weight
from .base import Scheme, SimLayerOp, stays_float
from .run_time_groups import emit_grouped, run_time_dtype

if TYPE_CHECKING:
    from ..ops.linear import LayerOp
    from ..realize import Realizer


CONVOLUTIONS = ("dynamic quantization covers MatMul/Gemm; convolutions need static int8 "
                "(--quantize int8 with calibration)")  # why a conv stays fp32


@dataclass(frozen=True)
class Dynamic(Scheme):
    name = "int8-dynamic"
    int8_kernel = True
    int8_weights = True
    covers_convs = False

    per_channel: bool = True
    activations: str = "uint8"  # the run-time input type: uint8 (x86 VNNI) or int8 (ARM)
    group_size: int = 0  # > 0: the input in groups along K, the weight's scales the same

    @property
    def label(self) -> str:
        return f"int8-g{self.group_size}-dynamic" if self.group_size else self.name

    def emit(self, r: Realizer, layer: LayerOp):
        if layer.unsupported is not None:
            return stays_float(r, layer, layer.unsupported)
        if layer.kind != "matmul":
            return stays_float(r, layer, CONVOLUTIONS)
        if self.group_size:
            gw = quantize_groups(layer.weight, self.group_size, bits=8,
                                 moments=r.config.input_moments.get(layer.node.name))
            return emit_grouped(r, layer, gw, self.activations, self.label)
        op = r.relax.op
        f32 = "float32"
        xq, scale, zp = quantized_at_run_time(r, r.float_of(layer.node.args[0]),
                                              self.activations)
        qw = quantize_weight(layer.weight, "matmul", per_channel=self.per_channel,
                             moments=r.config.input_moments.get(layer.node.name))
        w_q, s_w = qw.codes, qw.channel_scales()
        acc = r._emit(op.matmul(xq, r._const(w_q, "int8"), out_dtype="int32"))
        column_sums = w_q.astype(np.int32).sum(axis=0)
        acc = op.subtract(acc, op.multiply(op.astype(zp, "int32"),
                                           r._const(column_sums, "int32")))
        out = r._emit(op.multiply(op.astype(acc, f32), op.multiply(scale, r._const(s_w, f32))))
        r.layers.append(layer.result("int8-dynamic", weight_scales=tuple(float(v) for v in s_w),
                                     weight_sqnr_db=qw.sqnr_db, rounding=qw.rounding,
                                     output_var=layer.node.var))
        return out

    def fake(self, sim: SimLayerOp) -> None:
        """The int8 weights only: the run-time input rounding is not simulated."""
        if self.group_size and sim.kind == "matmul":
            return sim.set_weight(quantize_groups(sim.weight, self.group_size, bits=8)
                                  .dequantized(sim.weight.shape[0]))
        sim.set_weight(quantize_weight(sim.weight, sim.kind,
                                       per_channel=self.per_channel).dequantized())


def quantized_at_run_time(r: Realizer, x, activations: str):
    """(x in 8 bits, its scale, its zero point as a float) computed in the graph from each
    row's own minimum and maximum (the last axis reduced, with 0 in the range so that 0 is
    exact; scale and zero point [..., 1])."""
    op = r.relax.op
    dtype = run_time_dtype(activations)
    qmin, qmax = (0, 255) if dtype == "uint8" else (-128, 127)
    f32 = "float32"
    lo = op.minimum(op.min(x, axis=[-1], keepdims=True), r._const(0.0, f32))
    hi = op.maximum(op.max(x, axis=[-1], keepdims=True), r._const(0.0, f32))
    scale = r._emit(op.maximum(op.divide(op.subtract(hi, lo), r._const(qmax - qmin, f32)),
                               r._const(np.finfo(np.float32).tiny, f32)))
    zp = r._emit(r.clamp(op.round(op.subtract(r._const(qmin, f32), op.divide(lo, scale))),
                         qmin, qmax))
    xq = op.astype(r.clamp(op.add(op.round(op.divide(x, scale)), zp), qmin, qmax), dtype)
    return r._emit(xq), scale, zp


__all__ = ["CONVOLUTIONS", "Dynamic", "quantized_at_run_time"]
