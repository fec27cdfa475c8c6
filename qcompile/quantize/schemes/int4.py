"""W4A8: 4-bit weights in groups along the reduction axis, multiplied with the calibrated int8
input on the int8 dot-product instructions.

The weight is stored as symmetric 4-bit codes, two per byte, with one fp16 scale per group of
`group_size` reduction elements (weights.quantize_groups: GPTQ with the calibration moments,
else round to nearest): 4.5 bits per weight with groups of 32. The kernel (emitted here in its
logical form, schedules/cpu/packed_int4.py; packed for the target's instruction when lowered)
accumulates each group exactly in int32 and scales the groups' sums in float; the input's
scale, the bias and the following ReLU/clip bounds are applied after it, and the output is
float, or, where the next ops take integers, quantized to their parameters in the same kernel.

MatMul/Gemm, and pointwise convolutions (1x1, one group, no padding: a matmul over the
channels of each pixel, read as NHWC). Any other convolution planned int4 by the whole-model
option stays int8 (a warning names it; a rule asking for it is refused by the plan).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ..ops.linear import fused_chain
from ..values import QValue
from ..weights import quantize_groups
from .base import Scheme, SimLayerOp, stays_float
from .int4_weights import fake_groups, model_codes
from .int8 import Int8

if TYPE_CHECKING:
    from ..ops.linear import LayerOp
    from ..realize import Realizer

log = logging.getLogger(__name__)

KERNEL = "int4_matmul"


@dataclass(frozen=True)
class Int4(Scheme):
    name = "int4"
    in_rules = True
    takes_integers = True
    int8_kernel = True   # its MACs are int8 x int8 on the dot-product instruction

    method: str = "minmax"
    per_channel: bool = True      # for the int8 fallback of a conv
    activations: str = "uint8"
    symmetric: bool = False
    group_size: int = 32

    @classmethod
    def from_settings(cls, settings) -> "Int4":
        return cls(settings.method, settings.per_channel, settings.activations,
                   settings.symmetric, settings.group_size)

    @property
    def label(self) -> str:
        return f"{self.name}-g{self.group_size}"

    def _int8(self) -> Int8:
        return Int8(self.method, self.per_channel, self.activations, self.symmetric)

    def emit(self, r: Realizer, layer: LayerOp):
        if layer.unsupported is not None:
            return stays_float(r, layer, layer.unsupported)
        node = layer.node
        x = node.args[0]
        given_qp = r.config.input_qparams.get(node.name)
        if not layer.takes_rows or (given_qp is not None and given_qp.bits == 16):
            if layer.takes_rows:  # the plan names the convolutions that stay int8
                log.warning("layer %s: no 4-bit kernel for a 16-bit input; it stays int8",
                            node.name)
            return self._int8().emit(r, layer)
        if not r.has_qparams(x) and given_qp is None:
            return stays_float(r, layer, "its input has no calibration")
        xq = r.quant_of(x, given_qp)
        if xq.qp.bits == 16:
            return self._int8().emit(r, layer)
        weight = layer.row_weight()
        gw = self.group_weight(r, weight, node.name)
        data = _padded(r, layer.rows_of(r, xq.expr), gw, int(weight.shape[0]),
                       float(xq.qp.zero_point))
        out = kernel(r, data, gw)
        op = r.relax.op
        shift = np.float64(xq.qp.zero_point) * zero_point_weights(gw)
        if gw.zero_points is not None:  # the kernel centres codes on 8: add (8 - zero) x
            out = op.add(out, zero_point_term(r, data, gw))
        real = op.multiply(op.subtract(out, r._const(shift.astype(np.float32), "float32")),
                           r._const(np.float32(xq.qp.scale), "float32"))
        result, last, fused = with_epilogue(r, layer, real, integers=True)
        r.layers.append(layer.result(
            f"{self.name}-g{gw.group}", input_qp=xq.qp, weight_sqnr_db=gw.sqnr_db,
            rounding=gw.rounding, weight_bits=stored_bits(gw, int(weight.shape[0])),
            fused=fused, output_var=last.var,
            output_qp=result.qp if isinstance(result, QValue) else None,
            palette=() if gw.palette is None else tuple(int(v) for v in gw.palette)))
        return result

    def fake(self, sim: SimLayerOp) -> None:
        if not sim.takes_rows:
            return self._int8().fake(sim)
        qp = sim.input_qparams(self)
        if qp.bits == 16:
            return self._int8().fake(sim)
        sim.round_input(qp)
        sim.set_weight(self.fake_weight(sim))

    def group_weight(self, r: Realizer, weight: np.ndarray, layer: str):
        """The layer's weight [K, N] in groups: the model's own 4-bit codes, else ours."""
        return model_codes(r, weight) or quantize_groups(
            weight, self.group_size, moments=r.config.input_moments.get(layer))

    def fake_weight(self, sim: SimLayerOp) -> np.ndarray:
        """The simulated layer's weight as its groups give it back."""
        return fake_groups(sim, self.group_size)


def with_epilogue(r: Realizer, layer: LayerOp, real, integers: bool = False):
    """The layer's float output `real` (rows: LayerOp.rows_of) with the bias and the bounds of
    the ops it absorbs (ops.linear.fused_chain) applied, in the layer's output layout: (the
    result, the last node absorbed, their names). `integers`: where the next ops take integers
    (flow.py), the result is quantized here, inside the kernel (a QValue), as the next layer
    would have quantized the float: the same integers, without a float tensor between."""
    op = r.relax.op
    last, bias, lo, hi, absorbed = fused_chain(r, layer.node, layer.channels)
    if bias is not None:
        real = op.add(real, r._const(bias, "float32"))
    qp = r.qparams.get(last.var) if integers and r.wants_integers(last) else None
    if qp is not None:
        lo_q = None if lo is None else qp.zero_point + int(np.round(lo / qp.scale))
        hi_q = None if hi is None else qp.zero_point + int(np.round(hi / qp.scale))
        rows = r.requantize_float(op.divide(real, r._const(qp.scale, "float32")), qp, lo_q,
                                  hi_q)
        result = QValue(layer.from_rows(r, rows), qp)
    else:
        if lo is not None or hi is not None:
            real = r.clamp(real, lo, hi)
        result = layer.from_rows(r, r._emit(real))
    r.absorbed.update(absorbed)
    r.env[last.var] = result
    return result, last, tuple(r.graph.nodes[i].name for i in absorbed)


def _padded(r: Realizer, data, gw, k: int, zero_point: float):
    """The integer input with its reduction padded with the zero point up to whole groups."""
    padded = gw.codes.shape[0]
    if padded == k:
        return data
    ndim = len(data.ty.shape)
    return r._emit(r.relax.op.nn.pad(data, [0, 0] * (ndim - 1) + [0, padded - k],
                                     pad_value=zero_point))


def kernel(r: Realizer, data, gw, terms=None):
    """The logical W4A8 kernel (for 8-bit weights, the same on their values; for palette
    codes, on the palette's values) on the integer input `data` (its reduction whole groups):
    float sums of each group's int32 dot product times its scale, and `terms`
    (int4_logical.GroupTerms of relax exprs) if given."""
    from ...schedules.int4_logical import FUNC_ATTR, PALETTE_ATTR, TERMS_ATTR, logical_te

    names = terms.present() if terms is not None else []
    codes = gw.packed_pairs() if gw.bits == 4 else gw.values().T.astype(np.int8)
    palette = {} if gw.palette is None else {"palette": r.relax.const(gw.palette, "int8")}
    call = r.bb.call_te(logical_te, data, r.relax.const(np.ascontiguousarray(codes)),
                        r.relax.const(gw.scales, str(gw.scales.dtype)), gw.group,
                        *(terms.args() if terms is not None else []), names=names,
                        primfunc_name_hint=KERNEL, **palette)
    gvar = call.args[0]
    func = r.bb.get()[gvar].with_attr(FUNC_ATTR, gw.group)
    if gw.palette is not None:
        func = func.with_attr(PALETTE_ATTR, 1)
    r.bb.update_func(gvar, func.with_attr(TERMS_ATTR, ",".join(names)))
    return r._emit(call)


def zero_point_weights(gw) -> np.ndarray:
    """[N] float64: what one unit of the input's zero point adds to each output,
    sum_g scale[g, n] * (the group's sum of codes less their zero); the input's zero point
    times it is subtracted from the kernel's output."""
    centred = gw.group_sums() + gw.group * (gw.offset - gw.zeros().astype(np.float64))
    return np.einsum("gn,gn->n", gw.scales.astype(np.float64), centred)


def stored_bits(gw, rows: int) -> float:
    """Bits per weight as the W4A8 kernel stores them: codes, fp16 scales, and for zero points
    the float32 [groups, N] product that replaces them (zero_point_term)."""
    return gw.stored_bits(rows, None if gw.zero_points is None else 4 * gw.scales.size)


def zero_point_term(r: Realizer, data, gw):
    """sum_g scale[g, n] * (8 - zero[g, n]) * (the sum of the integer input over group g): what
    the kernel, which takes every code less 8, misses of a weight with its own zero points."""
    op = r.relax.op
    shape = list(data.ty.shape)  # the rows may be known only at run time
    groups = int(shape[-1]) // gw.group
    sums = r._emit(op.sum(op.reshape(op.astype(data, "int32"),
                                     [*shape[:-1], groups, gw.group]), axis=[-1]))
    weight = gw.scales.astype(np.float32) * (gw.offset - gw.zeros())
    return r._emit(op.matmul(op.astype(sums, "float32"), r._const(weight, "float32")))


__all__ = ["Int4", "kernel", "stored_bits", "with_epilogue", "zero_point_term",
           "zero_point_weights"]
