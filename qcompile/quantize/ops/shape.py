"""Ops that move integers without changing them (reshape, transpose, flatten, squeeze,
expand_dims: parameters kept), and concat (every input requantized to the output's)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..flow import SAME_PARAMS_KINDS
from ..values import QValue
from .registry import handles, integer_inputs

if TYPE_CHECKING:
    from ..graph import Node
    from ..realize import Realizer

RESHAPES = SAME_PARAMS_KINDS - {"max_pool2d"}


@handles(*sorted(RESHAPES))
def handle_pass_through(r: Realizer, node: Node):
    x = r.lookup(node.args[0])
    if not isinstance(x, QValue):
        return NotImplemented
    relax = r.relax
    value = node.value
    return QValue(r._emit(relax.Call(value.op, [x.expr, *value.args[1:]], value.attrs,
                                     value.ty_args)), x.qp)


@handles("concat")
def handle_concat(r: Realizer, node: Node):
    if not integer_inputs(r, node) or node.var not in r.qparams or \
            not r.wants_integers(node) or not all(r.has_qparams(a) for a in node.args):
        return NotImplemented
    qp = r.qparams[node.var]
    parts = [r.quant_of(a, qp).expr for a in node.args]
    return QValue(r._emit(r.relax.op.concat(parts, axis=int(node.attr("axis")))), qp)


__all__ = ["RESHAPES", "handle_concat", "handle_pass_through"]
