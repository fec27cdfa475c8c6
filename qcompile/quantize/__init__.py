"""Quantize stage: FloatModel + calibration data -> QuantizedModel (integer kernels).

    observe  run the fp32 model on the calibration samples, collecting per-tensor statistics
    choose   a range per tensor by the calibration method, then scale and zero point
    realize  rewrite into integer kernels (realize.py)
    measure  run fp32 and int8 side by side on (some of) the calibration samples: each layer's
             error against fp32, and the outputs' (report.py)
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from ..errors import InputError, last_line
from ..frontend import FloatModel, Layer, weight_key
from .calibrate import LayerInput, calibrate
from .calibration_data import load_calibration
from ..relax_main import rebuild_main
from .graph import Graph, constant_value, read_graph, relax_flow
from .observers import (ACTIVATION_DTYPES, METHODS, WIDE_DTYPES as WIDE_ACTIVATIONS, QParams,
                        activation_qparams, choose_range)
from .flow import wide_tensors
from .ops.qdq import graph_qparams
from .realize import Realizer, verify
from .schemes import Fp32, Scheme, scheme_for
from .values import LayerResult, RealizeConfig
from .report import QuantReport, TensorError, layer_errors
from .rounding import conv_shape
from .rules import LayerSettings, PrecisionRules

log = logging.getLogger(__name__)

MEASURE_SAMPLES = 16
WEIGHT_ROUNDINGS = ("gptq", "nearest")


@dataclass(frozen=True)
class QuantConfig:
    """How to quantize. activations=None picks per target: uint8 for x86 (VNNI multiplies
    u8 x s8), int8 for ARM (sdot multiplies s8 x s8)."""

    method: str = "minmax"            # minmax | percentile | entropy | mse
    per_channel: bool = True          # weights: per output channel, else per tensor
    activations: str | None = None    # uint8 | int8 | None (per target)
    symmetric: bool = False           # activations symmetric (zero point 0 / 128)
    percentile: float = 99.99
    float_layers: frozenset = frozenset()  # layer (ONNX node) names kept in fp32
    float_stem: bool = True           # keep a first conv on a <= 4-channel model input in fp32
    rules: PrecisionRules | None = None  # per-layer precision and options (rules.py)
    bias_correction: bool = True      # remove the mean output shift that weight rounding causes
    weight_rounding: str = "gptq"     # gptq (minimize each layer's output error) | nearest

    def check(self) -> None:
        if self.method not in METHODS:
            raise InputError(f"Unknown calibration method '{self.method}': use one of "
                             f"{', '.join(METHODS)}.")
        if self.weight_rounding not in WEIGHT_ROUNDINGS:
            raise InputError(f"Unknown weight rounding '{self.weight_rounding}': use one of "
                             f"{', '.join(WEIGHT_ROUNDINGS)}.")
        if self.activations not in (None, *ACTIVATION_DTYPES):
            raise InputError(f"Activations must be uint8, int8, uint16 or int16, not "
                             f"'{self.activations}'.")

    def base_settings(self, activations: str) -> LayerSettings:
        return LayerSettings("int8", self.method, self.per_channel, activations, self.symmetric)


def layer_plan(model: FloatModel, config: QuantConfig, activations: str,
               stem: str | None = None) -> tuple[dict[str, LayerSettings], set[str]]:
    """({layer (ONNX node) name: settings}, the layers whose precision the rules set): the
    rules, then --float-layer, then the image stem in fp32 (unless a rule sets its
    precision). Rules that match nothing are warned about."""
    layers = [(layer.name, layer.op) for layer in model.layers]
    rules = config.rules or PrecisionRules()
    plan, warnings, explicit = rules.resolve(layers, config.base_settings(activations))
    for warning in warnings:
        log.warning("%s", warning)
    for name in config.float_layers:
        if name in plan:
            plan[name] = dataclasses.replace(plan[name], precision="fp32")
    if stem is not None and stem in plan and stem not in explicit and config.float_stem:
        plan[stem] = dataclasses.replace(plan[stem], precision="fp32")
    return plan, explicit


@dataclass(frozen=True)
class QuantizedModel:
    """The model with integer kernels: a Relax module like FloatModel's, and its report."""

    mod: Any
    inputs: tuple
    outputs: tuple
    layers: tuple[Layer, ...]
    report: QuantReport
    float_model: FloatModel
    source: str = ""
    sha256: str = ""


def activation_dtype_for(target) -> str:
    triple = (target.host or target.target).get("mtriple", "") if target is not None else ""
    if triple.startswith(("aarch64", "arm")):
        return "int8"
    return "uint8"


def _host_vm(mod):
    import tvm
    from tvm import relax

    from ..targets import load_target

    host = load_target("host")
    with host.to_tvm():
        mod = relax.get_default_pipeline(host.to_tvm())(relax.transform.FoldConstant()(mod))
    executable = tvm.compile(mod, host.to_tvm(), relax_pipeline=None)
    return relax.VirtualMachine(executable, tvm.cpu())


def _run(vm, feeds: Mapping[str, np.ndarray], names: list[str]) -> list[np.ndarray]:
    import tvm

    vm.set_input("main", *[tvm.runtime.tensor(feeds[n]) for n in names])
    vm.invoke_stateful("main")
    result = vm.get_outputs("main")
    values = list(result) if isinstance(result, (tuple, list)) else [result]
    return [v.numpy() for v in values]


def observing_module(mod, graph: Graph, observed: list):
    """main() returning the values of `observed` vars (a calibration probe)."""
    from tvm import relax

    return rebuild_main(mod, [(node.var, node.value) for node in graph.nodes],
                        relax.Tuple(list(observed)))


def quantize(model: FloatModel, calibration: str | Path | Iterable[Mapping[str, Any]],
             config: QuantConfig = QuantConfig(), target=None) -> QuantizedModel:
    """Static int8 post-training quantization of `model` with `calibration` samples."""
    from tvm import relax

    config.check()
    feeds = load_calibration(calibration, model.inputs, config.method)
    names = [s.name for s in model.inputs]
    activations = config.activations or activation_dtype_for(target)
    mod = relax.transform.FoldConstant()(model.mod)
    graph = read_graph(mod)
    observed = [p for p in graph.function.params if str(p.ty.dtype) == "float32"]
    observed += [n.var for n in graph.nodes if _is_float_tensor(n.var)]

    names_of = _layer_names(model, graph)
    unknown = set(config.float_layers) - set(names_of.values())
    if unknown:
        log.warning("no layer is named %s: check the names with `qcompile inspect MODEL`",
                    ", ".join(sorted(unknown)))
    stem = _stem(graph)
    plan, _ = layer_plan(model, config, activations,
                         names_of.get(stem.name) if stem else None)
    base = config.base_settings(activations)
    weighted = {n.name: n for n in graph.nodes if n.kind in ("conv2d", "matmul")}
    settings_of = {var: plan.get(onnx_name, base) for var, onnx_name in names_of.items()}

    start = time.perf_counter()
    log.info("calibrating: running the fp32 model on %d sample(s), observing %d tensors (%s)",
             len(feeds), len(observed), config.method)
    probe = _host_vm(observing_module(mod, graph, observed))
    int8_layers = {var: weighted[var] for var, s in settings_of.items()
                   if s.precision == "int8" and var in weighted}
    layers = {var: LayerInput(node.args[0], node.kind, conv_shape(node),
                              moments=config.weight_rounding == "gptq" and
                              constant_value(node.args[1]) is not None)
              for var, node in int8_layers.items()}
    table = calibrate(lambda feed: dict(zip(observed, _run(probe, feed, names))), feeds,
                      observed, layers, means=config.bias_correction,
                      histogram=any(s.method != "minmax" for s in [base, *plan.values()]))
    observer_of = dict(table.observers)
    qparams = {var: activation_qparams(choose_range(obs, config.method, config.percentile),
                                       activations, config.symmetric)
               for var, obs in observer_of.items()}
    # 16-bit inputs, and the integer ops before them (flow.py): {var: (dtype, symmetric)}
    wide = wide_tensors(relax_flow(graph), {
        var: (s.activations, s.symmetric) for var, s in settings_of.items()
        if var in weighted and s.precision == "int8" and s.activations in WIDE_ACTIVATIONS})
    for var, (dtype, symmetric) in wide.items():
        if var in observer_of:  # 16 bits need no clipping: their ranges are min/max
            qparams[var] = activation_qparams(choose_range(observer_of[var], "minmax"), dtype,
                                              symmetric)
    log.info("calibrated in %.1f s", time.perf_counter() - start)

    input_qparams = {}
    for var, s in settings_of.items():
        x = weighted[var].args[0] if var in weighted else None
        if s.precision != "int8" or x not in observer_of:
            continue
        if x in wide and s.activations in WIDE_ACTIVATIONS:
            input_qparams[var] = qparams[x]
        elif x in wide or (s.method, s.activations, s.symmetric) != (
                base.method, base.activations, base.symmetric):
            input_qparams[var] = activation_qparams(
                choose_range(observer_of[x], s.method, config.percentile),
                s.activations if s.activations not in WIDE_ACTIVATIONS else activations,
                s.symmetric)
    realize_config = RealizeConfig(
        plan=_schemes(settings_of, stem=stem.name if stem is not None else None),
        plane_dtype=activation_dtype_for(target), input_qparams=input_qparams,
        input_means=dict(table.means), input_moments=dict(table.moments))
    realizer = Realizer(mod, graph, qparams, realize_config)
    quantized_mod = _verified(realizer, realize_config, graph)
    layers = _layers(model, graph, realizer.layers)

    # measure: per-layer outputs of the int8 model against fp32, on some calibration samples
    measured = [l for l in realizer.layers if l.output_var is not None]
    measure_mod = Realizer(mod, graph, qparams, realize_config).run(
        extra_outputs=tuple(l.output_var for l in measured))
    output_vars = list(graph.output_list)
    try:
        errors = layer_errors(probe, _host_vm(measure_mod), feeds[:MEASURE_SAMPLES], names,
                              observed, [l.output_var for l in measured], output_vars, _run)
    except Exception as exc:  # noqa: BLE001 - the report measures the model; it is not the model
        log.warning("the quantization report could not measure the layers' errors (%s); the "
                    "model is built without them", last_line(str(exc)))
        errors = ([], [None] * len(output_vars))
    report = QuantReport.build(model, realizer.layers, _layer_names(model, graph), errors,
                               config, activations, len(feeds))
    log.info("%s", report.summary())
    return QuantizedModel(quantized_mod, model.inputs, model.outputs, layers, report, model,
                          model.source, model.sha256)


def quantize_weights(model: FloatModel, mode: str, config: QuantConfig = QuantConfig(),
                     target=None) -> QuantizedModel:
    """Int8 without calibration data. mode "weight-only": every conv/matmul weight stored as
    int8 (per-channel scales), the arithmetic in fp32: about 4x smaller, accuracy close to
    fp32. mode "dynamic": MatMul/Gemm weights in int8 and their input quantized at run time
    from its own range (for transformers, whose activation ranges vary per input);
    convolutions stay fp32."""
    from tvm import relax

    config.check()
    if mode == "dynamic" and config.activations in WIDE_ACTIVATIONS:
        raise InputError(f"Dynamic quantization quantizes activations to 8 bits at run time; "
                         f"--activations {config.activations} needs static int8 (--quantize "
                         f"int8 with --calibration).")
    activations = config.activations or activation_dtype_for(target)
    mod = relax.transform.FoldConstant()(model.mod)
    graph = read_graph(mod)
    names_of = _layer_names(model, graph)
    plan, _ = layer_plan(model, dataclasses.replace(config, float_stem=False), activations)
    base = config.base_settings(activations)
    settings_of = {var: plan.get(onnx_name, base) for var, onnx_name in names_of.items()}
    realize_config = RealizeConfig(plan=_schemes(settings_of, mode=mode))
    realizer = Realizer(mod, graph, {}, realize_config)
    quantized_mod = _verified(realizer, realize_config, graph)
    report = QuantReport.build(model, realizer.layers, names_of, ([], []),
                               dataclasses.replace(config, method=f"none ({mode})"),
                               activations if mode == "dynamic" else "fp32", 0)
    log.info("%s", report.summary())
    return QuantizedModel(quantized_mod, model.inputs, model.outputs,
                          _layers(model, graph, realizer.layers), report, model,
                          model.source, model.sha256)


def to_fp16(model: FloatModel) -> FloatModel:
    """Convolutions and matmuls in fp16 with fp32 accumulation (weights stored in fp16), the
    rest following them (relax.transform.ToMixedPrecision)."""
    from tvm import relax

    mod = relax.transform.FoldConstant()(model.mod)
    mod = relax.transform.FoldConstant()(relax.transform.ToMixedPrecision(out_dtype="float32")(mod))
    layers = tuple(dataclasses.replace(layer, precision="fp16") for layer in model.layers)
    log.info("fp16: %d layers in fp16 with fp32 accumulation", len(layers))
    return dataclasses.replace(model, mod=mod, layers=layers)


def realize_prequantized(model: FloatModel) -> QuantizedModel:
    """A QDQ model into integer kernels with its own scales and weight codes (no
    calibration): each QuantizeLinear gives its tensor's parameters."""
    from tvm import relax

    mod = relax.transform.FoldConstant()(model.mod)
    graph = read_graph(mod)
    qparams = graph_qparams(graph)
    config = RealizeConfig(weight_codes=model.weight_codes)
    realizer = Realizer(mod, graph, qparams, config)
    quantized_mod = _verified(realizer, config, graph)
    int8 = sum(1 for r in realizer.layers if r.precision == "int8")
    log.info("pre-quantized model: %d of %d layers run as integer kernels with the model's "
             "own scales (%d quantized tensors, %d int8 weights)", int8, len(realizer.layers),
             len(qparams), len(model.weight_codes))
    report = QuantReport.build(model, realizer.layers, _layer_names(model, graph),
                               ([], []), QuantConfig(method="from the model (QDQ)"),
                               "from the model", 0)
    return QuantizedModel(quantized_mod, model.inputs, model.outputs,
                          _layers(model, graph, realizer.layers), report, model,
                          model.source, model.sha256)


def _schemes(settings_of: Mapping[str, LayerSettings], mode: str = "static",
             stem: str | None = None) -> dict[str, Scheme]:
    """The precision plan {relax var: scheme} of {relax var: settings}; `stem` (the image
    stem conv), when the plan keeps it in fp32, says why."""
    plan = {var: scheme_for(settings, mode) for var, settings in settings_of.items()}
    if stem is not None and isinstance(plan.get(stem), Fp32):
        plan[stem] = Fp32(STEM_REASON)
    return plan


def _verified(realizer: Realizer, config: RealizeConfig, graph: Graph):
    """The realized module, after `verify` (each problem is a warning naming the layer)."""
    mod = realizer.run()
    for problem in verify(mod, config, graph, realizer.layers):
        log.warning("%s", problem)
    return mod


def _is_float_tensor(var) -> bool:
    from tvm import relax

    ty = var.ty
    return isinstance(ty, relax.TensorType) and str(ty.dtype) == "float32" and \
        ty.shape is not None


STEM_REASON = ("first conv on the image: little compute, most sensitive (--int8-stem to "
               "quantize)")


def _stem(graph: Graph):
    """The first conv, when it reads a model input of at most 4 channels (an image): little
    compute (about 3% of EfficientNet-Lite0's MACs), but its batch-norm-folded weights are
    large and cancel each other, so int8 costs it most of its accuracy (24 dB SQNR)."""
    params = set(graph.function.params)
    for node in graph.nodes:
        if node.kind == "conv2d":
            x = node.args[0]
            if x in params and len(x.ty.shape) == 4 and int(x.ty.shape[1]) <= 4:
                return node
            return None
    return None


def _layer_names(model: FloatModel, graph: Graph) -> dict[str, str]:
    """{relax var name: ONNX node name} of every conv/matmul of the Relax graph. A layer is
    found by its weight's values (frontend.weight_key: the importer may transpose a weight, and
    fuse or reorder ops), then the layers left (no constant weight, or a weight the importer
    changed) by their order; a Relax layer with no ONNX counterpart keeps its own name."""
    relax_layers = [n for n in graph.nodes if n.kind in ("conv2d", "matmul")]
    unmatched = {}
    for layer in model.layers:
        if layer.weight and layer.op != "ConvTranspose":
            unmatched.setdefault(layer.weight, []).append(layer)
    names: dict[str, str] = {}
    for node in relax_layers:
        weight = constant_value(node.args[1])
        candidates = unmatched.get(weight_key(weight)) if weight is not None else None
        if candidates:
            names[node.name] = candidates.pop(0).name
    taken = set(names.values())
    rest_relax = [n for n in relax_layers if n.name not in names]
    rest_onnx = [l for l in model.layers if l.name not in taken and l.op != "ConvTranspose"]
    if len(rest_relax) == len(rest_onnx):
        names.update((n.name, layer.name) for n, layer in zip(rest_relax, rest_onnx))
    else:
        names.update((n.name, n.name) for n in rest_relax)
    return names


def _layers(model: FloatModel, graph: Graph, results: list[LayerResult]) -> tuple[Layer, ...]:
    """The model's layers with the precision each runs in."""
    names = _layer_names(model, graph)
    ops = {layer.name: layer.op for layer in model.layers}
    return tuple(Layer(names[r.var], ops.get(names[r.var], r.op), r.precision)
                 for r in results)


__all__ = ["QuantConfig", "QuantizedModel", "quantize", "quantize_weights", "load_calibration",
           "QParams", "TensorError"]
