"""How to quantize (QuantConfig) and what quantizing gives (QuantizedModel): the values every
quantization stage shares."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import InputError
from ..frontend import FloatModel, Layer
from .observers import ACTIVATION_DTYPES, METHODS
from .report import QuantReport
from .rules import LayerSettings, PrecisionRules
from .weights import GROUP_SIZES, WEIGHT_BITS

WEIGHT_ROUNDINGS = ("gptq", "nearest")
TABLE_PRECISIONS = ("int8", "int4", "fp32")


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
    tables: str = "int8"              # constant lookup tables (embeddings): int8 | int4 | fp32
    weight_bits: int = 8              # 4: MatMul/Gemm weights in 4 bits, in groups (W4A8)
    group_size: int = 32              # 4-bit weights: reduction elements per scale
    palettes: bool = False            # 4-bit weights index 16 int8 values per layer (lut4)
    # int8-dynamic: each int8 layer's input quantized per row in groups of group_size, its
    # weights scaled per group (the 4-bit layers' kernel), instead of one scale per row
    input_groups: bool = False
    # static int8: refit each quantized layer's float weights, in order, to the fp32 model's
    # outputs from the quantized model's inputs, on the calibration data (reconstruct.py)
    reconstruct: bool = False
    reconstruct_seconds: float | None = None  # its time budget (None: every layer)

    def check(self) -> None:
        if self.method not in METHODS:
            raise InputError(f"Unknown calibration method '{self.method}': use one of "
                             f"{', '.join(METHODS)}.")
        if self.weight_rounding not in WEIGHT_ROUNDINGS:
            raise InputError(f"Unknown weight rounding '{self.weight_rounding}': use one of "
                             f"{', '.join(WEIGHT_ROUNDINGS)}.")
        if self.weight_bits not in WEIGHT_BITS:
            raise InputError(f"Weights are stored in {' or '.join(map(str, WEIGHT_BITS))} bits, "
                             f"not {self.weight_bits}.")
        if self.palettes and self.weight_bits != 4:
            raise InputError("--palettes makes 4-bit weights index a palette of 16 values: "
                             "give it with --weight-bits 4.")
        if self.group_size not in GROUP_SIZES:
            raise InputError(f"The group size of 4-bit weights is one of "
                             f"{', '.join(map(str, GROUP_SIZES))} reduction elements, not "
                             f"{self.group_size}.")
        if self.tables not in TABLE_PRECISIONS:
            raise InputError(f"Lookup tables are stored in {', '.join(TABLE_PRECISIONS[:-1])} "
                             f"or {TABLE_PRECISIONS[-1]}, not '{self.tables}' (--tables).")
        if self.reconstruct_seconds is not None and (not self.reconstruct or
                                                     not self.reconstruct_seconds > 0):
            raise InputError(f"--reconstruct-seconds is the time budget of --reconstruct: a "
                             f"positive number of seconds with --reconstruct, not "
                             f"{self.reconstruct_seconds}"
                             + ("" if self.reconstruct else " without it") + ".")
        if self.activations not in (None, *ACTIVATION_DTYPES):
            raise InputError(f"Activations must be uint8, int8, uint16 or int16, not "
                             f"'{self.activations}'.")

    @property
    def table_precision(self) -> str | None:
        """RealizeConfig.tables: what constant lookup tables become (None: they stay)."""
        return None if self.tables == "fp32" else self.tables

    def base_settings(self, activations: str) -> LayerSettings:
        four = "lut4" if self.palettes else "int4"
        return LayerSettings(four if self.weight_bits == 4 else "int8", self.method,
                             self.per_channel, activations, self.symmetric, self.group_size)


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


__all__ = ["QuantConfig", "QuantizedModel", "TABLE_PRECISIONS", "WEIGHT_ROUNDINGS",
           "activation_dtype_for"]
