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
from .observers import (WIDE_DTYPES as WIDE, Observer, QParams, activation_qparams,
                        choose_range, weight_scales)
from .realize import weight_error_shift
from .rounding import ConvShape, InputMoments, fitted_scales, gptq_codes
from .rules import LayerSettings

log = logging.getLogger(__name__)

ACTIVATIONS = frozenset({"Relu", "Clip"})
PASS_THROUGH = frozenset({"Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "MaxPool"})
INTEGER_OPS = frozenset({"Add", "Concat", "GlobalAveragePool", "AveragePool", "ReduceMean"})


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
    from onnx import numpy_helper

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
        import onnx
        from onnx import numpy_helper

        self.model = model
        self.threads = threads
        self.bias_correction = bias_correction
        self.weight_rounding = weight_rounding
        self.base = base  # the settings of tensors no layer's rules choose (adds, pools)
        self.inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
        self.nodes = list(model.graph.node)
        self.output_names = [o.name for o in model.graph.output]
        self.readers: dict[str, list[int]] = {}  # tensor -> indices of the nodes reading it
        for i, node in enumerate(self.nodes):
            for tensor in node.input:
                self.readers.setdefault(tensor, []).append(i)
        self.layers = weighted_layers(model)
        # every float tensor that an int8 layer or an integer op may read
        consumed = {self.nodes[l.node_index].input[0] for l in self.layers}
        for node in self.nodes:
            if node.op_type in INTEGER_OPS:
                consumed.update(i for i in node.input if i and i not in self.inits)
        self.observed = sorted(t for t in consumed if t and t not in self.inits)
        self.observers = self._observe(calibration)
        self._references: dict = {}

    # -- calibration ----------------------------------------------------------------------
    def _session(self, model):
        return ort_session(model, self.threads)

    def _observe(self, feeds) -> dict[str, Observer]:
        import onnx

        probe = onnx.ModelProto()
        probe.CopyFrom(self.model)
        known = {o.name for o in probe.graph.output}
        for name in self.observed:
            if name not in known:
                probe.graph.output.append(onnx.ValueInfoProto(name=name))
        session = self._session(probe)
        names = [o.name for o in probe.graph.output]
        observers = {name: Observer() for name in self.observed}
        inputs = {self.nodes[l.node_index].input[0]: l.op for l in self.layers}
        sums: dict[str, np.ndarray] = {}
        self.moments: dict[str, InputMoments] = {}  # layer name -> GPTQ input statistics
        if self.weight_rounding == "gptq":
            for layer in self.layers:
                shape = _conv_shape(self.nodes[layer.node_index], layer.weight_shape)
                if layer.op != "Conv" or shape is not None:
                    self.moments[layer.name] = InputMoments(shape)
        for feed in feeds:
            values = dict(zip(names, session.run(None, dict(feed))))
            for name in self.observed:
                if not np.issubdtype(values[name].dtype, np.floating):
                    observers.pop(name, None)  # an integer tensor (indices, shapes)
                elif name in observers:
                    observers[name].update(values[name])
            for name, op in inputs.items():
                if name not in observers:
                    continue
                v = values[name].astype(np.float64)
                mean = v.mean(axis=(0, 2, 3)) if op == "Conv" and v.ndim == 4 else \
                    v.reshape(-1, v.shape[-1]).mean(axis=0)
                sums[name] = sums.get(name, 0.0) + mean
            for layer in self.layers:
                if layer.name in self.moments:
                    self.moments[layer.name].update(values[self.nodes[layer.node_index].input[0]])
        self.means = {name: total / max(len(feeds), 1) for name, total in sums.items()}
        return observers

    def _fitted_scales(self, layer: SimLayer, weight: np.ndarray,
                       s_w: np.ndarray) -> np.ndarray:
        """The per-channel scales realize gives `layer`'s weight (short rows fitted)."""
        moments = self.moments.get(layer.name)
        if moments is None:
            return s_w
        if layer.op == "Conv":
            return fitted_scales(weight, s_w, moments, "conv2d")
        if layer.axis == 0:  # Gemm transB: [N, K]
            return fitted_scales(weight.T, s_w, moments, "matmul")
        return fitted_scales(weight, s_w, moments, "matmul")

    def _codes(self, layer: SimLayer, weight: np.ndarray, s_w: np.ndarray) -> np.ndarray:
        """The int8 codes realize gives `layer`'s weight with scales `s_w` (broadcastable)."""
        moments = self.moments.get(layer.name)
        if moments is None:
            return np.clip(np.round(weight / s_w), -127, 127)
        if layer.op == "Conv":
            return gptq_codes(weight, s_w.reshape(-1), moments, "conv2d")
        if layer.axis == 0:  # Gemm transB: [N, K]
            return gptq_codes(weight.T, s_w.reshape(-1), moments, "matmul").T
        return gptq_codes(weight, s_w.reshape(-1), moments, "matmul")

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
        integer, integer_ops = set(), {}
        for i, node in enumerate(self.nodes):
            tensors = [t for t in node.input if t and t not in self.inits]
            if i in int8:
                integer.add(node.output[0])
            elif node.op_type in ACTIVATIONS | PASS_THROUGH and tensors and \
                    tensors[0] in integer:
                integer.add(node.output[0])
            elif node.op_type in INTEGER_OPS and any(t in integer for t in tensors) and \
                    len(tensors) == len([t for t in node.input if t]) and \
                    all(t in self.observers for t in tensors):
                integer.add(node.output[0])
                integer_ops[i] = node
        for i in _dequantized_only(self.nodes, self.readers, integer_ops, int8,
                                   self.output_names):
            del integer_ops[i]  # realize runs it in float: its result would only be dequantized
        new_nodes, made = [], {}

        wide = self.wide_tensors(int8)

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
                weight = self.inits[layer.weight]
                axis = layer.axis if settings.per_channel else None
                s_w = weight_scales(weight, axis)
                if axis is not None:
                    s_w = self._fitted_scales(layer, weight, s_w)
                shape = [1] * weight.ndim
                if axis is not None:
                    shape[axis] = weight.shape[axis]
                s_w = s_w.reshape(shape)
                fake = (self._codes(layer, weight, s_w) * s_w).astype(np.float32)
                inits[layer.weight].CopyFrom(numpy_helper.from_array(fake, layer.weight))
                out_channels = weight.shape[layer.axis]
                has_bias = len(node.input) > 2 and node.input[2] in self.inits
                bias = self.inits[node.input[2]].astype(np.float32) if has_bias else \
                    np.zeros(out_channels, np.float32)
                if self.bias_correction and source in self.means:
                    error = fake - weight
                    if layer.op == "Gemm" and layer.axis == 0:  # transB: [N, K] -> [K, N]
                        error = error.T
                    bias = bias - weight_error_shift(
                        error, self.means[source],
                        "conv2d" if layer.op == "Conv" else "matmul")
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

    def wide_tensors(self, int8: Mapping[int, tuple]) -> dict[str, QParams]:
        """{tensor: its 16-bit QParams}: the inputs of the int8 layers with 16-bit
        activations and, backwards through integer ops, what they are computed from (as
        realize's wide_tensors)."""
        producers = {out: node for node in self.nodes for out in node.output}
        wide: dict[str, QParams] = {}
        pending = [(self.nodes[i].input[0], settings) for i, (_, settings) in int8.items()
                   if settings.activations in WIDE]
        while pending:
            tensor, settings = pending.pop()
            if tensor in wide or tensor not in self.observers:
                continue
            wide[tensor] = activation_qparams(choose_range(self.observers[tensor], "minmax"),
                                              settings.activations, settings.symmetric)
            node = producers.get(tensor)
            if node is not None and node.op_type in INTEGER_OPS | ACTIVATIONS | PASS_THROUGH:
                pending.extend((t, settings) for t in node.input if t and t not in self.inits)
        return wide

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


def _dequantized_only(nodes, readers: dict, integer_ops: dict, int8: dict,
                      outputs) -> list[int]:
    """The integer ops whose result no int8 layer or integer op reads (through activations
    and reshapes): realize's wants_integers runs those in float."""
    memo: dict[str, bool] = {}

    def used_as_integers(tensor: str) -> bool:
        if tensor not in memo:
            memo[tensor] = tensor not in outputs and bool(readers.get(tensor)) and all(
                (j in int8 and nodes[j].input[0] == tensor) or
                (j in integer_ops and used_as_integers(nodes[j].output[0])) or
                (nodes[j].op_type in ACTIVATIONS | PASS_THROUGH and
                 used_as_integers(nodes[j].output[0]))
                for j in readers[tensor])
        return memo[tensor]

    return [i for i, node in integer_ops.items() if not used_as_integers(node.output[0])]


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
