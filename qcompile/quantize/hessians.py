"""Calibration for weights alone: the second moments of each layer's input (the Hessian of
its output error), with which GPTQ rounds the weights, for the modes whose activations need
no calibration (int8-weights, int8-dynamic, and their 4-bit forms).

Only the layers' inputs are observed (no ranges, no histograms). The moments are keyed by the
layers' ONNX node names, so that one collection serves every import of the same model: a
decoder's any-length function and its fixed-length prompt function are two imports whose Relax
names differ.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Mapping

from .calibrate import LayerInput, calibrate
from .calibration_data import load_calibration
from .graph import constant_value
from .rounding import InputMoments, conv_shape

log = logging.getLogger(__name__)

FLOAT = ("fp32", "fp16")  # schemes that store no integer weights


@dataclass(frozen=True)
class LayerMoments:
    """{ONNX node name: its input's second moments}, from `samples` calibration samples."""

    by_layer: Mapping[str, InputMoments]
    samples: int

    def for_plan(self, plan) -> dict[str, InputMoments]:
        """{relax layer of `plan`: moments}, what the realizer's GPTQ rounding reads."""
        return {var: self.by_layer[name] for var, name in plan.names.items()
                if name in self.by_layer}


def weight_moments(model, mode: str, config, target, calibration) -> LayerMoments:
    """The moments of every layer whose weights `mode` ("dynamic", "weight-only") quantizes,
    collected on `calibration` before the model is quantized (uncalibrated.quantize_weights
    takes them)."""
    from .plan import plan as make_plan

    p = make_plan(model, config, target, mode=mode)
    return collect_moments(p, calibration, quantized_layers(p, mode))


def quantized_layers(plan, mode: str) -> set[str]:
    """The relax layers whose weights `mode` stores as integers."""
    return {var for var, scheme in plan.schemes(mode).items() if scheme.name not in FLOAT}


def collect_moments(plan, calibration, quantized: set[str]) -> LayerMoments:
    """Run the float model of `plan` on `calibration` (an .npz path or an iterable of feeds)
    and collect the input moments of the `quantized` layers (relax names) whose weight is a
    constant."""
    from .static import host_vm, observing_module, run_vm

    feeds = load_calibration(calibration, plan.model.inputs)
    weighted = plan.weighted()
    layers = {var: node for var, node in weighted.items()
              if var in quantized and constant_value(node.args[1]) is not None}
    inputs = list(dict.fromkeys(node.args[0] for node in layers.values()))
    index = {x: i for i, x in enumerate(inputs)}
    specs = {var: LayerInput(index[node.args[0]], node.kind, conv_shape(node), moments=True)
             for var, node in layers.items()}
    log.info("calibrating the weights' rounding (GPTQ): running the float model on %d "
             "sample(s), %d layers", len(feeds), len(layers))
    start = time.perf_counter()
    probe = host_vm(observing_module(plan, inputs), scheduled=True)
    names = [s.name for s in plan.model.inputs]
    table = calibrate(lambda feed: dict(enumerate(run_vm(probe, feed, names))), feeds, [],
                      specs, means=False, histogram=False)
    log.info("calibrated in %.1f s", time.perf_counter() - start)
    return LayerMoments({plan.names[var]: m for var, m in table.moments.items()}, len(feeds))


__all__ = ["LayerMoments", "collect_moments", "quantized_layers", "weight_moments"]
