"""W4A8 without calibration: 4-bit weights in groups along the reduction axis, multiplied on the
int8 dot-product instructions with an input quantized at run time in the same groups: each
row's (token's) group of `group` input values gets its own scale, max |x| / 127, and int8
codes, as llama.cpp's Q8_0 activations do. One scale per row instead costs a language model
most of its accuracy: a few input channels are orders of magnitude larger than the rest.

The weight is what the W4A8 scheme stores (int4.py: symmetric codes, two per byte, one fp16
scale per group; or the codes a 4-bit model arrived with). The kernel is the same, with the
input's group scales applied in its group sums (int4_logical.GroupTerms):

    y[m, n] = sum_g sx[m, g] * (scale[g, n] * (acc[m, g, n] - offset[g, n]) + t[g, n] s[m, g])

offset: 128 times the group's codes less 8, where the instruction takes the input as uint8
(x86 VNNI: the int8 codes plus 128), exact in the int32 accumulator; t: a weight's own zero
points, scale * (8 - zero), times s, the group's sum of the input's codes. MatMul/Gemm only:
a convolution stays fp32, as in dynamic int8.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..weights import quantize_groups
from .base import Scheme, SimLayerOp, stays_float
from .dynamic import CONVOLUTIONS
from .int4_weights import model_codes
from .run_time_groups import emit_grouped

if TYPE_CHECKING:
    from ..ops.linear import LayerOp
    from ..realize import Realizer


@dataclass(frozen=True)
class Int4Dynamic(Scheme):
    name = "int4-dynamic"
    int8_kernel = True
    covers_convs = False

    group_size: int = 32
    activations: str = "uint8"  # the run-time input type: uint8 (x86 VNNI) or int8 (ARM)

    @classmethod
    def from_settings(cls, settings) -> "Int4Dynamic":
        return cls(settings.group_size, settings.activations)

    @property
    def label(self) -> str:
        return f"int4-g{self.group_size}-dynamic"

    def emit(self, r: Realizer, layer: LayerOp):
        if layer.unsupported is not None:
            return stays_float(r, layer, layer.unsupported)
        if layer.kind != "matmul":
            return stays_float(r, layer, CONVOLUTIONS)
        gw = model_codes(r, layer.weight) or quantize_groups(
            layer.weight, self.group_size, moments=r.config.input_moments.get(layer.node.name))
        return emit_grouped(r, layer, gw, self.activations, f"int4-g{gw.group}-dynamic")

    def fake(self, sim: SimLayerOp) -> None:
        """The 4-bit weights only: the run-time input rounding is not simulated."""
        if sim.kind == "matmul":
            sim.set_weight(quantize_groups(sim.weight, self.group_size).dequantized(
                sim.weight.shape[0]))


__all__ = ["Int4Dynamic"]
