"""Pruning: a transform of the imported model before quantization (pipeline.compile).

    prune(model, calibration, macs_budget) -> (FloatModel, PruneResult)

Structured only: whole hidden channels removed (channels.py finds them, select.py chooses,
structured.py applies), so every kernel stays dense.
"""

from __future__ import annotations

from ..frontend import FloatModel, reimport
from .structured import REPORT_FILE, PruneResult, check_budget, prune_structured

METHODS = ("structured",)


def prune(model: FloatModel, calibration, macs_budget: float) -> tuple[FloatModel, PruneResult]:
    """`model` with hidden channels removed down to `macs_budget` of its layers' MACs, chosen
    and compensated on `calibration` (an .npz path or an iterable of feeds)."""
    from ..quantize.calibration_data import load_calibration

    feeds = load_calibration(calibration, model.inputs)
    result = prune_structured(model.onnx, feeds, macs_budget)
    if result.macs_after == result.macs_before:
        return model, result
    return reimport(model, result.onnx), result


__all__ = ["METHODS", "PruneResult", "REPORT_FILE", "check_budget", "prune"]
