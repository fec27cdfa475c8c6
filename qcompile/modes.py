"""What a model is compiled into: the quantization mode as a type.

    Float32()                             no quantization
    Float16()                             convolutions and matmuls in fp16, fp32 accumulation
    StaticInt8(calibration, config)       int8 kernels, calibrated (config: QuantConfig)
    WeightOnlyInt8(config, calibration)   int8 weights in fp32 kernels (calibration: optional,
                                          for GPTQ rounding)
    DynamicInt8(config, calibration)      MatMul/Gemm in int8, inputs quantized at run time
    AutoPrecision(calibration, budget, ...)  int8 wherever an accuracy budget allows

Each is frozen and checks its arguments when it is made (InputError naming the option and the
fix), so an invalid combination cannot be built. `mode_from` makes one from the command line's
options; `apply` turns a FloatModel into what is built (AutoPrecision is run by auto.py). A
model that arrives quantized (QDQ) is realized with its own scales whatever the mode; one
that arrives with only 4-bit weights (MatMulNBits) runs them in float (W4A16) unless static
or dynamic int8 (their codes on int8 inputs, W4A8) or weight-only mode is asked for.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from .errors import InputError
from .frontend import FloatModel
from .quantize import (QuantConfig, quantize, quantize_weights, realize_prequantized,
                       to_fp16)
from .quantize.observers import WIDE_DTYPES
from .quantize.rules import FALLBACKS

log = logging.getLogger(__name__)

NAMES = ("fp32", "fp16", "int8", "int8-weights", "int8-dynamic", "auto")  # --quantize
NEEDS_CALIBRATION = ("int8", "auto")


@dataclass(frozen=True)
class Mode:
    name = ""

    def apply(self, model: FloatModel, target):
        """The model to build: quantized as this mode says."""
        raise NotImplementedError


@dataclass(frozen=True)
class Float32(Mode):
    name = "fp32"

    def apply(self, model: FloatModel, target):
        return model


@dataclass(frozen=True)
class Float16(Mode):
    name = "fp16"

    def apply(self, model: FloatModel, target):
        return to_fp16(model)


def _needs_calibration(mode) -> None:
    if mode.calibration is None:
        raise InputError(f"--quantize {mode.name} needs calibration data: pass --calibration "
                         "CALIB.npz with one array per model input, samples stacked along the "
                         "first axis.")


@dataclass(frozen=True)
class StaticInt8(Mode):
    name = "int8"
    calibration: Any = None   # an .npz path, or an iterable of {input name: array}
    config: QuantConfig = field(default_factory=QuantConfig)

    def __post_init__(self):
        _needs_calibration(self)
        self.config.check()

    def apply(self, model: FloatModel, target):
        return quantize(model, self.calibration, self.config, target)


def _no_reconstruction(mode) -> None:
    if mode.config.reconstruct:
        raise InputError(f"--reconstruct refits layers to the inputs that calibrated int8 "
                         f"activations give them; --quantize {mode.name} quantizes no "
                         "activations ahead of time. Use --quantize int8 --calibration "
                         "SAMPLES.npz --reconstruct, or drop --reconstruct.")


def _rounding_calibration(mode) -> None:
    if mode.calibration is not None and mode.config.weight_rounding != "gptq":
        raise InputError(f"--quantize {mode.name} uses calibration data only to round the "
                         f"weights by GPTQ, and --weight-rounding is "
                         f"{mode.config.weight_rounding}: drop --calibration, or the "
                         "--weight-rounding option.")


@dataclass(frozen=True)
class WeightOnlyInt8(Mode):
    """calibration (optional): samples on which GPTQ rounds the weights."""

    name = "int8-weights"
    config: QuantConfig = field(default_factory=QuantConfig)
    calibration: Any = None

    def __post_init__(self):
        self.config.check()
        _rounding_calibration(self)
        _no_reconstruction(self)

    def apply(self, model: FloatModel, target):
        return quantize_weights(model, "weight-only", self.config, target, self.calibration)


@dataclass(frozen=True)
class DynamicInt8(Mode):
    """calibration (optional): samples on which GPTQ rounds the weights."""

    name = "int8-dynamic"
    config: QuantConfig = field(default_factory=QuantConfig)
    calibration: Any = None

    def __post_init__(self):
        self.config.check()
        _rounding_calibration(self)
        _no_reconstruction(self)
        if self.config.activations in WIDE_DTYPES:
            raise InputError(f"Dynamic quantization quantizes activations to 8 bits at run "
                             f"time; --activations {self.config.activations} needs static int8 "
                             "(--quantize int8 with --calibration).")

    def apply(self, model: FloatModel, target):
        return quantize_weights(model, "dynamic", self.config, target, self.calibration)


@dataclass(frozen=True)
class AutoPrecision(Mode):
    """int8 where `budget` on `metric` allows (measured on `validation`, held out from the
    calibration samples), `fallback` elsewhere; `latency`: time each layer first. With
    config.weight_bits 4, then 4-bit weights on as many int8 layers as the budget allows."""

    name = "auto"
    calibration: Any = None
    budget: float | None = None
    metric: Any = "top1"           # a metric name, "python:MODULE:FUNCTION", or a Metric
    validation: Any = None
    fallback: str = "fp32"         # fp32 | fp16 | int8-a16
    latency: bool = True
    config: QuantConfig = field(default_factory=QuantConfig)

    def __post_init__(self):
        from .quantize.metrics import load_metric

        _needs_calibration(self)
        if self.budget is None:
            raise InputError("--quantize auto needs --accuracy-budget: the lowest acceptable "
                             "value of --metric (e.g. 0.99 for top-1 agreement with fp32).")
        if self.fallback not in FALLBACKS:
            raise InputError(f"--fallback-precision must be {', '.join(FALLBACKS)}, not "
                             f"'{self.fallback}'.")
        if self.fallback == "int8-a16" and self.config.activations in WIDE_DTYPES:
            raise InputError(f"--fallback-precision int8-a16 keeps sensitive layers in int8 "
                             f"with 16-bit inputs, but --activations {self.config.activations} "
                             "gives every layer 16-bit inputs already: drop one of the two, "
                             "or fall back to fp16 or fp32.")
        self.config.check()
        if self.config.reconstruct:
            raise InputError("--reconstruct refits the layers of one precision mix, and "
                             "--quantize auto tries many: compile with --quantize auto first, "
                             "then with --quantize int8 --precision-rules "
                             "OUT_DIR/precision-rules.toml --reconstruct (the mix it chose).")
        object.__setattr__(self, "metric", load_metric(self.metric))  # a bad one fails now

    def apply(self, model: FloatModel, target):
        raise TypeError("AutoPrecision searches and builds (auto.compile_auto)")


def mode_from(quantize: str | None, calibration=None, config: QuantConfig | None = None,
              validation=None, accuracy_budget: float | None = None, metric="top1",
              fallback: str = "fp32", latency: bool = True, tracker: bool = False) -> Mode:
    """The mode that compile()'s (and the command line's) loose options ask for; InputError
    for a combination that does not go together. `tracker`: an RPC tracker was given."""
    name = "fp32" if quantize in (None, "none") else quantize
    if name not in NAMES:
        raise InputError(f"Unknown --quantize mode '{quantize}': use int8 (static, "
                         "calibrated), int8-dynamic, int8-weights or fp16.")
    if name != "auto" and (validation is not None or accuracy_budget is not None):
        raise InputError("--validation and --accuracy-budget belong to --quantize auto.")
    if name != "auto" and tracker:
        raise InputError("compile uses --rpc-tracker only with --quantize auto, to time each "
                         "layer on the device; `qcompile run` and `qcompile tune` take it too.")
    if name == "fp32" and calibration is not None:
        raise InputError("--calibration is given but --quantize is not: add --quantize int8 "
                         "(calibrated activations), or int8-dynamic or int8-weights (the "
                         "weights rounded by GPTQ on it).")
    config = config or QuantConfig()
    if name == "fp32":
        return Float32()
    if name == "fp16":
        return Float16()
    if name == "int8":
        return StaticInt8(calibration, config)
    if name == "int8-weights":
        return WeightOnlyInt8(config, calibration)
    if name == "int8-dynamic":
        return DynamicInt8(config, calibration)
    return AutoPrecision(calibration, accuracy_budget, metric, validation, fallback, latency,
                         config)


def apply(mode: Mode, model: FloatModel, target):
    """What is built for `model` in `mode`: a pre-quantized model is realized with its own
    scales whatever the mode asks, except that a model whose only quantized tensors are 4-bit
    weights is quantized further by static or dynamic int8 (W4A8 on its codes) or weight-only
    mode."""
    if model.four_bit_only and isinstance(mode, (StaticInt8, WeightOnlyInt8, DynamicInt8)):
        return mode.apply(model, target)
    if model.prequantized:
        if isinstance(mode, (StaticInt8, AutoPrecision)):
            log.warning("the model arrives quantized: its own scales are used, the "
                        "calibration data is not")
        return realize_prequantized(model)
    return mode.apply(model, target)


__all__ = ["AutoPrecision", "DynamicInt8", "Float16", "Float32", "Mode", "StaticInt8",
           "WeightOnlyInt8", "apply", "mode_from"]
