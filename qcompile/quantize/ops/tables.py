"""Constant lookup tables (an embedding read by Gather, relax take on axis 0): stored in int8
with one scale per row, as onnxruntime's quantizer stores them, or in 4 bits with one fp16
scale per group of 32 values along the row (two codes per byte). The lookup gathers the rows'
codes and scales and multiplies them (fused kernels); the result is float, as the table's float
lookup was."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ..graph import constant_value
from ..values import TableResult
from ..weights import TABLE_GROUP, is_table, quantize_groups, quantize_table
from .registry import handles

if TYPE_CHECKING:
    from ..graph import Node
    from ..realize import Realizer


@handles("take")
def handle_take(r: Realizer, node: Node):
    if r.config.tables not in ("int8", "int4") or len(node.args) < 2:
        return NotImplemented
    table = constant_value(node.args[0])
    if not is_table(table) or int(node.attr("axis", 0) or 0) != 0:
        return NotImplemented
    op, relax = r.relax.op, r.relax
    mode = node.attr("mode", "fast") or "fast"
    indices = r.float_of(node.args[1])
    if r.config.tables == "int4":
        return _int4_lookup(r, node, table, indices, mode)
    q = quantize_table(table)
    codes = r._emit(op.take(relax.const(q.codes, "int8"), indices, axis=0, mode=mode))
    scales = r._emit(op.take(relax.const(q.scales.reshape(-1, 1), "float32"), indices, axis=0,
                             mode=mode))
    r.tables.append(TableResult(node.name, *table.shape, "int8", q.sqnr_db))
    return r._emit(op.multiply(op.astype(codes, "float32"), scales))


def _int4_lookup(r: Realizer, node: Node, table, indices, mode: str):
    """The rows' 4-bit codes (two per byte) and their group scales gathered, the codes split
    into nibbles, centered and scaled: float rows as the table had them."""
    op, relax = r.relax.op, r.relax
    rows, width = table.shape
    q = quantize_groups(table.T, TABLE_GROUP)                    # groups along each row
    pairs = r._emit(op.take(relax.const(q.packed_pairs(), "uint8"), indices, axis=0,
                            mode=mode))                          # [..., width_padded / 2]
    scales = r._emit(op.take(relax.const(np.ascontiguousarray(q.scales.T), str(q.scales.dtype)),
                             indices, axis=0, mode=mode))        # [..., groups]
    low = op.bitwise_and(pairs, relax.const(np.uint8(15), "uint8"))
    high = op.right_shift(pairs, relax.const(np.uint8(4), "uint8"))
    lead = [int(d) for d in node.var.ty.shape][:-1]
    padded, groups = q.codes.shape[0], q.scales.shape[0]
    codes = op.reshape(op.stack([low, high], axis=-1), [*lead, groups, TABLE_GROUP])
    values = op.subtract(op.astype(codes, "float32"), relax.const(np.float32(8), "float32"))
    scaled = op.multiply(values, op.expand_dims(op.astype(scales, "float32"), -1))
    out = op.reshape(scaled, [*lead, padded])
    if padded > width:
        out = op.strided_slice(out, [len(lead)], [0], [width])
    r.tables.append(TableResult(node.name, rows, width, f"int4-g{TABLE_GROUP}", q.sqnr_db))
    return r._emit(out)


__all__ = ["handle_take"]
