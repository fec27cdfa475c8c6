"""Weight-only int8: weights stored as int8 with per-channel scales, activations and arithmetic
in fp32; the per-channel scale multiplies the output (conv and matmul are linear in each output
channel). About 4x smaller, accuracy close to fp32, no calibration data."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..weights import quantize_weight
from .base import Scheme, SimLayerOp, stays_float

if TYPE_CHECKING:
    from ..ops.linear import LayerOp
    from ..realize import Realizer


@dataclass(frozen=True)
class WeightOnly(Scheme):
    name = "int8-weights"
    int8_weights = True

    per_channel: bool = True

    def emit(self, r: Realizer, layer: LayerOp):
        if layer.unsupported is not None:
            return stays_float(r, layer, layer.unsupported)
        node = layer.node
        qw = quantize_weight(layer.weight, node.kind, per_channel=self.per_channel,
                             moments=r.config.input_moments.get(node.name))
        scale_shape = [1] * len(node.shape)
        scale_shape[1 if node.kind == "conv2d" else len(node.shape) - 1] = layer.channels
        out = r._emit(layer.float_accumulating(r, r.float_of(node.args[0]),
                                               r._const(qw.codes, "int8")))
        out = r._emit(r.relax.op.multiply(out, r._const(
            qw.channel_scales().reshape(scale_shape), "float32")))
        r.layers.append(layer.result("int8-weights",
                                     weight_scales=tuple(float(v) for v in qw.scales),
                                     weight_sqnr_db=qw.sqnr_db, rounding=qw.rounding,
                                     output_var=node.var))
        return out

    def fake(self, sim: SimLayerOp) -> None:
        sim.set_weight(quantize_weight(sim.weight, sim.kind,
                                       per_channel=self.per_channel).dequantized())


__all__ = ["WeightOnly"]
