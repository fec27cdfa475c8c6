"""The realizer's op-handler registry: node kind -> handler, and the float default.

A handler takes the Realizer and a graph.Node and returns the node's value in the realized
graph: a float expr, a values.QValue (an integer tensor), or NotImplemented, after which the
node is re-emitted in float (handle_float) with its integer inputs dequantized.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from ..values import QValue

if TYPE_CHECKING:
    from ..graph import Node
    from ..realize import Realizer

Handler = Callable[["Realizer", "Node"], Any]
HANDLERS: dict[str, Handler] = {}


def handles(*kinds: str):
    def register(fn: Handler) -> Handler:
        for kind in kinds:
            HANDLERS[kind] = fn
        return fn
    return register


def handle_float(r: Realizer, node: Node):
    """Re-emit the node in float, its tensor arguments dequantized where needed."""
    relax = r.relax
    value = node.value

    def subst(expr):
        if isinstance(expr, relax.Var):
            return r.float_of(expr)
        if isinstance(expr, relax.Tuple):
            return relax.Tuple([subst(f) for f in expr.fields])
        if isinstance(expr, relax.TupleGetItem):  # a field of a tuple (split's outputs)
            return relax.TupleGetItem(subst(expr.tuple_value), expr.index)
        return expr

    if node.kind == "dequantize" and isinstance(r.lookup(node.args[0]), QValue):
        # the integer tensor itself, not its float value
        q = r.lookup(node.args[0])
        new = relax.Call(value.op, [q.expr, *value.args[1:]], value.attrs, value.ty_args)
    elif isinstance(value, relax.Call):
        new = relax.Call(value.op, [subst(a) for a in value.args], value.attrs,
                         value.ty_args)
    else:
        new = subst(value)
    return r._emit(new)


def integer_inputs(r: Realizer, node: Node) -> bool:
    """Whether any argument of `node` is already an integer tensor."""
    return any(isinstance(r.lookup(a), QValue) for a in node.args)


__all__ = ["HANDLERS", "Handler", "handle_float", "handles", "integer_inputs"]
