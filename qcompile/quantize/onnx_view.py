"""The ONNX graph as quantization sees it (the simulator's side): its weighted layers with their
MACs, its dataflow in flow.py's kinds, its tensors' static shapes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..frontend import LAYER_OPS, layer_name
from .flow import Flow, FlowNode
from .rounding import ConvShape

# ONNX op type -> the kind realize gives the op Relax imports it as (flow.py's vocabulary)
ONNX_KINDS = {"Conv": "conv2d", "Gemm": "matmul", "MatMul": "matmul", "Add": "add",
              "Concat": "concat", "GlobalAveragePool": "mean", "ReduceMean": "mean",
              "AveragePool": "avg_pool2d", "MaxPool": "max_pool2d", "Relu": "relu",
              "Clip": "clip", "Reshape": "reshape", "Flatten": "flatten",
              "Transpose": "permute_dims", "Squeeze": "squeeze", "Unsqueeze": "expand_dims",
              "QuantizeLinear": "quantize", "DequantizeLinear": "dequantize"}


def gemm_inputs_untransposed(model):
    """`model` with every Gemm that reads its data input transposed (transA = 1, which onnxsim
    makes of a Transpose before a MatMul) reading it through a Transpose node instead: the same
    model, whose layers all reduce over their input's last axis, as realize sees them (TVM's
    importer emits the same permute). Returned as it is when there is none."""
    import onnx
    from onnx import helper

    if not any(n.op_type == "Gemm" and _attr(n, "transA", 0) for n in model.graph.node):
        return model
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    nodes = []
    for node in copy.graph.node:
        if node.op_type == "Gemm" and _attr(node, "transA", 0):
            transposed = f"{node.input[0]}__transposed"
            nodes.append(helper.make_node("Transpose", [node.input[0]], [transposed],
                                          name=f"{node.name}__transpose_a", perm=[1, 0]))
            node.input[0] = transposed
            for a in node.attribute:
                if a.name == "transA":
                    a.i = 0
        nodes.append(node)
    del copy.graph.node[:]
    copy.graph.node.extend(nodes)
    return copy


def kind(op_type: str) -> str:
    return ONNX_KINDS.get(op_type, "other")


def onnx_flow(model, layers: Sequence["SimLayer"]) -> Flow:
    """The model as a flow.Flow: tensors by name, `layers` by their names."""
    constants = {i.name for i in model.graph.initializer}
    layer_of = {layer.node_index: layer.name for layer in layers}
    nodes = [FlowNode(kind(node.op_type),
                      tuple(t for t in node.input if t and t not in constants),
                      node.output[0], layer_of.get(i))
             for i, node in enumerate(model.graph.node)]
    return Flow.of(nodes, [o.name for o in model.graph.output])


@dataclass(frozen=True)
class SimLayer:
    """A weighted ONNX node that can be quantized."""

    name: str
    op: str
    node_index: int
    weight: str       # initializer name
    axis: int         # the weight's output-channel axis
    macs: int
    weight_shape: tuple = ()
    output_shape: tuple = ()


def weighted_layers(model) -> list[SimLayer]:
    """The layers that can be quantized: Conv/Gemm/MatMul nodes with a constant weight, with
    their MACs (from ONNX shape inference)."""
    inits = {i.name: i for i in model.graph.initializer}
    shapes = value_shapes(model)
    layers = []
    for i, node in enumerate(model.graph.node):
        if node.op_type not in LAYER_OPS or len(node.input) < 2 or node.input[1] not in inits:
            continue
        dims = tuple(inits[node.input[1]].dims)
        if node.op_type == "Conv":
            axis = 0
        elif node.op_type == "Gemm":
            axis = 0 if _attr(node, "transB", 0) else 1
        elif node.op_type == "MatMul" and len(dims) == 2:
            axis = 1
        else:
            continue
        out = shapes.get(node.output[0])
        size = int(np.prod(dims))
        macs = int(np.prod(out)) * (size // dims[axis]) if out else 0
        layers.append(SimLayer(layer_name(node, i), node.op_type, i, node.input[1], axis, macs,
                               dims, out or ()))
    return layers


def conv_shape(node, weight_shape) -> ConvShape | None:
    """A 2-D Conv node's ConvShape (None for other ranks or auto_pad)."""
    if node.op_type != "Conv" or len(weight_shape) != 4 or \
            _attr(node, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        return None
    return ConvShape(tuple(weight_shape[2:]), tuple(_attr(node, "strides", [1, 1])),
                     tuple(_attr(node, "pads", [0, 0, 0, 0])),
                     tuple(_attr(node, "dilations", [1, 1])), int(_attr(node, "group", 1)))


def takes_rows(node, weight_shape) -> bool:
    """Whether the 4-bit kernels take the weighted node: a MatMul/Gemm, or a Conv with a 1x1
    kernel, one group and no padding (as ops.linear.LayerOp.takes_rows decides in Relax)."""
    if node.op_type != "Conv":
        return True
    shape = conv_shape(node, weight_shape)
    return shape is not None and shape.kernel == (1, 1) and shape.groups == 1 and \
        not any(shape.padding)


def _attr(node, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            import onnx

            return onnx.helper.get_attribute_value(a)
    return default


def value_shapes(model) -> dict[str, tuple[int, ...]]:
    """{tensor name: static shape} of the model's inputs, intermediate values and outputs
    (ONNX shape inference)."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model)
    shapes = {}
    for info in list(inferred.graph.input) + list(inferred.graph.value_info) + \
            list(inferred.graph.output):
        dims = [d.dim_value for d in info.type.tensor_type.shape.dim]
        if dims and all(d > 0 for d in dims):
            shapes[info.name] = tuple(dims)
    return shapes


__all__ = ["ONNX_KINDS", "SimLayer", "conv_shape", "gemm_inputs_untransposed", "kind",
           "onnx_flow", "takes_rows", "value_shapes", "weighted_layers"]
