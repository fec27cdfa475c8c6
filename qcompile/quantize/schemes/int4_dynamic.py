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

import numpy as np

from ..weights import quantize_groups
from .base import Scheme, SimLayerOp, stays_float
from .dynamic import CONVOLUTIONS, run_time_dtype
from .int4 import kernel, with_epilogue
from .int4_weights import model_codes

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
        from ...schedules.int4_logical import GroupTerms

        if layer.unsupported is not None:
            return stays_float(r, layer, layer.unsupported)
        if layer.kind != "matmul":
            return stays_float(r, layer, CONVOLUTIONS)
        node = layer.node
        rows = int(layer.weight.shape[0])
        gw = model_codes(r, layer.weight) or quantize_groups(
            layer.weight, self.group_size, moments=r.config.input_moments.get(node.name))
        data, scales, sums = _grouped_input(r, r.float_of(node.args[0]), gw, rows,
                                            self.activations, gw.zero_points is not None)
        terms = {"row_scales": scales}
        stored = 0  # bytes of the per-output terms
        if str(data.ty.dtype) == "uint8":
            offsets = 128 * gw.group_sums()
            offsets = offsets.astype(np.int16 if np.abs(offsets).max() < 1 << 15 else np.int32)
            terms["offsets"] = r._const(offsets, str(offsets.dtype))
            stored += offsets.nbytes
        if gw.zero_points is not None:
            t = gw.scales.astype(np.float32) * (gw.offset - gw.zeros())
            terms.update(sum_weights=r._const(t, "float32"), row_sums=sums)
            stored += t.nbytes
        result, last, fused = with_epilogue(r, layer, kernel(r, data, gw, GroupTerms(**terms)))
        r.layers.append(layer.result(
            f"int4-g{gw.group}-dynamic", weight_sqnr_db=gw.sqnr_db, rounding=gw.rounding,
            weight_bits=gw.stored_bits(rows, stored), fused=fused, output_var=last.var))
        return result

    def fake(self, sim: SimLayerOp) -> None:
        """The 4-bit weights only: the run-time input rounding is not simulated."""
        if sim.kind == "matmul":
            sim.set_weight(quantize_groups(sim.weight, self.group_size).dequantized(
                sim.weight.shape[0]))


def _grouped_input(r: Realizer, x, gw, rows: int, activations: str, with_sums: bool):
    """(the input's int8 codes as the instruction takes them [..., K_padded], their scales
    [..., groups], each group's sum of codes [..., groups] if `with_sums`, else None): x in
    groups of gw.group along its last axis (padded with zeros up to whole groups), scale
    max |x| / 127 per group; one kernel (int4_logical.group_quantize_te), shared by the
    layers that read the same input in the same groups (a transformer's Q, K and V)."""
    from ...schedules.int4_logical import group_quantize_te

    dtype = run_time_dtype(activations)
    padded = gw.codes.shape[0]
    key = ("groups", x, gw.group, padded, dtype, with_sums)
    if key not in r.quant_cache:
        out = r._emit(r.bb.call_te(group_quantize_te, x, gw.group, padded, dtype, with_sums,
                                   primfunc_name_hint="quantize_groups"))
        parts = [r._emit(r.relax.TupleGetItem(out, i)) for i in range(3 if with_sums else 2)]
        r.quant_cache[key] = (*parts, None)[:3]
    return r.quant_cache[key]


__all__ = ["Int4Dynamic"]
