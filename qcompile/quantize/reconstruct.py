"""Reconstruction on the calibration data: each quantized layer refitted, in order, to give the
fp32 model's outputs from the inputs that the quantized layers before it give it.

Rounding one layer's weights is what GPTQ minimizes, given the layer's inputs; but in a
quantized model those inputs are not the fp32 model's: every layer before it was rounded, and
its own input is rounded to 8 bits. The errors accumulate from block to block. Reconstruction
walks the layers in graph order; for each, it runs the model with the layers before it
quantized (and already refitted) and the fp32 model on the calibration samples, collects the
layer's two inputs, refits its float weights and bias in closed form (refit.py), and hands the
rounding the moments of the quantized input, so GPTQ rounds the refitted weights for the
inputs the layer will actually see.

The quantized runs are the precision search's simulator (onnxruntime on a fake-quantized copy,
simulate.py), so this works on the ONNX graph and returns a new ONNX model: the build imports
it and quantizes it with the moments given here (static.quantize). One layer costs two runs of
the calibration samples; EfficientNet-Lite0's 50 layers on 32 photos take about 5 minutes.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from ..errors import InputError
from .onnx_view import conv_shape
from .refit import FOLDS, MARGIN, FitStats, refit
from .rounding import InputMoments, conv_patches
from .rules import LayerSettings

log = logging.getLogger(__name__)

FLOAT = ("fp32", "fp16")


@dataclass(frozen=True)
class LayerRefit:
    """What reconstruction did to one layer (report.py prints it)."""

    name: str
    error_before: float  # the layer's output error vs fp32 on the calibration samples,
    error_after: float   # relative (|| W x~ - W x ||^2 / || W x ||^2), before and after
    groups: int          # output groups (one for all but grouped convs)
    kept: int            # groups whose weights stayed as they were (cross-validation)

    def to_json(self) -> dict:
        return {"layer": self.name, "error_before": _finite(self.error_before),
                "error_after": _finite(self.error_after), "groups": self.groups,
                "kept": self.kept}


@dataclass(frozen=True)
class Reconstruction:
    onnx: object                          # the ONNX model with the refitted weights
    moments: Mapping[str, InputMoments]   # {ONNX layer name: its quantized input's moments}
    layers: tuple[LayerRefit, ...]
    seconds: float

    def to_json(self) -> dict:
        return {"seconds": round(self.seconds, 1), "folds": FOLDS, "margin": MARGIN,
                "layers": [layer.to_json() for layer in self.layers]}


def reconstruct(onnx_model, plan: Mapping[str, LayerSettings],
                calibration: Sequence[Mapping[str, np.ndarray]], *, base: LayerSettings,
                bias_correction: bool = True, weight_rounding: str = "gptq",
                tables: str | None = "int8", seconds: float | None = None) -> Reconstruction:
    """Refit the layers of `onnx_model` that `plan` ({ONNX layer name: settings}) quantizes,
    in graph order, on `calibration` (at least FOLDS samples). `seconds`: a time budget; the
    layers after it is spent keep their weights (and are rounded as without reconstruction)."""
    from .simulate import Simulator, ort_session

    if len(calibration) < FOLDS:
        raise InputError(f"Reconstruction needs at least {FOLDS} calibration samples (it "
                         f"checks each fit on the samples it was not fitted on, in {FOLDS} "
                         f"parts); got {len(calibration)}. Pass more samples with "
                         "--calibration.")
    start = time.perf_counter()
    sim = Simulator(onnx_model, calibration, base=base, bias_correction=bias_correction,
                    weight_rounding=weight_rounding, tables=tables)
    targets = [layer for layer in sim.layers if layer.name in plan and
               plan[layer.name].precision not in FLOAT and _refittable(sim, layer)]
    log.info("reconstruction: refitting %d layer(s) on %d calibration sample(s)",
             len(targets), len(calibration))
    # the layers not refitted are simulated as the plan says from the start: those before a
    # refitted layer shape its input, those after it do not matter
    names = {layer.name for layer in targets}
    done = {name: s for name, s in plan.items() if name not in names}
    moments: dict[str, InputMoments] = {}
    results = []
    for index, layer in enumerate(targets, start=1):
        if seconds is not None and time.perf_counter() - start > seconds:
            log.warning("reconstruction: the time budget of %.0f s is spent after %d of %d "
                        "layers; the other %d keep their weights", seconds, index - 1,
                        len(targets), len(targets) - index + 1)
            break
        node = sim.nodes[layer.node_index]
        done[layer.name] = plan[layer.name]
        fake = sim.fake_quantized(done)
        quant_input = _input_of(fake, node)
        folds = [FitStats() for _ in range(FOLDS)]
        shape = conv_shape(node, layer.weight_shape) if layer.op == "Conv" else None
        has_bias = _bias(sim, layer, node) is not None
        quantized = ort_session(_with_output(fake, quant_input), sim.threads)
        reference = ort_session(_with_output(sim.float_model, node.input[0]), sim.threads)
        for i, feed in enumerate(calibration):
            x = reference.run([node.input[0]], dict(feed))[0]
            xq = quantized.run([quant_input], dict(feed))[0]
            cols, cols_q = _columns(x, shape, has_bias), _columns(xq, shape, has_bias)
            folds[i * FOLDS // len(calibration)].add(cols, cols_q)
        rows = _rows(sim, layer, node)
        fit = refit(rows, folds, free=1 if has_bias else 0)
        _store(sim, layer, node, fit.rows, has_bias)
        moments[layer.name] = sim.moments[layer.name] = _moments(folds, shape, has_bias)
        results.append(LayerRefit(layer.name, fit.error_before, fit.error_after,
                                  rows.shape[0], fit.kept))
        log.info("reconstruction %d/%d: %s, output error %.3g -> %.3g of its signal (%.0f s)",
                 index, len(targets), layer.name, fit.error_before, fit.error_after,
                 time.perf_counter() - start)
    elapsed = time.perf_counter() - start
    if results:
        log.info("reconstruction: %d layer(s) refitted in %.0f s; their output error, median "
                 "%.3g -> %.3g of the signal", len(results), elapsed,
                 np.median([r.error_before for r in results]),
                 np.median([r.error_after for r in results]))
    return Reconstruction(sim.weights_model(), moments, tuple(results), elapsed)


def _refittable(sim, layer) -> bool:
    """A layer whose weight is its own (no other node reads the initializer) and whose input
    the refit can take apart: 2-D convs without auto_pad, matmuls, Gemm as y = x W (+ b)."""
    node = sim.nodes[layer.node_index]
    if sum(layer.weight in other.input for other in sim.nodes) != 1:
        return False
    if layer.op == "Gemm":
        attrs = {a.name: (a.f if a.type == a.FLOAT else a.i) for a in node.attribute}
        return attrs.get("transA", 0) == 0 and attrs.get("alpha", 1.0) == 1.0 and \
            attrs.get("beta", 1.0) == 1.0
    return layer.op != "Conv" or conv_shape(node, layer.weight_shape) is not None


def _input_of(fake, node) -> str:
    """The name of `node`'s data input in the fake-quantized copy (after its Q/DQ pair)."""
    outputs = {node.output[0], f"{node.output[0]}__nobias"}
    for candidate in fake.graph.node:
        if candidate.op_type == node.op_type and candidate.output[0] in outputs:
            return candidate.input[0]
    raise AssertionError(f"layer {node.name} is missing from the simulated model")


def _with_output(model, name: str):
    import onnx

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    if name not in {o.name for o in probe.graph.output}:
        probe.graph.output.append(onnx.ValueInfoProto(name=name))
    return probe


def _columns(x: np.ndarray, shape, bias: bool) -> np.ndarray:
    """The vectors the weight multiplies, [G, K(+1), P]: im2col patches of a conv, the rows
    of a matmul's input; with a constant-1 row for the bias."""
    x = np.asarray(x, np.float32)
    cols = conv_patches(x, shape) if shape is not None else x.reshape(-1, x.shape[-1]).T[None]
    if bias:
        cols = np.concatenate([cols, np.ones((cols.shape[0], 1, cols.shape[2]), cols.dtype)],
                              axis=1)
    return cols


def _bias(sim, layer, node) -> np.ndarray | None:
    """The layer's bias initializer, when it has one per output channel."""
    if len(node.input) < 3 or node.input[2] not in sim.inits:
        return None
    bias = sim.inits[node.input[2]]
    channels = layer.weight_shape[layer.axis]
    return bias if bias.size == channels and sum(node.input[2] in n.input
                                                 for n in sim.nodes) == 1 else None


def _rows(sim, layer, node) -> np.ndarray:
    """The weight (and bias) as rows [G, R, K(+1)]: an output's weights, per input group."""
    weight = sim.inits[layer.weight].astype(np.float64)
    if layer.op == "Conv":
        groups = conv_shape(node, layer.weight_shape).groups
        rows = weight.reshape(groups, weight.shape[0] // groups, -1)
    else:
        rows = (weight if layer.axis == 0 else weight.T)[None]      # [1, N, K]
    bias = _bias(sim, layer, node)
    if bias is not None:
        rows = np.concatenate([rows, bias.astype(np.float64).reshape(rows.shape[0], -1, 1)],
                              axis=2)
    return rows


def _store(sim, layer, node, rows: np.ndarray, has_bias: bool) -> None:
    bias = None
    if has_bias:
        rows, bias = rows[..., :-1], rows[..., -1].reshape(-1)
    shape = layer.weight_shape
    if layer.op == "Conv":
        weight = rows.reshape(shape)
    else:
        weight = rows[0] if layer.axis == 0 else rows[0].T
    sim.replace(layer.weight, weight.astype(np.float32))
    if bias is not None:
        sim.replace(node.input[2], bias.astype(np.float32).reshape(sim.inits[node.input[2]].shape))


def _moments(folds: list[FitStats], shape, has_bias: bool) -> InputMoments:
    """GPTQ's moments of the quantized input, from the fit's sums (less the bias row)."""
    moments = InputMoments(shape)
    end = folds[0].h.shape[-1] - (1 if has_bias else 0)
    moments.h = sum(fold.h[:, :end, :end] for fold in folds)
    moments.count = sum(fold.count for fold in folds)
    return moments


def _finite(value: float):
    return float(value) if np.isfinite(value) else None


__all__ = ["LayerRefit", "Reconstruction", "reconstruct"]
