"""Simulate a precision plan in onnxruntime: the search's fast estimate of its accuracy.

Compiling a plan with TVM takes a minute or more; the search evaluates dozens of plans. So the
search runs fake-quantized copies of the (simplified) ONNX model in onnxruntime instead, with
every decision taken by the same code as the build (calibrate.py, flow.py, weights.py): each
layer's scheme fakes itself (schemes/: an int8 layer sees its input through a
QuantizeLinear -> DequantizeLinear pair with the parameters realize gives that tensor, its
weight as its int8 codes times their scales and its bias on the int32 grid; an fp16 layer its
input and weight rounded to fp16), and the integer ops between int8 layers see their inputs
through such pairs where realize keeps them in integers.

What differs is the arithmetic: float convolutions on dequantized values here, exact int32 ones
in the build. On the test models the outputs agree to float rounding; on a deep network the two
round a few requantizations differently and the differences grow from block to block, while
the error against fp32 stays the same (docs/studies/2026-12-04-simulator-parity.md). The search
checks its final choice with the compiled model.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from ..frontend import LAYER_OPS, layer_name
from .observers import WIDE_DTYPES as WIDE, Observer, QParams, activation_qparams, choose_range
from .calibrate import LayerInput, calibrate
from .flow import (BOUND_KINDS, RESCALED_KINDS, SAME_PARAMS_KINDS, Flow, FlowNode,
                   integer_tensors, wide_tensors)
from .rounding import ConvShape
from .rules import LayerSettings
from .schemes import scheme_for

log = logging.getLogger(__name__)

# ONNX op type -> the kind realize gives the op Relax imports it as (flow.py's vocabulary)
ONNX_KINDS = {"Conv": "conv2d", "Gemm": "matmul", "MatMul": "matmul", "Add": "add",
              "Concat": "concat", "GlobalAveragePool": "mean", "ReduceMean": "mean",
              "AveragePool": "avg_pool2d", "MaxPool": "max_pool2d", "Relu": "relu",
              "Clip": "clip", "Reshape": "reshape", "Flatten": "flatten",
              "Transpose": "permute_dims", "Squeeze": "squeeze", "Unsqueeze": "expand_dims",
              "QuantizeLinear": "quantize", "DequantizeLinear": "dequantize"}


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


def _conv_shape(node, weight_shape) -> ConvShape | None:
    """A 2-D Conv node's ConvShape (None for other ranks or auto_pad)."""
    if node.op_type != "Conv" or len(weight_shape) != 4 or \
            _attr(node, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        return None
    return ConvShape(tuple(weight_shape[2:]), tuple(_attr(node, "strides", [1, 1])),
                     tuple(_attr(node, "pads", [0, 0, 0, 0])),
                     tuple(_attr(node, "dilations", [1, 1])), int(_attr(node, "group", 1)))


def _attr(node, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            import onnx

            return onnx.helper.get_attribute_value(a)
    return default


class Simulator:
    """Fake-quantized runs of one ONNX model for any precision plan over its layers."""

    def __init__(self, model, calibration: Sequence[Mapping[str, np.ndarray]],
                 threads: int = 0, bias_correction: bool = True,
                 base: LayerSettings = LayerSettings(), weight_rounding: str = "gptq"):
        from onnx import numpy_helper

        self.model = model
        self.threads = threads
        self.bias_correction = bias_correction
        self.weight_rounding = weight_rounding
        self.base = base  # the settings of tensors no layer's rules choose (adds, pools)
        self.inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
        self.nodes = list(model.graph.node)
        self.output_names = [o.name for o in model.graph.output]
        self.layers = weighted_layers(model)
        self.flow = onnx_flow(model, self.layers)
        # every float tensor that an int8 layer or an integer op may read
        consumed = {self.nodes[l.node_index].input[0] for l in self.layers}
        for node in self.nodes:
            if kind(node.op_type) in RESCALED_KINDS:
                consumed.update(i for i in node.input if i and i not in self.inits)
        self.observed = sorted(t for t in consumed if t and t not in self.inits)
        self.observers = self._observe(calibration)
        self._references: dict = {}

    # -- calibration ----------------------------------------------------------------------
    def _session(self, model):
        return ort_session(model, self.threads)

    def _observe(self, feeds) -> dict[str, Observer]:
        """Calibrate (calibrate.py) with onnxruntime: every observed tensor, and each
        layer's input means and (GPTQ) moments."""
        import onnx

        probe = onnx.ModelProto()
        probe.CopyFrom(self.model)
        known = {o.name for o in probe.graph.output}
        for name in self.observed:
            if name not in known:
                probe.graph.output.append(onnx.ValueInfoProto(name=name))
        session = self._session(probe)
        names = [o.name for o in probe.graph.output]
        layers = {}
        for layer in self.layers:
            node = self.nodes[layer.node_index]
            shape = _conv_shape(node, layer.weight_shape)
            layers[layer.name] = LayerInput(
                node.input[0], "conv2d" if layer.op == "Conv" else "matmul", shape,
                moments=self.weight_rounding == "gptq" and (layer.op != "Conv" or
                                                           shape is not None))
        table = calibrate(lambda feed: dict(zip(names, session.run(None, dict(feed)))), feeds,
                          self.observed, layers)
        self.means = dict(table.means)
        self.moments = dict(table.moments)  # layer name -> GPTQ input statistics
        return dict(table.observers)

    def qparams(self, tensor: str, settings) -> QParams:
        """The parameters realize gives `tensor` as the input of a layer with `settings` (a
        LayerSettings or an int8 scheme: method, activations, symmetric)."""
        return activation_qparams(choose_range(self.observers[tensor], settings.method),
                                  settings.activations, settings.symmetric)

    # -- a plan ---------------------------------------------------------------------------
    def fake_quantized(self, plan: Mapping[str, LayerSettings]):
        """The model with `plan` simulated: {layer name: settings}; missing layers fp32.
        Each layer's scheme (schemes/) fakes itself (`Scheme.fake`); the integer ops
        between int8 layers see their inputs through Q/DQ pairs where realize keeps them in
        integers (flow.py)."""
        import onnx

        schemes = {l.node_index: (l, scheme_for(plan[l.name])) for l in self.layers
                   if l.name in plan}
        int8 = {i: (l, s) for i, (l, s) in schemes.items() if s.takes_integers}
        # the integer ops that run on integers: fed by an integer tensor (realize's handlers
        # need every input's parameters), and whose result is worth keeping in integers
        # (flow.integer_tensors: else realize runs them in float)
        worth = integer_tensors(self.flow, [layer.name for layer, _ in int8.values()])
        integer, integer_ops = set(), set()
        for i, node in enumerate(self.nodes):
            tensors = [t for t in node.input if t and t not in self.inits]
            op_kind = kind(node.op_type)
            if i in int8:
                integer.add(node.output[0])
            elif op_kind in BOUND_KINDS | SAME_PARAMS_KINDS and tensors and \
                    tensors[0] in integer:
                integer.add(node.output[0])
            elif op_kind in RESCALED_KINDS and any(t in integer for t in tensors) and \
                    len(tensors) == len([t for t in node.input if t]) and \
                    all(t in self.observers for t in tensors):
                integer.add(node.output[0])
                if node.output[0] in worth:
                    integer_ops.add(i)
        wide = {tensor: activation_qparams(choose_range(self.observers[tensor], "minmax"),
                                           *how)
                for tensor, how in wide_tensors(
                    self.flow, {layer.name: (scheme.activations, scheme.symmetric)
                                for layer, scheme in int8.values()
                                if scheme.activations in WIDE},
                    keep=self.observers).items()}

        model = onnx.ModelProto()
        model.CopyFrom(self.model)
        rewrite = _Rewrite(model.graph)
        for i, original in enumerate(model.graph.node):
            node = onnx.NodeProto()  # a copy: the graph's nodes are replaced below
            node.CopyFrom(original)
            if i in schemes and (i not in int8 or node.input[0] in self.observers):
                layer, scheme = schemes[i]
                scheme.fake(FakeLayer(self, rewrite, layer, node, wide))
            elif i in integer_ops:
                for k, tensor in enumerate(node.input):
                    if tensor and tensor not in self.inits:
                        node.input[k] = rewrite.qdq(tensor, wide.get(tensor) or
                                                    self.qparams(tensor, self.base))
            rewrite.add(node)
        return rewrite.finish(model)

    def run(self, plan: Mapping[str, LayerSettings], feeds) -> list[list[np.ndarray]]:
        """The model's outputs on each feed, with `plan` simulated."""
        session = self._session(self.fake_quantized(plan))
        return [session.run(self.output_names, dict(feed)) for feed in feeds]

    def reference(self, feeds) -> list[list[np.ndarray]]:
        """The fp32 model's outputs on each feed."""
        key = id(feeds)
        if key not in self._references:  # keeps `feeds` alive, so its id stays its own
            self._references[key] = (feeds, onnxruntime_outputs(self.model, feeds))
        return self._references[key][1]


class _Rewrite:
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

    def __init__(self, sim: Simulator, rewrite: _Rewrite, layer: SimLayer, node, wide):
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


def ort_session(model, threads: int = 0):
    """An onnxruntime session that runs the graph as written: even the basic optimization level
    rewrites Q/DQ pairs (measured: EfficientNet-Lite0 falls from 19.7 to 7.8 dB SQNR)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), options,
                                providers=["CPUExecutionProvider"])


def onnxruntime_outputs(model, feeds) -> list[list[np.ndarray]]:
    """The fp32 ONNX model's outputs on each feed, in the model's output order."""
    session = ort_session(model)
    names = [o.name for o in model.graph.output]
    return [session.run(names, dict(f)) for f in feeds]


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
