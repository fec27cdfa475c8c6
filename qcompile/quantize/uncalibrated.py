"""The modes that need no calibration data: weight-only (int8 or 4-bit) and dynamic int8, fp16,
and a model that arrives quantized (QDQ, 4-bit weights), realized with its own scales."""

from __future__ import annotations

import dataclasses
import logging

from ..errors import InputError
from ..frontend import FloatModel
from .config import QuantConfig, QuantizedModel
from .graph import read_graph
from .hessians import LayerMoments, collect_moments, quantized_layers
from .observers import WIDE_DTYPES
from .ops.qdq import graph_qparams
from .plan import given_four_bits, layer_names, plan
from .realize import Realizer
from .report import QuantReport
from .schemes import Int4Weights
from .static import model_layers, verified_module
from .values import RealizeConfig

log = logging.getLogger(__name__)


def quantize_weights(model: FloatModel, mode: str, config: QuantConfig = QuantConfig(),
                     target=None, calibration=None) -> QuantizedModel:
    """Int8 without calibrated activations. mode "weight-only": every conv/matmul weight
    stored as int8 (per-channel scales), the arithmetic in fp32: about 4x smaller, accuracy
    close to fp32. mode "dynamic": MatMul/Gemm weights in int8 and their input quantized at run
    time from its own range (for transformers, whose activation ranges vary per input);
    convolutions stay fp32. `calibration` (optional: samples, or hessians.LayerMoments
    collected before): the weights rounded by GPTQ on it instead of to nearest."""
    config.check()
    if mode == "dynamic" and config.activations in WIDE_DTYPES:
        raise InputError(f"Dynamic quantization quantizes activations to 8 bits at run time; "
                         f"--activations {config.activations} needs static int8 (--quantize "
                         f"int8 with --calibration).")
    p = plan(model, config, target, mode=mode)
    schemes = p.schemes(mode)
    moments = {}
    if calibration is not None and config.weight_rounding == "gptq":
        if not isinstance(calibration, LayerMoments):
            calibration = collect_moments(p, calibration, quantized_layers(p, mode))
        moments = calibration.for_plan(p)
    realize_config = RealizeConfig(plan=schemes, tables=config.table_precision,
                                   group_codes=model.weight_codes, input_moments=moments)
    realizer = Realizer(p.mod, p.graph, {}, realize_config)
    quantized_mod = verified_module(realizer, realize_config, p.graph)
    rounded = f", weights rounded by GPTQ on {calibration.samples} samples" if moments else ""
    report = QuantReport.build(model, realizer.layers, p.names, ([], []),
                               dataclasses.replace(config, method=f"none ({mode}{rounded})"),
                               p.activations if mode == "dynamic" else "fp32",
                               calibration.samples if moments else 0, realizer.tables)
    log.info("%s", report.summary())
    return QuantizedModel(quantized_mod, model.inputs, model.outputs,
                          model_layers(p.names, model, realizer.layers), report, model,
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
    """A model that arrives quantized, with its own scales and weight codes (no calibration):
    each QuantizeLinear gives its tensor's parameters (QDQ: integer kernels), and each 4-bit
    weight (MatMulNBits, blocked DequantizeLinear) keeps its codes in a W4A16 kernel."""
    from tvm import relax

    mod = relax.transform.FoldConstant()(model.mod)
    graph = read_graph(mod)
    qparams = graph_qparams(graph)
    four_bit = {name: Int4Weights(given.group)
                for name, given in given_four_bits(graph, model.weight_codes).items()}
    config = RealizeConfig(plan=four_bit, weight_codes=model.weight_codes,
                           group_codes=model.weight_codes)
    realizer = Realizer(mod, graph, qparams, config)
    quantized_mod = verified_module(realizer, config, graph)
    int8 = sum(1 for r in realizer.layers if r.precision == "int8")
    log.info("pre-quantized model: %d of %d layers run as integer kernels and %d with 4-bit "
             "weights, with the model's own scales (%d quantized tensors, %d int8 and %d "
             "4-bit weights)", int8, len(realizer.layers), len(config.plan), len(qparams),
             len(model.weight_codes), len(model.weight_codes.groups))
    names = layer_names(model, graph)
    report = QuantReport.build(model, realizer.layers, names, ([], []),
                               QuantConfig(method="from the model"), "from the model", 0)
    return QuantizedModel(quantized_mod, model.inputs, model.outputs,
                          model_layers(names, model, realizer.layers), report, model, model.source,
                          model.sha256)


__all__ = ["quantize_weights", "realize_prequantized", "to_fp16"]
