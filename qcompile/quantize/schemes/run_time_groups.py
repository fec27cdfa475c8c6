"""An input quantized at run time in groups along its last axis, for the group kernel
(schedules/int4_logical.py): each row's (token's) group of `group` values gets its own scale,
max |x| / 127, and int8 codes, as llama.cpp's Q8_0 activations do; the kernel takes the
group scales in its group sums. The weight is a weights.GroupWeight in the same groups: 4-bit
codes (int4_dynamic.py) or 8-bit ones (dynamic.py, with `group_size`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .int4 import kernel, with_epilogue

if TYPE_CHECKING:
    from ..ops.linear import LayerOp
    from ..realize import Realizer


def run_time_dtype(activations: str) -> str:
    """The 8-bit type an input quantized at run time takes: the configured one, uint8 for
    anything else."""
    return activations if activations in ("uint8", "int8") else "uint8"


def emit_grouped(r: Realizer, layer: LayerOp, gw, activations: str, label: str):
    """The layer on the group kernel: its weight `gw` (weights.GroupWeight, 4 or 8 bits) times
    its input quantized at run time in the same groups; the layer's result is `label`."""
    from ...schedules.int4_logical import GroupTerms

    data, scales, sums = _grouped_input(r, r.float_of(layer.node.args[0]), gw, activations,
                                        gw.zero_points is not None)
    terms = {"row_scales": scales}
    stored = 0  # bytes of the per-output terms
    if str(data.ty.dtype) == "uint8":
        offsets = gw.group_sums().astype(np.int16)  # |sum| <= 128 * 128: the kernel x 128
        terms["offsets"] = r._const(offsets, "int16")
        stored += offsets.nbytes
    if gw.zero_points is not None:
        t = gw.scales.astype(np.float32) * (gw.offset - gw.zeros())
        terms.update(sum_weights=r._const(t, "float32"), row_sums=sums)
        stored += t.nbytes
    result, last, fused = with_epilogue(r, layer, kernel(r, data, gw, GroupTerms(**terms)))
    r.layers.append(layer.result(
        label, weight_sqnr_db=gw.sqnr_db, rounding=gw.rounding,
        weight_bits=gw.stored_bits(int(layer.weight.shape[0]), stored), fused=fused,
        output_var=last.var))
    return result


def _grouped_input(r: Realizer, x, gw, activations: str, with_sums: bool):
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


__all__ = ["emit_grouped", "run_time_dtype"]
