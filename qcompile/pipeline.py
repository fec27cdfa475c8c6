"""The stages in order: import -> (quantize) -> tune -> build. compile() and tune()."""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from .artifact import Artifact
from .build import build
from .frontend import import_onnx
from .errors import InputError
from .quantize import QuantConfig, quantize_weights, realize_prequantized, to_fp16
from .quantize.observers import WIDE_DTYPES
from .quantize.rules import FALLBACKS
from .quantize import quantize as quantize_model
from .remote import parse_tracker
from .targets import Target, load_target
from .tune import tune as tune_model
from .tuning_log import TuningLog, open_log, shipped_log

log = logging.getLogger(__name__)


# modes that need no calibration data -> the quantizer's mode
WITHOUT_CALIBRATION = {"int8-dynamic": "dynamic", "int8-weights": "weight-only"}
QUANTIZE_MODES = ("int8", "auto", *WITHOUT_CALIBRATION, "fp16")
RULES_FILE = "precision-rules.toml"
SEARCH_FILE = "search.json"
VERIFY_ROUNDS = 3


def compile(  # noqa: A001 - the verb users know
    model: str | Path,
    target: str | Path | Target = "host",
    out_dir: str | Path = "build",
    *,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    cc: str | None = None,
    tuning_log: str | Path | None | bool = None,
    quantize: str | None = None,
    calibration: Any = None,
    quant_config: QuantConfig | None = None,
    validation: Any = None,
    accuracy_budget: float | None = None,
    metric: str = "top1",
    fallback_precision: str = "fp32",
    latency: bool = True,
    rpc_tracker: str | None = None,
    rpc_key: str | None = None,
) -> Artifact:
    """Compile an ONNX model into OUT_DIR/model.so + OUT_DIR/model.json.

    model: path of an .onnx file. target: a target name (`qcompile targets`) or a target file.
    input_shapes: static shapes for inputs with dynamic dimensions, {name: (1, 3, 224, 224)}.
    cc: the C++ compiler that links the library (default: the target's, or $TVM_NDK_CC).
    tuning_log: a directory written by tune(): kernels with records get their tuned schedule.
      None: the log shipped in tuning_logs/<target>, if it fits; False: no log (default
      schedules).
    quantize: None (fp32), "fp16", "int8": static int8 with `calibration` samples (an .npz
      path, or an iterable of {input name: array}), configured by `quant_config`;
      "int8-dynamic": MatMul/Gemm in int8 with activations quantized at run time;
      "int8-weights": weight-only int8 (fp32 arithmetic); "auto": int8 where the
      `accuracy_budget` on `metric` allows (measured on `validation` samples, held out from
      calibration), `fallback_precision` elsewhere (fp32, fp16, or int8-a16: int8 weights
      with 16-bit inputs); the choice is saved as
      OUT_DIR/precision-rules.toml and OUT_DIR/search.json. With `latency` (auto only), each
      layer's kernel is first timed in int8 and in the fallback precision, on this machine
      for the host target or on the device under `rpc_key` at `rpc_tracker`; layers whose
      int8 kernel is not faster stay in the fallback precision. The report is saved as
      OUT_DIR/quantization.json. A pre-quantized (QDQ/QOperator) model is realized with its own
      scales whatever this says. quant_config.rules (a PrecisionRules) sets per-layer precision.
    """
    resolved = load_target(target).with_compiler(cc)  # fail on a missing compiler before work
    if tuning_log is None:
        log_ = shipped_log(resolved)
    else:
        log_ = open_log(tuning_log, resolved) if tuning_log is not False else None
    rpc = _rpc(rpc_tracker, rpc_key, resolved)
    _check_quantize_args(quantize, calibration, validation, accuracy_budget, rpc)
    if quantize == "auto":
        from .quantize.metrics import load_metric

        metric = load_metric(metric)  # a bad --metric fails before any work
    if fallback_precision not in FALLBACKS:
        raise InputError(f"--fallback-precision must be {', '.join(FALLBACKS)}, not "
                         f"'{fallback_precision}'.")
    if fallback_precision == "int8-a16" and quant_config is not None and \
            quant_config.activations in WIDE_DTYPES:
        raise InputError(f"--fallback-precision int8-a16 keeps sensitive layers in int8 with "
                         f"16-bit inputs, but --activations {quant_config.activations} gives "
                         "every layer 16-bit inputs already: drop one of the two, or fall "
                         "back to fp16 or fp32.")
    graph = _import(model, input_shapes)
    if quantize == "auto" and not graph.prequantized:
        return _auto(graph, resolved, Path(out_dir), calibration, validation,
                     quant_config or QuantConfig(), accuracy_budget, metric, fallback_precision,
                     log_, latency, rpc)
    graph = _quantize(graph, resolved, quantize, calibration, quant_config)
    artifact = build(graph, resolved, out_dir, tuning_log=log_)
    if hasattr(graph, "report"):
        path = graph.report.save(artifact.directory)
        log.info("quantization report: %s", path)
    return artifact


def _check_quantize_args(quantize, calibration, validation=None, accuracy_budget=None,
                         rpc=None) -> None:
    if quantize not in (None, "none", "fp32", *QUANTIZE_MODES):
        raise InputError(f"Unknown --quantize mode '{quantize}': use int8 (static, calibrated), "
                         "int8-dynamic, int8-weights or fp16.")
    if quantize in WITHOUT_CALIBRATION and calibration is not None:
        raise InputError(f"--quantize {quantize} needs no calibration data: drop "
                         "--calibration, or use --quantize int8 (static) to use it.")
    if quantize in ("int8", "auto") and calibration is None:
        raise InputError(f"--quantize {quantize} needs calibration data: pass --calibration "
                         "CALIB.npz with one array per model input, samples stacked along the "
                         "first axis.")
    if quantize == "auto" and accuracy_budget is None:
        raise InputError("--quantize auto needs --accuracy-budget: the lowest acceptable value "
                         "of --metric (e.g. 0.99 for top-1 agreement with fp32).")
    if quantize != "auto" and (validation is not None or accuracy_budget is not None):
        raise InputError("--validation and --accuracy-budget belong to --quantize auto.")
    if quantize != "auto" and rpc is not None:
        raise InputError("compile uses --rpc-tracker only with --quantize auto, to time each "
                         "layer on the device; `qcompile run` and `qcompile tune` take it too.")


def _quantize(graph, target: Target, quantize, calibration, quant_config):
    """The model in the precision that will be built (every mode but auto)."""
    if graph.prequantized:
        if quantize == "int8":
            log.warning("the model arrives quantized (QDQ): its own scales are used, the "
                        "calibration data is not")
        return realize_prequantized(graph)
    if quantize == "fp16":
        return to_fp16(graph)
    if quantize == "int8":
        (quant_config or QuantConfig()).check()
        return quantize_model(graph, calibration, quant_config or QuantConfig(), target)
    if quantize in WITHOUT_CALIBRATION:
        return quantize_weights(graph, WITHOUT_CALIBRATION[quantize],
                                quant_config or QuantConfig(), target)
    return graph


def _auto(float_model, target: Target, out_dir: Path, calibration, validation,
          config: QuantConfig, budget: float, metric, fallback: str,
          tuning_log, latency: bool, rpc) -> Artifact:
    """--quantize auto: time each layer in int8 and in the fallback precision (`latency`, on
    the device at `rpc` or here), search the precision mix in simulation, build it, check the
    budget with the compiled model (host targets), keep more layers in higher precision if
    needed."""
    import dataclasses
    import json

    try:
        import tomllib
    except ModuleNotFoundError:  # Python < 3.11
        import tomli as tomllib

    from .quantize import activation_dtype_for, layer_plan, load_calibration
    from .quantize.rules import PrecisionRules
    from .quantize.search import keep_more, search
    from .runtime import load as load_model
    from .quantize.simulate import onnxruntime_outputs

    config.check()
    feeds = load_calibration(calibration, float_model.inputs, config.method)
    if validation is None:
        log.warning("no --validation data: the budget is checked on the calibration samples, "
                    "which flatters it; pass held-out samples with --validation VAL.npz")
        held_out = feeds
    else:
        held_out = load_calibration(validation, float_model.inputs, "minmax")
    activations = config.activations or activation_dtype_for(target)
    fixed = {}
    if config.rules is not None:
        plan, explicit = layer_plan(float_model, dataclasses.replace(config, float_stem=False),
                                    activations)
        fixed = {name: plan[name] for name in explicit}
    timing = time.perf_counter()
    if latency and fallback == "int8-a16":
        log.info("layers not timed: int8-a16 runs a layer's int8 kernel on both bytes of its "
                 "input, so it is never faster than int8")
        latency = False
    latencies, where = _layer_latencies(float_model, target, fallback, activations, fixed,
                                        rpc) if latency else ({}, None)
    result = search(float_model.onnx, feeds, held_out, config.base_settings(activations),
                    metric, budget, fallback, fixed, config.bias_correction,
                    config.weight_rounding, latencies, where, time.perf_counter() - timing)
    reference = onnxruntime_outputs(float_model.onnx, held_out)
    runs_here = target.name == "host"
    best = None  # (compiled metric, round, result, build directory)
    for round_ in range(1, (VERIFY_ROUNDS if runs_here else 1) + 1):
        rules = PrecisionRules.from_dict(tomllib.loads(result.rules_text()), RULES_FILE)
        quantized = quantize_model(float_model, feeds,
                                   dataclasses.replace(config, rules=rules), target)
        directory = out_dir if not runs_here else \
            out_dir.parent / f".{out_dir.name}.round{round_}"
        artifact = build(quantized, target, directory, tuning_log=tuning_log)
        quantized.report.save(artifact.directory)
        if not runs_here:
            log.info("the %s library cannot run here: the budget was checked in simulation "
                     "only (%s %.4f)", target.name, metric.name, result.estimate)
            break
        model = load_model(artifact.directory)
        names = [spec.name for spec in float_model.outputs]
        outputs = [[model.run(feed)[n] for n in names] for feed in held_out]
        result.verified = metric(reference, outputs, held_out)
        result.rounds.append({"round": round_, "kept": len(result.kept),
                              "int8_mac_fraction": result.int8_mac_fraction,
                              "compiled": result.verified})
        log.info("compiled model, round %d: %s %.4f on %d validation sample(s) (budget %s)",
                 round_, metric.name, result.verified, len(held_out),
                 metric.describe(budget))
        improved = best is None or metric.better(result.verified, best[0])
        if improved:
            best = (result.verified, round_, result, artifact.directory)
        if metric.meets(result.verified, budget) or not improved or \
                len(result.kept) == len(result.ranking):
            break
        if round_ < VERIFY_ROUNDS:
            result = keep_more(result, max(1, len(result.kept) // 2))
            log.info("the simulation was optimistic: keeping %d layer(s) in %s and building "
                     "again", len(result.kept), fallback)
    if best is not None:  # the best compiled round (ties: the earlier, with more int8)
        _, chosen_round, chosen, directory = best
        chosen.rounds = result.rounds
        result = chosen
        if not metric.meets(result.verified, budget):
            log.warning("the compiled model misses the budget: %s %.4f (budget %s), with %d "
                        "layer(s) in %s; more layers in higher precision did not help (round "
                        "%d kept)", metric.name, result.verified, metric.describe(budget),
                        len(result.kept), fallback, chosen_round)
        out_dir.mkdir(parents=True, exist_ok=True)
        for path in directory.iterdir():
            os.replace(path, out_dir / path.name)
        for round_dir in out_dir.parent.glob(f".{out_dir.name}.round*"):
            shutil.rmtree(round_dir, ignore_errors=True)
        artifact = Artifact.open(out_dir)
    (artifact.directory / RULES_FILE).write_text(result.rules_text())
    (artifact.directory / SEARCH_FILE).write_text(json.dumps(result.to_json(), indent=1) + "\n")
    log.info("precision mix written to %s (reuse it with --quantize int8 --precision-rules)",
             artifact.directory / RULES_FILE)
    return artifact


def _layer_latencies(float_model, target: Target, fallback: str, activations: str,
                     fixed, rpc) -> tuple[dict, str | None]:
    """({layer: LayerLatency}, where they were timed) for the layers the search chooses, or
    ({}, None) when no tracker is given and the target cannot run here (a tracker that
    fails is an error: the user asked for it)."""
    from . import layer_latency
    from .errors import DeviceError
    from .quantize.simulate import weighted_layers

    layers = [l for l in weighted_layers(float_model.onnx) if l.name not in fixed]
    try:
        timed = layer_latency.measure(float_model.onnx, layers, target, fallback, activations,
                                      rpc)
    except DeviceError as exc:
        if rpc is not None:
            raise
        log.warning("layers not timed, the precision mix is chosen for accuracy only: %s", exc)
        return {}, None
    where = f"{target.name}, " + ("this machine" if rpc is None else
                                  f"device '{rpc[1]}' at {rpc[0][0]}:{rpc[0][1]}")
    return timed, where


def tune(
    model: str | Path,
    target: str | Path | Target = "host",
    log_dir: str | Path | None = None,
    *,
    trials: int = 32,
    rpc_tracker: str | None = None,
    rpc_key: str | None = None,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    cc: str | None = None,
    quantize: str | None = None,
    calibration: Any = None,
    quant_config: QuantConfig | None = None,
    reuse_log: str | Path | None = None,
    pocl: bool = False,
) -> TuningLog:
    """Tune the kernels of an ONNX model, in the precision it will be compiled in (`quantize`,
    `calibration` and `quant_config` as for compile()), for a target: each kernel until the log
    holds `trials` measured candidates for it. Records go to `log_dir` (default:
    tuning_logs/<target>); a log that already holds records continues from them (resume, and
    reuse of kernels tuned for other models). Measured on the device under `rpc_key` at
    `rpc_tracker`, or on this machine for the host target. Pass the log to
    compile(tuning_log=...), with the same quantization options. `reuse_log`: another log for
    the target (e.g. the shipped one) whose records that apply are copied in first. `pocl`: a
    GPU target's candidates are measured on pocl, an OpenCL implementation for this CPU (the
    whole flow without a phone; the timings are not the GPU's)."""
    resolved = load_target(target).with_compiler(cc)
    reuse = open_log(reuse_log, resolved) if reuse_log is not None else None
    if quantize == "auto":
        raise InputError("qcompile tune cannot search the precision mix: compile with "
                         "--quantize auto first, then tune with --quantize int8 "
                         "--precision-rules OUT_DIR/precision-rules.toml (the mix it wrote).")
    _check_quantize_args(quantize, calibration)
    rpc = _rpc(rpc_tracker, rpc_key, resolved)
    graph = _quantize(_import(model, input_shapes), resolved, quantize, calibration,
                      quant_config)
    directory = Path(log_dir) if log_dir is not None else Path("tuning_logs") / resolved.name
    return tune_model(graph, resolved, directory, trials=trials, rpc=rpc, reuse=reuse,
                      pocl=pocl)


def _rpc(rpc_tracker: str | None, rpc_key: str | None, target: Target):
    """((host, port), key) of the devices to use, or None (this machine)."""
    if rpc_tracker is None and rpc_key is None:
        return None
    return parse_tracker(rpc_tracker), rpc_key or target.rpc_key


def _import(model: str | Path, input_shapes):
    log.info("importing %s", model)
    float_model = import_onnx(model, input_shapes)
    log.info("imported: inputs %s; outputs %s; %d layers",
             ", ".join(s.describe() for s in float_model.inputs),
             ", ".join(s.describe() for s in float_model.outputs), len(float_model.layers))
    return float_model
