"""The stages in order: import -> (quantize) -> tune -> build. compile() and tune()."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping, Sequence

from .artifact import Artifact
from .build import build
from .frontend import import_onnx
from .errors import InputError
from .quantize import QuantConfig, quantize_weights, realize_prequantized, to_fp16
from .quantize import quantize as quantize_model
from .remote import parse_tracker
from .targets import Target, load_target
from .tune import TuningLog, open_log
from .tune import tune as tune_model

log = logging.getLogger(__name__)


# modes that need no calibration data -> the quantizer's mode
WITHOUT_CALIBRATION = {"int8-dynamic": "dynamic", "int8-weights": "weight-only"}
QUANTIZE_MODES = ("int8", *WITHOUT_CALIBRATION, "fp16")


def compile(  # noqa: A001 - the verb users know
    model: str | Path,
    target: str | Path | Target = "host",
    out_dir: str | Path = "build",
    *,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    cc: str | None = None,
    tuning_log: str | Path | None = None,
    quantize: str | None = None,
    calibration: Any = None,
    quant_config: QuantConfig | None = None,
) -> Artifact:
    """Compile an ONNX model into OUT_DIR/model.so + OUT_DIR/model.json.

    model: path of an .onnx file. target: a target name (`qcompile targets`) or a target file.
    input_shapes: static shapes for inputs with dynamic dimensions, {name: (1, 3, 224, 224)}.
    cc: the C++ compiler that links the library (default: the target's, or $TVM_NDK_CC).
    tuning_log: a directory written by tune(): kernels with records get their tuned schedule.
    quantize: None (fp32), "fp16", "int8": static int8 with `calibration` samples (an .npz
      path, or an iterable of {input name: array}), configured by `quant_config`;
      "int8-dynamic": MatMul/Gemm in int8 with activations quantized at run time;
      "int8-weights": weight-only int8 (fp32 arithmetic). The report is saved as
      OUT_DIR/quantization.json. A pre-quantized (QDQ/QOperator) model is realized with its own
      scales whatever this says.
    """
    resolved = load_target(target).with_compiler(cc)  # fail on a missing compiler before work
    log_ = open_log(tuning_log) if tuning_log is not None else None
    if quantize not in (None, "none", "fp32", *QUANTIZE_MODES):
        raise InputError(f"Unknown --quantize mode '{quantize}': use int8 (static, calibrated), "
                         "int8-dynamic, int8-weights or fp16.")
    if quantize in WITHOUT_CALIBRATION and calibration is not None:
        raise InputError(f"--quantize {quantize} needs no calibration data: drop "
                         "--calibration, or use --quantize int8 (static) to use it.")
    if quantize == "int8" and calibration is None:
        raise InputError("--quantize int8 needs calibration data: pass --calibration CALIB.npz "
                         "with one array per model input, samples stacked along the first axis.")
    graph = _import(model, input_shapes)
    if graph.prequantized:
        if quantize == "int8":
            log.warning("the model arrives quantized (QDQ): its own scales are used, the "
                        "calibration data is not")
        graph = realize_prequantized(graph)
    elif quantize == "fp16":
        graph = to_fp16(graph)
    elif quantize == "int8":
        (quant_config or QuantConfig()).check()
        graph = quantize_model(graph, calibration, quant_config or QuantConfig(), resolved)
    elif quantize in WITHOUT_CALIBRATION:
        graph = quantize_weights(graph, WITHOUT_CALIBRATION[quantize],
                                 quant_config or QuantConfig(), resolved)
    artifact = build(graph, resolved, out_dir, tuning_log=log_)
    if hasattr(graph, "report"):
        path = graph.report.save(artifact.directory)
        log.info("quantization report: %s", path)
    return artifact


def tune(
    model: str | Path,
    target: str | Path | Target = "host",
    log_dir: str | Path | None = None,
    *,
    trials: int = 64,
    rpc_tracker: str | None = None,
    rpc_key: str | None = None,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    cc: str | None = None,
) -> TuningLog:
    """Tune an ONNX model's kernels for a target; records go to `log_dir` (default:
    tuning_logs/<target>). Measured on the device under `rpc_key` at `rpc_tracker`, or on this
    machine for the host target. Pass the log to compile(tuning_log=...)."""
    resolved = load_target(target).with_compiler(cc)
    rpc = None
    if rpc_tracker is not None or rpc_key is not None:
        rpc = (parse_tracker(rpc_tracker), rpc_key or resolved.rpc_key)
    float_model = _import(model, input_shapes)
    directory = Path(log_dir) if log_dir is not None else Path("tuning_logs") / resolved.name
    return tune_model(float_model, resolved, directory, trials=trials, rpc=rpc)


def _import(model: str | Path, input_shapes):
    log.info("importing %s", model)
    float_model = import_onnx(model, input_shapes)
    log.info("imported: inputs %s; outputs %s; %d layers",
             ", ".join(s.describe() for s in float_model.inputs),
             ", ".join(s.describe() for s in float_model.outputs), len(float_model.layers))
    return float_model
