"""The quantize/dequantize nodes of a pre-quantized (QDQ) model: a quantize makes its input an
integer tensor with the node's parameters; a dequantize of a matching integer tensor keeps it
an integer tensor until something needs its float value."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ..graph import constant_value
from ..observers import QParams
from ..values import QValue
from .registry import handles

if TYPE_CHECKING:
    from ..graph import Graph, Node
    from ..realize import Realizer


def qdq_params(node: Node) -> QParams | None:
    """The scalar scale and zero point of a quantize/dequantize node (None if per-axis)."""
    scale = constant_value(node.value.args[1])
    zp = constant_value(node.value.args[2])
    if scale is None or zp is None or scale.size != 1 or zp.size != 1:
        return None
    dtype = str(zp.dtype)
    if dtype not in ("uint8", "int8"):
        return None
    return QParams(float(np.float32(scale.reshape(()))), int(zp.reshape(())), dtype)


@handles("quantize")
def handle_quantize(r: Realizer, node: Node):
    qp = qdq_params(node)
    if qp is None:
        return NotImplemented
    return r.quant_of(node.args[0], qp)


@handles("dequantize")
def handle_dequantize(r: Realizer, node: Node):
    x = r.lookup(node.args[0])
    qp = qdq_params(node)
    if not isinstance(x, QValue) or qp is None or qp != x.qp:
        return NotImplemented
    return x  # stays an integer tensor until something needs its float value


def graph_qparams(graph: Graph) -> dict:
    """{var: QParams} of every tensor that a QuantizeLinear quantizes (a QDQ model)."""
    found = {}
    for node in graph.nodes:
        if node.kind == "quantize":
            qp = qdq_params(node)
            if qp is not None:
                found[node.args[0]] = qp
    return found


__all__ = ["graph_qparams", "handle_dequantize", "handle_quantize", "qdq_params"]
