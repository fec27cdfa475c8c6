"""Each layer's kernel time in int8 and in the fallback precision, on the target: what
`--quantize auto` uses to keep a layer out of int8 where int8 is slower.

A weighted layer (Conv/Gemm/MatMul with a constant weight), with the Relu/Clip that follows it
(which fuses into its kernel), is cut out of the ONNX model as a one-layer model. That model is
compiled twice, in int8 (quantized with random calibration data: the scales do not change the
code) and in the fallback precision, as compile would (the same legalization, layouts, packing
and fusion). The kernel that holds the layer's conv/matmul gets the schedule compile will give
it: its best record in the tuning log the build applies, else the schedule of a kernel without
one (schedules/: our default schedules; dlight's on a GPU). It is timed like a tuning
candidate: on this machine for the host target, or on the device through the RPC tracker (a
GPU target's OpenCL kernels on the phone's GPU).
Quantize/dequantize kernels at the one-layer model's edges are not counted: inside an int8
model, int8 layers pass integers to each other.

Layers with the same shapes and attributes are measured once, in three passes over all the
kernels (the fastest pass counts). Measuring EfficientNet-Lite0's 50 layers takes a few
minutes on 2 cores, mostly compiling.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from . import lower
from .tuning_log import MODULE_EQUALITY
from .targets import Target

log = logging.getLogger(__name__)

CALIBRATION_SAMPLES = 2
# Every kernel is timed in this many passes over all of them, and its fastest pass counts: on
# a shared 2-core machine a single pass put two of EfficientNet-Lite0's 1x1 int8 convs at 4x
# their quiet time, and the search at 55% and 68% of the MACs in int8 in two runs, where three
# passes give 86%.
TIMING_PASSES = 3


@dataclass(frozen=True)
class LayerLatency:
    """One layer's kernel time (microseconds) in int8 and in `fallback`; None: not measured
    (the kernel did not build or run; the reason is in `error`)."""

    int8_us: float | None
    fallback_us: float | None
    fallback: str
    error: str | None = None


def one_layer_model(model, node_index: int, shapes: dict | None = None):
    """The ONNX node `node_index` of `model` (a Conv/Gemm/MatMul with constant weights), and the
    Relu or Clip that alone consumes its output, as a model of its own: (model, signature).
    Equal signatures compile to the same kernels. `shapes`: simulate.value_shapes(model)."""
    import onnx
    from onnx import helper

    from .quantize.onnx_view import value_shapes

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    node = graph.node[node_index]
    shapes = shapes if shapes is not None else value_shapes(model)
    nodes = [node]
    readers = [n for n in graph.node if node.output[0] in n.input]
    outputs = {o.name for o in graph.output}
    if len(readers) == 1 and node.output[0] not in outputs and \
            readers[0].op_type in ("Relu", "Clip") and \
            all(not name or name in inits for name in readers[0].input[1:]):
        nodes.append(readers[0])
    x = node.input[0]
    out = nodes[-1].output[0]
    if x not in shapes or out not in shapes:
        raise ValueError(f"layer {node.name or node.op_type}: shapes unknown")
    used = [inits[name] for n in nodes for name in n.input[1:] if name in inits]
    one = helper.make_model(
        helper.make_graph(
            [_copy(n) for n in nodes], "layer",
            [helper.make_tensor_value_info(x, onnx.TensorProto.FLOAT, shapes[x])],
            [helper.make_tensor_value_info(out, onnx.TensorProto.FLOAT, shapes[out])],
            initializer=used),
        opset_imports=list(model.opset_import), ir_version=model.ir_version)
    # the code depends on the ops, attributes and shapes, and on a Clip's bounds (constants
    # in the kernel), not on the weights' values
    bounds = [onnx.numpy_helper.to_array(inits[name]).tobytes()
              for name in nodes[-1].input[1:] if len(nodes) > 1 and name]
    signature = (tuple(_anonymous(n).SerializeToString(deterministic=True) for n in nodes),
                 shapes[x], tuple(tuple(i.dims) for i in used), tuple(bounds))
    return one, signature


def _copy(node):
    from onnx import NodeProto

    copied = NodeProto()
    copied.CopyFrom(node)
    return copied


def _anonymous(node):
    """The node without its name and tensor names (for signatures)."""
    copied = _copy(node)
    copied.name = ""
    del copied.input[:]
    del copied.output[:]
    return copied


def _anchor_kernel(mod, target: Target, packed_layout: bool):
    """The fused kernel of `mod` that holds its conv/matmul (the most work), as an IRModule."""
    import tvm
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.analysis import estimate_tir_flops

    fused = lower.kernels(mod, target, packed_layout)  # as compile and tune fuse it
    tasks = ms.relax_integration.extract_tasks(fused, target.to_tvm(),
                                               module_equality=MODULE_EQUALITY)
    best = max(tasks, key=lambda t: estimate_tir_flops(t.dispatched[0]))
    kernel = best.dispatched[0]
    return kernel if isinstance(kernel, tvm.IRModule) else tvm.IRModule({"main": kernel})


def _kernels(onnx_path: Path, target: Target, fallback: str, activations: str,
             packed_layout: bool):
    """(int8 kernel, fallback kernel) of a one-layer ONNX model."""
    from .frontend import import_onnx
    from .quantize import QuantConfig, quantize, to_fp16

    model = import_onnx(onnx_path)
    rng = np.random.default_rng(0)
    feeds = [{s.name: rng.standard_normal(s.shape).astype(np.float32) for s in model.inputs}
             for _ in range(CALIBRATION_SAMPLES)]
    config = QuantConfig(activations=activations, float_stem=False, bias_correction=False,
                         weight_rounding="nearest")
    int8 = quantize(model, feeds, config, target)
    other = to_fp16(model) if fallback == "fp16" else model
    return (_anchor_kernel(int8.mod, target, packed_layout),
            _anchor_kernel(other.mod, target, packed_layout))


def measure(onnx_model, layers: Sequence, target: Target, fallback: str = "fp32",
            activations: str = "uint8",
            rpc: tuple[tuple[str, int], str] | None = None,
            pocl: bool = False, tuning_log=None) -> dict[str, LayerLatency]:
    """{layer name: LayerLatency} for `layers` (simulate.SimLayer) of `onnx_model` (the
    simplified model with static shapes), measured on the target: here for the host target,
    else through `rpc` ((tracker host, port), key); a GPU target's kernels (scheduled by
    dlight, as compile does without a record) on its GPU, or with `pocl` on pocl (the flow
    without a phone; the times are not the GPU's). Raises DeviceError before any work when the
    target cannot be measured (a cross or GPU target without a tracker, no device at the
    tracker). `tuning_log` (a TuningLog): the log the build will apply; a kernel with a record
    in it is timed with that schedule."""
    from .devices import device_for
    from .devices.builder import builder_for
    from .devices.timing import time_kernels
    from .quantize.onnx_view import value_shapes

    devices = device_for(target, rpc, pocl)
    tvm_target = target.to_tvm()
    # in an int8 model on a dot-product target every conv is NHWC, the float ones too
    packed_layout = lower.dot_product(target) is not None
    start = time.perf_counter()
    groups: dict = {}  # signature -> [layer names]
    models = {}
    shapes = value_shapes(onnx_model)
    for layer in layers:
        try:
            one, signature = one_layer_model(onnx_model, layer.node_index, shapes)
        except ValueError as exc:
            log.info("layer latency: %s not measured (%s)", layer.name, exc)
            continue
        groups.setdefault(signature, []).append(layer.name)
        models.setdefault(signature, one)
    log.info("layer latency: %d layer(s), %d distinct, in int8 and %s, measured on %s%s",
             len(layers), len(groups), fallback, devices.describe(),
             " (EMULATED: these times are not the phone's)" if devices.emulated else "")
    work = Path(tempfile.mkdtemp(prefix="qcompile-layers-"))
    schedules, errors = [], {}
    with_records = 0  # kernels timed with their tuning record
    try:
        for i, (signature, one) in enumerate(models.items(), start=1):
            path = work / f"layer{i}.onnx"
            path.write_bytes(one.SerializeToString())
            try:
                with _quiet("qcompile.quantize", "qcompile.frontend"):
                    kernels = _kernels(path, target, fallback, activations, packed_layout)
                for kernel in kernels:
                    tuned = lower.tuned_schedule(kernel, target, tuning_log) \
                        if tuning_log is not None else None
                    if tuned is not None:
                        schedules.append((signature, tuned))
                        with_records += 1
                        continue
                    sch = lower.default_schedule(kernel, target)
                    schedules.append((signature, sch.mod if sch is not None else kernel))
            except Exception as exc:  # noqa: BLE001 - one layer's failure is data
                errors[signature] = f"{type(exc).__name__}: {exc}".splitlines()[0]
            if i % 5 == 0 or i == len(models):
                log.info("layer latency: compiled %d/%d layer(s) (%.0f s)", i, len(models),
                         time.perf_counter() - start)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    times = time_kernels([mod for _, mod in schedules], tvm_target,
                         builder_for(target),
                         devices.runner(), passes=TIMING_PASSES)
    seconds: dict = {}  # signature -> [int8 seconds, fallback seconds]
    for (signature, _), timed in zip(schedules, times):
        if timed.build_error:
            errors.setdefault(signature, "did not build: " + timed.build_error)
        elif timed.run_error:
            errors.setdefault(signature, "did not run: " + timed.run_error)
        seconds.setdefault(signature, []).append(timed.seconds)
    latencies = {}
    for signature, names in groups.items():
        int8_s, fallback_s = seconds.get(signature, [None, None])
        value = LayerLatency(_us(int8_s), _us(fallback_s), fallback, errors.get(signature))
        for name in names:
            latencies[name] = value
    for signature, error in errors.items():
        log.warning("layer latency: %s not timed, it stays int8 unless accuracy says "
                    "otherwise: %s", ", ".join(groups[signature]), error)
    measured = sum(1 for v in latencies.values() if v.int8_us and v.fallback_us)
    log.info("layer latency: %d of %d layer(s) measured in both precisions in %.0f s "
             "(%d of %d kernels with their record in the tuning log)", measured, len(layers),
             time.perf_counter() - start, with_records, len(schedules))
    return latencies


@contextlib.contextmanager
def _quiet(*names: str):
    """The one-layer models' import and quantization logs are not the user's model's."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _us(seconds: float | None) -> float | None:
    return round(seconds * 1e6, 2) if seconds is not None else None


__all__ = ["LayerLatency", "measure", "one_layer_model"]
