"""W4A16: 4-bit weights in groups along the reduction axis, the input and the arithmetic in
float. The codes, two per byte, are widened to float inside the matmul kernel
(schedules/int4_logical.py, `float_te`): (code - zero) * scale, then multiply-accumulate in
fp32. No calibration data: the weight-only 4-bit mode (--quantize int8-weights --weight-bits
4), and how a model that arrives with 4-bit weights (MatMulNBits, blocked DequantizeLinear)
runs with its own codes, scales and zero points, computing what onnxruntime computes.

MatMul/Gemm and pointwise convolutions (as in int4.py); another convolution planned for it by
the whole-model option keeps int8 weights (a warning names it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ..weights import GroupWeight, quantize_groups
from .base import Scheme, SimLayerOp, stays_float
from .weight_only import WeightOnly

if TYPE_CHECKING:
    from ..ops.linear import LayerOp
    from ..realize import Realizer

KERNEL = "int4_float_matmul"


@dataclass(frozen=True)
class Int4Weights(Scheme):
    name = "int4-weights"

    group_size: int = 32
    per_channel: bool = True  # for the int8-weights fallback of a conv

    @classmethod
    def from_settings(cls, settings) -> "Int4Weights":
        return cls(settings.group_size, settings.per_channel)

    @property
    def label(self) -> str:
        return f"int4-g{self.group_size}-weights"

    def emit(self, r: Realizer, layer: LayerOp):
        if layer.unsupported is not None:
            return stays_float(r, layer, layer.unsupported)
        if not layer.takes_rows:  # the plan names the convolutions that keep int8
            return WeightOnly(self.per_channel).emit(r, layer)
        node = layer.node
        weight = layer.row_weight()
        gw = model_codes(r, weight) or quantize_groups(
            weight, self.group_size, moments=r.config.input_moments.get(node.name))
        rows = layer.rows_of(r, r.float_of(node.args[0]))
        out = layer.from_rows(r, r._emit(_kernel(r, rows, gw, int(weight.shape[0]))))
        r.layers.append(layer.result(
            f"int4-g{gw.group}-weights", weight_sqnr_db=gw.sqnr_db, rounding=gw.rounding,
            output_var=node.var, weight_bits=gw.stored_bits(int(weight.shape[0]))))
        return out

    def fake(self, sim: SimLayerOp) -> None:
        if not sim.takes_rows:
            return WeightOnly(self.per_channel).fake(sim)
        sim.set_weight(fake_groups(sim, self.group_size))


def fake_groups(sim: SimLayerOp, group: int, quantize=quantize_groups) -> np.ndarray:
    """The simulated layer's weight (a matmul's [K, N] or a pointwise conv's OIHW) as its
    4-bit groups give it back (`quantize`: how a [K, N] weight becomes a GroupWeight)."""
    weight = sim.weight
    rows = weight[:, :, 0, 0].T if weight.ndim == 4 else weight
    values = quantize(rows, group, moments=sim.moments).dequantized(rows.shape[0])
    return values.T.reshape(weight.shape) if weight.ndim == 4 else values


def model_codes(r: Realizer, weight) -> GroupWeight | None:
    """The 4-bit codes `weight` arrived with (a MatMulNBits or blocked DequantizeLinear
    model), or None."""
    codes = r.config.group_codes
    given = codes.find_groups(weight) if codes is not None else None
    if given is None:
        return None
    # the weight was found by its values, which are these codes' values: no error
    return GroupWeight(given.codes, given.scales, given.group, 4, "given", float("inf"),
                       given.zero_points)


def _kernel(r: Realizer, x, gw: GroupWeight, rows: int):
    from ...schedules.int4_logical import float_te

    const = r.relax.const
    args = [x, const(gw.packed_columns(), "uint8"), const(gw.scales, str(gw.scales.dtype))]
    if gw.zero_points is not None:
        args.append(const(gw.zero_points, str(gw.zero_points.dtype)))

    def te_func(data, codes, scales, *zeros):
        return float_te(data, codes, scales, zeros[0] if zeros else None, gw.group, rows)

    return r.bb.call_te(te_func, *args, primfunc_name_hint=KERNEL)


__all__ = ["Int4Weights", "fake_groups", "model_codes"]
