"""Quantize stage: FloatModel + calibration data -> QuantizedModel (integer kernels).

Static int8 runs in three public stages, each returning a frozen value (static.py):

    plan(model, config, target)   -> QuantPlan         each layer's settings and identity
    calibrate(plan, calibration)  -> CalibrationTable  ranges, histograms, means, moments
    realize(plan, table)          -> QuantizedModel    integer kernels, and the report

`quantize` runs the three. Weight-only and dynamic int8 (`quantize_weights`), fp16
(`to_fp16`) and a model that arrives quantized (`realize_prequantized`) need no calibration.
"""

from .calibrate import CalibrationTable
from .calibration_data import load_calibration
from .config import QuantConfig, QuantizedModel, activation_dtype_for
from .observers import QParams
from .plan import QuantPlan, layer_names, layer_plan, plan
from .report import TensorError
from .static import calibrate, quantize, realize
from .uncalibrated import quantize_weights, realize_prequantized, to_fp16

__all__ = ["CalibrationTable", "QParams", "QuantConfig", "QuantPlan", "QuantizedModel",
           "TensorError", "activation_dtype_for", "calibrate", "layer_names", "layer_plan",
           "load_calibration", "plan", "quantize", "quantize_weights", "realize",
           "realize_prequantized", "to_fp16"]
