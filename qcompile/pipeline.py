"""The stages in order: import -> (transforms) -> quantize -> (tune) -> build.

compile() and tune() take a model path and a target and run the stages; the quantization
mode is a value (modes.py), made from the loose options when they are given instead.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from .artifact import Artifact
from .build import build
from .devices import check_choice
from .errors import InputError
from .frontend import FloatModel, import_onnx
from .modes import AutoPrecision, Mode, apply as apply_mode, mode_from
from .quantize import QuantConfig, QuantizedModel
from .devices.tracker import parse_tracker
from .paths import check_out_dir
from .quantize.report import REPORT_FILE
from .targets import Target, load_target
from .tune import check_log_dir, tune as tune_model
from .tuning_log import TuningLog, open_log, shipped_log

log = logging.getLogger(__name__)


def compile(  # noqa: A001 - the verb users know
    model: str | Path,
    target: str | Path | Target = "host",
    out_dir: str | Path = "build",
    *,
    quantize: str | Mode | None = None,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    cc: str | None = None,
    tuning_log: str | Path | None | bool = None,
    transforms: Sequence[Callable[[FloatModel], FloatModel]] = (),
    rpc_tracker: str | None = None,
    rpc_key: str | None = None,
    calibration: Any = None,
    quant_config: QuantConfig | None = None,
    validation: Any = None,
    accuracy_budget: float | None = None,
    metric: str = "top1",
    fallback_precision: str = "fp32",
    latency: bool = True,
    prune: str | None = None,
    macs_budget: float | None = None,
) -> Artifact:
    """Compile an ONNX model into OUT_DIR/model.so + OUT_DIR/model.json.

    model: path of an .onnx file. target: a target name (`qcompile targets`) or a target file.
    quantize: a mode (modes.py: Float16(), StaticInt8(calibration, config), WeightOnlyInt8(),
      DynamicInt8(), AutoPrecision(calibration, budget, ...)), or its name with the loose
      options below: None or "fp32", "fp16", "int8" (`calibration` samples: an .npz path, or an
      iterable of {input name: array}; `quant_config`), "int8-dynamic", "int8-weights",
      "auto" (`calibration`, `accuracy_budget` on `metric`, `validation`,
      `fallback_precision`, `latency`). A pre-quantized (QDQ/QOperator) model is realized with
      its own scales whatever this says.
    input_shapes: static shapes for inputs with dynamic dimensions, {name: (1, 3, 224, 224)}.
    cc: the C++ compiler that links the library (default: the target's, or $TVM_NDK_CC).
    tuning_log: a directory written by tune(): kernels with records get their tuned schedule.
      None: the log shipped in tuning_logs/<target>, if it fits; False: no log.
    transforms: FloatModel -> FloatModel steps run after import, before quantization (e.g.
      pruning).
    rpc_tracker, rpc_key: auto's per-layer timing on a device instead of this machine.
    prune: "structured" removes hidden channels (prune/) until the layers' MACs are at most
      `macs_budget` (a fraction) of the model's, chosen and compensated on `calibration`,
      before quantization; OUT_DIR/pruning.json says what went.
    """
    resolved = load_target(target).with_compiler(cc)  # fail on a missing compiler before work
    check_out_dir(out_dir)
    log_ = _tuning_log(tuning_log, resolved)
    rpc = _rpc(rpc_tracker, rpc_key, resolved)
    _check_prune(prune, macs_budget, calibration)
    mode = quantize if isinstance(quantize, Mode) else mode_from(
        quantize, calibration if quantize is not None or prune is None else None,
        quant_config, validation, accuracy_budget, metric, fallback_precision, latency,
        tracker=rpc is not None)
    graph = _import(model, input_shapes)
    for transform in transforms:
        graph = transform(graph)
    pruned = None
    if prune is not None:
        graph, pruned = _prune(graph, calibration, macs_budget)
    if isinstance(mode, AutoPrecision) and not graph.prequantized:
        from .auto import compile_auto

        return compile_auto(graph, resolved, Path(out_dir), mode, log_, rpc,
                            save_more=pruned.save if pruned is not None else None)
    built = apply_mode(mode, graph, resolved)
    report = built.report if isinstance(built, QuantizedModel) else None

    def extras(staging: Path) -> None:
        for part in (report, pruned):
            if part is not None:
                part.save(staging)

    artifact = build(built, resolved, out_dir, tuning_log=log_, extras=extras)
    if report is not None:
        log.info("quantization report: %s", artifact.directory / REPORT_FILE)
    return artifact


def _check_prune(prune: str | None, macs_budget: float | None, calibration) -> None:
    from .prune import METHODS, check_budget

    if prune is None:
        if macs_budget is not None:
            raise InputError("--macs-budget is the budget of --prune: add --prune structured.")
        return
    if prune not in METHODS:
        raise InputError(f"Unknown --prune method '{prune}': use {', '.join(METHODS)} (whole "
                         "hidden channels removed, the layers stay dense).")
    if macs_budget is None:
        raise InputError("--prune structured needs --macs-budget F: the fraction of the layers' "
                         "multiply-adds to keep (e.g. 0.8).")
    check_budget(macs_budget)
    if calibration is None:
        raise InputError("--prune structured chooses the channels to remove, and compensates "
                         "for them, on calibration data: pass --calibration SAMPLES.npz.")


def _prune(graph: FloatModel, calibration, macs_budget: float):
    from .prune import prune

    if graph.prequantized:
        raise InputError("--prune removes channels of a float model; this one arrived "
                         "quantized (its codes and scales fix its channels). Prune the float "
                         "model, then quantize it with qcompile.")
    return prune(graph, calibration, macs_budget)


def _tuning_log(tuning_log, target: Target) -> TuningLog | None:
    if tuning_log is None:
        return shipped_log(target)
    return open_log(tuning_log, target) if tuning_log is not False else None


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
    quantize: str | Mode | None = None,
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
    if quantize == "auto" or isinstance(quantize, AutoPrecision):
        raise InputError("qcompile tune cannot search the precision mix: compile with "
                         "--quantize auto first, then tune with --quantize int8 "
                         "--precision-rules OUT_DIR/precision-rules.toml (the mix it wrote).")
    mode = quantize if isinstance(quantize, Mode) else mode_from(quantize, calibration,
                                                                  quant_config)
    rpc = _rpc(rpc_tracker, rpc_key, resolved)
    check_choice(resolved, rpc, pocl)  # the devices first: a wrong option, whatever the log
    directory = Path(log_dir) if log_dir is not None else Path("tuning_logs") / resolved.name
    check_log_dir(directory, resolved)  # a file, another target's log or a damaged one: now
    graph = apply_mode(mode, _import(model, input_shapes), resolved)
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
