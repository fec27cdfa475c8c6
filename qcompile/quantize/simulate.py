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
from typing import Mapping, Sequence

import numpy as np

from .calibrate import LayerInput, calibrate
from .fake import FakeLayer, Rewrite
from .flow import BOUND_KINDS, RESCALED_KINDS, SAME_PARAMS_KINDS, integer_tensors, wide_tensors
from .observers import WIDE_DTYPES as WIDE, Observer, QParams, activation_qparams, choose_range
from .onnx_view import conv_shape, gemm_inputs_untransposed, kind, onnx_flow, weighted_layers
from .rules import LayerSettings
from .schemes import scheme_for
from .weights import is_table, stored_table

log = logging.getLogger(__name__)


class Simulator:
    """Fake-quantized runs of one ONNX model for any precision plan over its layers."""

    def __init__(self, model, calibration: Sequence[Mapping[str, np.ndarray]],
                 threads: int = 0, bias_correction: bool = True,
                 base: LayerSettings = LayerSettings(), weight_rounding: str = "gptq",
                 tables: str | None = "int8"):
        from onnx import numpy_helper

        model = gemm_inputs_untransposed(model)
        self.model = model
        self.float_model = model  # as given (less Gemm's transA): replace() does not change it
        self._own_model = False  # replace() copies it first
        self.threads = threads
        self.bias_correction = bias_correction
        self.weight_rounding = weight_rounding
        self.tables = tables  # constant lookup tables' precision, as RealizeConfig.tables
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
            shape = conv_shape(node, layer.weight_shape)
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

    def replace(self, name: str, value: np.ndarray) -> None:
        """Simulate the model with initializer `name` (a weight, a bias) set to `value`: the
        caller's model is not changed, the observers and moments stay as calibrated, and
        `reference` gives the changed model's outputs."""
        import onnx
        from onnx import numpy_helper

        if not self._own_model:
            model = onnx.ModelProto()
            model.CopyFrom(self.model)
            self.model, self._own_model = model, True
        init = next(i for i in self.model.graph.initializer if i.name == name)
        init.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(value), name))
        self.inits[name] = value

    def weights_model(self):
        """The simulated model in float: the given one with the replaced initializers."""
        import onnx

        model = onnx.ModelProto()
        model.CopyFrom(self.model)
        return model

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
        rewrite = Rewrite(model.graph)
        for i, original in enumerate(model.graph.node):
            node = onnx.NodeProto()  # a copy: the graph's nodes are replaced below
            node.CopyFrom(original)
            if i in schemes and (i not in int8 or node.input[0] in self.observers):
                layer, scheme = schemes[i]
                scheme.fake(FakeLayer(self, rewrite, layer, node, wide))
            elif self.tables in ("int8", "int4") and _reads_table(node, self.inits):
                rewrite.set_initializer(node.input[0],
                                        stored_table(self.inits[node.input[0]], self.tables))
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


def _reads_table(node, inits) -> bool:
    """A Gather on axis 0 of a constant lookup table (weights.is_table), as realize takes."""
    axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
    return node.op_type == "Gather" and axis == 0 and len(node.input) > 1 and \
        node.input[1] not in inits and is_table(inits.get(node.input[0]))


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


__all__ = ["Simulator", "onnxruntime_outputs", "ort_session"]
