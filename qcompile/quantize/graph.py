"""A read-only view of the imported model's dataflow: nodes in order, what each computes (in
the terms quantization cares about), and who consumes each value.

ONNX Clip arrives as R.maximum / R.minimum with a constant bound (the frontend rewrites the
importer's call_tir kernels); `kind_of` names those "max" / "min" with their bound.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

# Relax op name -> the kind of node the quantizer reasons about.
_OP_KINDS = {
    "relax.nn.conv2d": "conv2d",
    "relax.matmul": "matmul",
    "relax.add": "add",
    "relax.nn.relu": "relu",
    "relax.clip": "clip",
    "relax.mean": "mean",
    "relax.nn.max_pool2d": "max_pool2d",
    "relax.nn.avg_pool2d": "avg_pool2d",
    "relax.nn.adaptive_avg_pool2d": "adaptive_avg_pool2d",
    "relax.concat": "concat",
    "relax.reshape": "reshape",
    "relax.permute_dims": "permute_dims",
    "relax.flatten": "flatten",
    "relax.squeeze": "squeeze",
    "relax.expand_dims": "expand_dims",
    "relax.quantize": "quantize",
    "relax.dequantize": "dequantize",
    "relax.take": "take",
}


@dataclass
class Node:
    """One binding `var = call(...)` of the model's dataflow block."""

    index: int
    var: Any                      # relax.Var
    value: Any                    # the bound expression
    kind: str                     # see _OP_KINDS; "max"/"min" for a clip bound; else "other"
    args: tuple = ()              # tensor arguments (relax exprs)
    bound: float | None = None    # for "max"/"min": the constant bound
    consumers: list["Node"] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.var.name

    @property
    def shape(self) -> tuple:
        """ints; a length known only at run time (a decoder's tokens) stays its PrimExpr."""
        return tuple(int(d.value) if isinstance(getattr(d, "value", None), int) else d
                     for d in self.var.ty.shape)

    @property
    def dtype(self) -> str:
        return str(self.var.ty.dtype)

    def attr(self, name: str, default=None):
        attrs = getattr(self.value, "attrs", None)
        value = getattr(attrs, name, default) if attrs is not None else default
        return str(value) if hasattr(value, "startswith") or type(value).__name__ == "String" \
            else value


def constant_value(expr) -> np.ndarray | None:
    import tvm

    if isinstance(expr, tvm.ir.expr.GenericConst):
        return expr.value.numpy()
    return None


def _scalar(expr) -> float | None:
    value = constant_value(expr)
    if value is not None and value.size == 1:
        return float(value.reshape(()))
    return None


def kind_of(value) -> tuple[str, tuple, float | None]:
    """(kind, tensor args, bound) of a bound expression."""
    import tvm
    from tvm import relax

    if not isinstance(value, relax.Call):
        return "other", (), None
    op = value.op
    if isinstance(op, tvm.ir.Op):
        if op.name == "relax.call_tir":
            call_args = value.args[1]
            fields = tuple(call_args.fields) if isinstance(call_args, relax.Tuple) else ()
            return "other", fields, None
        if op.name in ("relax.maximum", "relax.minimum") and _scalar(value.args[1]) is not None:
            return ("max" if op.name == "relax.maximum" else "min"), (value.args[0],), \
                _scalar(value.args[1])
        kind = _OP_KINDS.get(op.name, "other")
        args = value.args
        if kind == "concat":
            args = tuple(args[0].fields)
        return kind, tuple(args), None
    return "other", tuple(value.args), None


@dataclass
class Graph:
    """The bindings of `main`'s single dataflow block, with consumers and graph outputs."""

    function: Any
    nodes: list[Node]
    by_var: dict
    outputs: set  # vars returned by the function
    output_list: tuple = ()  # the returned exprs in order (a tuple's fields)
    returns_tuple: bool = False

    def node_of(self, expr) -> Node | None:
        return self.by_var.get(expr)

    def consumers(self, expr) -> list[Node]:
        node = self.by_var.get(expr)
        if node is not None:
            return node.consumers
        return [n for n in self.nodes if any(a.same_as(expr) for a in n.args)]


def read_graph(mod) -> Graph:
    from tvm import relax

    function = mod["main"]
    body = function.body
    if not isinstance(body, relax.SeqExpr) or len(body.blocks) != 1 or \
            not isinstance(body.blocks[0], relax.DataflowBlock):
        raise ValueError("expected main() to be one dataflow block")
    nodes: list[Node] = []
    by_var: dict = {}
    for i, binding in enumerate(body.blocks[0].bindings):
        kind, args, bound = kind_of(binding.value)
        node = Node(i, binding.var, binding.value, kind, args, bound)
        nodes.append(node)
        by_var[binding.var] = node
        for arg in args:
            producer = by_var.get(arg)
            if producer is not None:
                producer.consumers.append(node)
    result = body.body
    # TVM's importer returns a var bound to the tuple of outputs (`gv = (a, b); return gv`)
    tuple_value = result if isinstance(result, relax.Tuple) else \
        getattr(by_var.get(result), "value", None)
    if isinstance(tuple_value, relax.Tuple):
        output_list, returns_tuple = tuple(tuple_value.fields), True
    else:
        output_list, returns_tuple = (result,), False
    return Graph(function, nodes, by_var, set(output_list), output_list, returns_tuple)


def relax_flow(graph: Graph):
    """The graph as a flow.Flow: tensors are Relax vars, layers named by their var."""
    from tvm import relax

    from .flow import LAYER_KINDS, Flow, FlowNode

    nodes = []
    for node in graph.nodes:
        layer = node.name if node.kind in LAYER_KINDS and len(node.args) > 1 and \
            constant_value(node.args[1]) is not None else None
        inputs = tuple(a for a in node.args if isinstance(a, relax.Var))
        nodes.append(FlowNode(node.kind, inputs, node.var, layer))
    return Flow.of(nodes, graph.outputs)
