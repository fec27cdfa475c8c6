"""The fake-quantized copy of an ONNX model that the simulator runs: its nodes rewritten one
by one (Q/DQ pairs, fp16 casts, weights and biases replaced), and the view of one weighted node
that schemes fake themselves on (schemes.base.SimLayerOp)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .observers import WIDE_DTYPES as WIDE, QParams
from .onnx_view import takes_rows

if TYPE_CHECKING:
    from .onnx_view import SimLayer
    from .simulate import Simulator

class Rewrite:
    """The nodes of a fake-quantized copy of a graph, as they are rewritten one by one."""

    def __init__(self, graph):
        self.graph = graph
        self.inits = {i.name: i for i in graph.initializer}
        self.nodes: list = []
        self.made: dict = {}
        self.after: list = []  # nodes to insert after the current one

    def qdq(self, tensor: str, qp: QParams) -> str:
        """`tensor` through a QuantizeLinear -> DequantizeLinear pair with `qp` (a 16-bit one
        in float arithmetic); the pair's output name. Made once per tensor and parameters."""
        from onnx import helper, numpy_helper

        key = (tensor, qp)
        if key not in self.made:
            base = f"{tensor}__{len(self.made)}"
            if qp.bits == 16:
                self.nodes.extend(_float_qdq(self.graph, tensor, qp, base))
            else:
                scale = numpy_helper.from_array(np.array(qp.scale, np.float32), base + "_s")
                zp = numpy_helper.from_array(np.array(qp.zero_point, qp.dtype), base + "_z")
                self.graph.initializer.extend([scale, zp])
                self.nodes.append(helper.make_node("QuantizeLinear",
                                                   [tensor, scale.name, zp.name], [base + "_q"]))
                self.nodes.append(helper.make_node("DequantizeLinear",
                                                   [base + "_q", scale.name, zp.name],
                                                   [base + "_dq"]))
            self.made[key] = base + "_dq"
        return self.made[key]

    def half(self, tensor: str) -> str:
        """`tensor` rounded to fp16 and back (two Casts), made once."""
        from onnx import TensorProto, helper

        name = f"{tensor}__fp16"
        if name not in self.made:
            self.nodes.append(helper.make_node("Cast", [tensor], [name + "_h"],
                                               to=TensorProto.FLOAT16))
            self.nodes.append(helper.make_node("Cast", [name + "_h"], [name],
                                               to=TensorProto.FLOAT))
            self.made[name] = name
        return name

    def set_initializer(self, name: str, value: np.ndarray) -> None:
        from onnx import numpy_helper

        self.inits[name].CopyFrom(numpy_helper.from_array(np.ascontiguousarray(value), name))

    def add(self, node) -> None:
        self.nodes.append(node)
        self.nodes.extend(self.after)
        self.after.clear()

    def finish(self, model):
        del self.graph.node[:]
        self.graph.node.extend(_topological(self.nodes, {i.name for i in self.graph.input} |
                                            {i.name for i in self.graph.initializer}))
        return model


class FakeLayer:
    """One weighted ONNX node of a fake-quantized copy, as schemes see it (SimLayerOp)."""

    def __init__(self, sim: Simulator, rewrite: Rewrite, layer: SimLayer, node, wide):
        self.sim, self.rewrite, self.layer, self.node, self.wide = sim, rewrite, layer, node, wide
        self.kind = "conv2d" if layer.op == "Conv" else "matmul"
        self.transposed = layer.op == "Gemm" and layer.axis == 0  # transB: [N, K]
        weight = sim.inits[layer.weight]
        self.weight = weight.T if self.transposed else weight
        channels = weight.shape[layer.axis]
        self.has_bias = len(node.input) > 2 and node.input[2] in sim.inits and \
            sim.inits[node.input[2]].size in (1, channels)
        self.bias = np.broadcast_to(sim.inits[node.input[2]].astype(np.float32).reshape(-1),
                                    (channels,)) if self.has_bias else None
        self.source = node.input[0]
        self.takes_rows = takes_rows(node, weight.shape)
        self.moments = sim.moments.get(layer.name)
        self.means = sim.means.get(self.source) if sim.bias_correction else None

    def input_qparams(self, scheme) -> QParams:
        if self.source in self.wide and scheme.activations in WIDE:
            return self.wide[self.source]
        return self.sim.qparams(self.source, scheme)

    def round_input(self, qp: QParams) -> None:
        self.node.input[0] = self.rewrite.qdq(self.source, qp)

    def half_input(self) -> None:
        self.node.input[0] = self.rewrite.half(self.source)

    def set_weight(self, weight: np.ndarray) -> None:
        from onnx import numpy_helper

        weight = weight.T if self.transposed else weight
        self.rewrite.inits[self.layer.weight].CopyFrom(
            numpy_helper.from_array(np.ascontiguousarray(weight, np.float32), self.layer.weight))

    def set_bias(self, bias: np.ndarray) -> None:
        from onnx import helper, numpy_helper

        if self.has_bias:
            name = self.node.input[2]
            self.rewrite.inits[name].CopyFrom(numpy_helper.from_array(bias, name))
        elif np.any(bias):
            name = f"{self.layer.weight}__bias"
            shape = (-1, 1, 1) if self.layer.op == "Conv" else (-1,)
            self.rewrite.graph.initializer.append(numpy_helper.from_array(bias.reshape(shape),
                                                                          name))
            pre = f"{self.node.output[0]}__nobias"
            self.rewrite.after.append(helper.make_node("Add", [pre, name],
                                                       [self.node.output[0]]))
            self.node.output[0] = pre


def _float_qdq(graph, tensor: str, qp: QParams, base: str) -> list:
    """Nodes rounding `tensor` to 16-bit integers and back, in float arithmetic (ONNX's
    QuantizeLinear takes 16-bit types only from opset 21): clip(round(x / s) + z) - z, * s."""
    from onnx import helper, numpy_helper

    constants = {"_s": qp.scale, "_z": float(qp.zero_point), "_lo": float(qp.qmin),
                 "_hi": float(qp.qmax)}
    graph.initializer.extend(numpy_helper.from_array(np.array(v, np.float32), base + k)
                             for k, v in constants.items())
    return [helper.make_node("Div", [tensor, base + "_s"], [base + "_d"]),
            helper.make_node("Round", [base + "_d"], [base + "_r"]),
            helper.make_node("Add", [base + "_r", base + "_z"], [base + "_a"]),
            helper.make_node("Clip", [base + "_a", base + "_lo", base + "_hi"], [base + "_c"]),
            helper.make_node("Sub", [base + "_c", base + "_z"], [base + "_u"]),
            helper.make_node("Mul", [base + "_u", base + "_s"], [base + "_dq"])]


def _topological(nodes, available: set[str]):
    """Nodes in an order where each input is produced before use (inserted Q/DQ pairs come
    right before the node that reads them, so this only reorders those)."""
    done = set(available) | {""}
    ordered, pending = [], list(nodes)
    while pending:
        rest = []
        for node in pending:
            if all(t in done for t in node.input):
                ordered.append(node)
                done.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):
            ordered.extend(rest)  # leave the remainder to onnxruntime's checker
            break
        pending = rest
    return ordered


__all__ = ["FakeLayer", "Rewrite"]
