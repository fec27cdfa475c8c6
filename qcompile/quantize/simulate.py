"""Simulate a precision plan in onnxruntime: the search's fast estimate of its accuracy.

Compiling a plan with TVM takes a minute or more; the search evaluates dozens of plans. So the
search runs fake-quantized copies of the (simplified) ONNX model in onnxruntime instead, with
the same calibration statistics, the same scale and zero-point arithmetic and the same choice of
which tensors are integers as `realize`:

- an int8 layer (Conv/Gemm/MatMul with a constant weight) sees its input through a
  QuantizeLinear -> DequantizeLinear pair with the parameters realize gives that tensor, its
  weight rounded to int8 (symmetric, per channel or per tensor; by GPTQ with the same input
  statistics, or to nearest) and its bias to int32;
- integer ops (Add of two tensors, Concat, pooling, ReduceMean) on an integer-produced input
  see every input through such a pair, when their result goes on into an int8 layer (else
  realize runs them in float, and so does this);
- an fp16 layer sees its input and weight rounded to fp16 (fp32 accumulation, like the build);
- fp32 layers, and everything else, stay as they are.

The estimate is close, not exact (realize rounds the requantization once where this rounds
twice); the search checks its final choice with the real compiled model.
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
from .weights import quantize_weight

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

    def _quantized(self, layer: SimLayer, settings: LayerSettings, bias: np.ndarray | None,
                   qp: QParams):
        """(the weight realize builds for `layer`, dequantized, in the ONNX layout; its
        bias-corrected float bias): weights.quantize_weight, as realize calls it."""
        weight = self.inits[layer.weight]
        transposed = layer.op == "Gemm" and layer.axis == 0  # transB: [N, K]
        kind = "conv2d" if layer.op == "Conv" else "matmul"
        source = self.nodes[layer.node_index].input[0]
        qw = quantize_weight(
            weight.T if transposed else weight, kind, per_channel=settings.per_channel,
            bias=bias, input_scale=None if qp.bits == 16 else qp.scale,
            moments=self.moments.get(layer.name),
            means=self.means.get(source) if self.bias_correction else None)
        fake = qw.dequantized()
        return (fake.T if transposed else fake), qw

    def qparams(self, tensor: str, settings: LayerSettings) -> QParams:
        return activation_qparams(choose_range(self.observers[tensor], settings.method),
                                  settings.activations, settings.symmetric)

    # -- a plan ---------------------------------------------------------------------------
    def fake_quantized(self, plan: Mapping[str, LayerSettings]):
        """The model with `plan` simulated: {layer name: settings}; missing layers fp32."""
        import onnx
        from onnx import TensorProto, helper, numpy_helper

        model = onnx.ModelProto()
        model.CopyFrom(self.model)
        graph = model.graph
        inits = {i.name: i for i in graph.initializer}
        int8 = {l.node_index: (l, plan[l.name]) for l in self.layers
                if plan.get(l.name, LayerSettings("fp32")).precision == "int8"}
        fp16 = {l.node_index: l for l in self.layers
                if plan.get(l.name, LayerSettings("fp32")).precision == "fp16"}
        # the integer ops that run on integers: fed by an integer tensor (realize's handlers
        # need every input's parameters), and whose result is worth keeping in integers
        # (flow.integer_tensors: else realize runs them in float)
        worth = integer_tensors(self.flow, [layer.name for layer, _ in int8.values()])
        integer, integer_ops = set(), {}
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
                    integer_ops[i] = node
        new_nodes, made = [], {}

        wide = {tensor: activation_qparams(choose_range(self.observers[tensor], "minmax"),
                                           *how)
                for tensor, how in wide_tensors(
                    self.flow, {layer.name: (settings.activations, settings.symmetric)
                                for layer, settings in int8.values()
                                if settings.activations in WIDE},
                    keep=self.observers).items()}

        def qdq(tensor: str, qp: QParams) -> str:
            key = (tensor, qp)
            if key not in made:
                base = f"{tensor}__{len(made)}"
                if qp.bits == 16:
                    new_nodes.extend(_float_qdq(graph, tensor, qp, base))
                    made[key] = base + "_dq"
                    return made[key]
                scale = numpy_helper.from_array(np.array(qp.scale, np.float32), base + "_s")
                zp = numpy_helper.from_array(np.array(qp.zero_point, qp.dtype), base + "_z")
                graph.initializer.extend([scale, zp])
                new_nodes.append(helper.make_node("QuantizeLinear", [tensor, scale.name, zp.name],
                                                  [base + "_q"]))
                new_nodes.append(helper.make_node("DequantizeLinear",
                                                  [base + "_q", scale.name, zp.name],
                                                  [base + "_dq"]))
                made[key] = base + "_dq"
            return made[key]

        after: list = []  # nodes to insert after the current one
        for i, original in enumerate(graph.node):
            node = onnx.NodeProto()  # a copy: the graph's nodes are replaced below
            node.CopyFrom(original)
            if i in int8 and node.input[0] in self.observers:
                layer, settings = int8[i]
                source = node.input[0]
                qp = wide[source] if source in wide and settings.activations in WIDE else \
                    self.qparams(source, settings)
                node.input[0] = qdq(node.input[0], qp)
                out_channels = self.inits[layer.weight].shape[layer.axis]
                has_bias = len(node.input) > 2 and node.input[2] in self.inits and \
                    self.inits[node.input[2]].size in (1, out_channels)
                fake, qw = self._quantized(layer, settings, np.broadcast_to(
                    self.inits[node.input[2]].astype(np.float32).reshape(-1),
                    (out_channels,)) if has_bias else None, qp)
                inits[layer.weight].CopyFrom(numpy_helper.from_array(fake, layer.weight))
                bias = qw.bias if qw.bias is not None else np.zeros(out_channels, np.float32)
                s_w = qw.scales
                step = np.broadcast_to(np.float32(qp.scale) * s_w.reshape(-1),
                                       (out_channels,)).astype(np.float32)
                fake_b = (np.round(bias / step) * step).astype(np.float32)
                if has_bias:
                    inits[node.input[2]].CopyFrom(numpy_helper.from_array(fake_b, node.input[2]))
                elif np.any(fake_b):
                    shape = (-1, 1, 1) if layer.op == "Conv" else (-1,)
                    b_name = f"{layer.weight}__bias"
                    graph.initializer.append(numpy_helper.from_array(
                        fake_b.reshape(shape), b_name))
                    pre = f"{node.output[0]}__nobias"
                    after.append(helper.make_node("Add", [pre, b_name], [node.output[0]]))
                    node.output[0] = pre
            elif i in fp16:
                layer = fp16[i]
                half = f"{node.input[0]}__fp16"
                if half not in made:
                    new_nodes.append(helper.make_node("Cast", [node.input[0]], [half + "_h"],
                                                      to=TensorProto.FLOAT16))
                    new_nodes.append(helper.make_node("Cast", [half + "_h"], [half],
                                                      to=TensorProto.FLOAT))
                    made[half] = half
                node.input[0] = half
                weight = self.inits[layer.weight].astype(np.float16).astype(np.float32)
                inits[layer.weight].CopyFrom(numpy_helper.from_array(weight, layer.weight))
            elif i in integer_ops:
                for k, tensor in enumerate(node.input):
                    if tensor and tensor not in self.inits:
                        node.input[k] = qdq(tensor, wide.get(tensor) or
                                            self.qparams(tensor, self.base))
            new_nodes.append(node)
            new_nodes.extend(after)
            after.clear()
        del graph.node[:]
        graph.node.extend(_topological(new_nodes, {i.name for i in graph.input} |
                                       set(inits)))
        return model

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
