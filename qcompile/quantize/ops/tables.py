"""Constant lookup tables (an embedding read by Gather, relax take on axis 0): stored in int8
with one scale per row, as onnxruntime's quantizer stores them. The lookup gathers the rows'
codes and scales and multiplies them (one fused kernel); the result is float, as the table's
float lookup was."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..graph import constant_value
from ..values import TableResult
from ..weights import is_table, quantize_table
from .registry import handles

if TYPE_CHECKING:
    from ..graph import Node
    from ..realize import Realizer


@handles("take")
def handle_take(r: Realizer, node: Node):
    if r.config.tables != "int8" or len(node.args) < 2:
        return NotImplemented
    table = constant_value(node.args[0])
    if not is_table(table) or int(node.attr("axis", 0) or 0) != 0:
        return NotImplemented
    op, relax = r.relax.op, r.relax
    q = quantize_table(table)
    mode = node.attr("mode", "fast") or "fast"
    indices = r.float_of(node.args[1])
    codes = r._emit(op.take(relax.const(q.codes, "int8"), indices, axis=0, mode=mode))
    scales = r._emit(op.take(relax.const(q.scales.reshape(-1, 1), "float32"), indices, axis=0,
                             mode=mode))
    r.tables.append(TableResult(node.name, *table.shape, "int8", q.sqnr_db))
    return r._emit(op.multiply(op.astype(codes, "float32"), scales))


__all__ = ["handle_take"]
