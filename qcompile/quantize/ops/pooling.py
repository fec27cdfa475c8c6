"""Pooling on integer tensors: mean (global average pool) and average pooling rescaled to the
output's scale and requantized; max pooling on the integers themselves."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..values import QValue
from .registry import handles

if TYPE_CHECKING:
    from ..graph import Node
    from ..realize import Realizer


def _rescaled(r: Realizer, node: Node, compute):
    """A linear op on one integer input (mean, average pool): `compute` applied to the input
    centered and rescaled to the output's scale, then requantized."""
    x = r.lookup(node.args[0])
    if not isinstance(x, QValue) or node.var not in r.qparams or not r.wants_integers(node):
        return NotImplemented
    qp = r.qparams[node.var]
    return QValue(r.requantize_float(compute(r.centered(x, x.qp.scale / qp.scale)), qp), qp)


@handles("mean")
def handle_mean(r: Realizer, node: Node):
    axis = [int(a) for a in node.attr("axis")]
    return _rescaled(r, node, lambda x: r.relax.op.mean(
        x, axis=axis, keepdims=bool(node.attr("keepdims"))))


@handles("avg_pool2d")
def handle_avg_pool(r: Realizer, node: Node):
    return _rescaled(r, node, lambda x: r.relax.Call(node.value.op, [x], node.value.attrs))


@handles("max_pool2d")
def handle_max_pool(r: Realizer, node: Node):
    x = r.lookup(node.args[0])
    if not isinstance(x, QValue):
        return NotImplemented
    return QValue(r._emit(r.relax.Call(node.value.op, [x.expr], node.value.attrs)), x.qp)


__all__ = ["handle_avg_pool", "handle_max_pool", "handle_mean"]
