"""Elementwise ops on integer tensors: add (both inputs rescaled to the output's scale, then
requantized), and the bounds (relu, max/min with a constant, clip) as integer clamps."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ..graph import constant_value
from ..values import QValue
from .registry import handles, integer_inputs

if TYPE_CHECKING:
    from ..graph import Node
    from ..realize import Realizer


def _shape(expr) -> tuple[int, ...]:
    return tuple(int(d) for d in expr.ty.shape)


@handles("add")
def handle_add(r: Realizer, node: Node):
    a, b = node.args
    if constant_value(a) is not None or constant_value(b) is not None or \
            not integer_inputs(r, node) or not r.wants_integers(node) or \
            node.var not in r.qparams or \
            not (r.has_qparams(a) and r.has_qparams(b)) or node.shape != _shape(a) or \
            node.shape != _shape(b):
        return NotImplemented
    qp = r.qparams[node.var]
    qa, qb = r.quant_of(a), r.quant_of(b)
    op = r.relax.op
    total = op.add(r.centered(qa, qa.qp.scale / qp.scale), r.centered(qb, qb.qp.scale / qp.scale))
    return QValue(r.requantize_float(total, qp), qp)


@handles("relu", "max", "min", "clip")
def handle_clip(r: Realizer, node: Node):
    x = r.lookup(node.args[0])
    if not isinstance(x, QValue):
        return NotImplemented
    qp = x.qp
    if node.kind == "relu":
        lo, hi = 0.0, None
    elif node.kind == "max":
        lo, hi = node.bound, None
    elif node.kind == "min":
        lo, hi = None, node.bound
    else:
        lo, hi = (float(getattr(v, "value", v)) for v in node.value.args[1:3])
    lo_q = qp.qmin if lo is None else max(qp.qmin, qp.zero_point + int(np.round(lo / qp.scale)))
    hi_q = qp.qmax if hi is None else min(qp.qmax, qp.zero_point + int(np.round(hi / qp.scale)))
    return QValue(r._emit(r.clamp(x.expr, lo_q, hi_q, qp.dtype)), qp)


__all__ = ["handle_add", "handle_clip"]
