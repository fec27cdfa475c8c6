"""The calibration pass, written once: run the float model on the samples, observe tensors.

`calibrate` takes any runner (a feed -> {tensor: value}; the quantizer runs a Relax VM, the
precision search's simulator an onnxruntime session) and returns a frozen CalibrationTable:

- per observed tensor, its Observer (min, max, a histogram: observers.py), from which the
  calibration methods choose ranges;
- per layer input, its per-channel mean (bias correction);
- per layer, the second moments of its input (GPTQ rounding and fitted scales, rounding.py).

Pruning and reconstruction can reuse the same table. It saves to and loads from one .npz.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Hashable, Iterable, Mapping

import numpy as np

from .observers import BINS, Observer
from .rounding import ConvShape, InputMoments

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LayerInput:
    """What calibration collects for one layer: its input tensor and the layer's kind."""

    tensor: Hashable
    kind: str                        # conv2d | matmul
    conv: ConvShape | None = None    # a conv's patches (moments); None for a matmul
    moments: bool = False            # collect the input's second moments (GPTQ)


@dataclass(frozen=True)
class CalibrationTable:
    """Statistics of the float model on the calibration samples."""

    observers: Mapping[Hashable, Observer]
    means: Mapping[Hashable, np.ndarray] = field(default_factory=dict)  # layer input tensors
    moments: Mapping[Hashable, InputMoments] = field(default_factory=dict)  # by layer
    samples: int = 0
    model: str = ""     # the sha256 of the ONNX file it was made from ("": not recorded)

    def save(self, path: str | Path) -> None:
        """One .npz (tensor and layer keys must be strings)."""
        arrays: dict[str, np.ndarray] = {"samples": np.array(self.samples),
                                         "model": np.array(self.model)}
        for key, obs in self.observers.items():
            arrays[f"observer/{key}"] = np.concatenate(
                [[obs.min, obs.max, obs.count, obs.radius], obs.hist])
        for key, mean in self.means.items():
            arrays[f"mean/{key}"] = np.asarray(mean)
        for key, moments in self.moments.items():
            if moments.h is not None:
                arrays[f"moments/{key}"] = moments.h
                arrays[f"moments_count/{key}"] = np.array(moments.count)
                if moments.conv is not None:
                    c = moments.conv
                    arrays[f"moments_conv/{key}"] = np.array(
                        [*c.kernel, *c.strides, *c.padding, *c.dilation, c.groups])
        np.savez(path, **arrays)

    @classmethod
    def load(cls, path: str | Path) -> "CalibrationTable":
        data = np.load(path)
        observers, means, moments = {}, {}, {}
        for name in data.files:
            kind, _, key = name.partition("/")
            value = data[name]
            if kind in ("samples", "model"):
                continue
            if kind == "observer":
                obs = Observer()
                obs.min, obs.max, obs.count, obs.radius = (float(v) for v in value[:4])
                obs.count = int(obs.count)
                obs.hist = value[4:4 + BINS].copy()
                observers[key] = obs
            elif kind == "mean":
                means[key] = value
            elif kind == "moments":
                conv = data.get(f"moments_conv/{key}")
                c = None if conv is None else [int(v) for v in conv]
                shape = None if c is None else ConvShape(
                    tuple(c[0:2]), tuple(c[2:4]), tuple(c[4:8]), tuple(c[8:10]), c[10])
                m = InputMoments(shape)
                m.h, m.count = value, int(data[f"moments_count/{key}"])
                moments[key] = m
        model = str(data["model"]) if "model" in data.files else ""
        return cls(observers, means, moments, int(data["samples"]), model)


def channel_mean(value: np.ndarray, kind: str) -> np.ndarray:
    """Mean over everything but the channel axis: 1 for a conv's NCHW input, the last for a
    matmul's."""
    value = np.asarray(value, dtype=np.float64)
    if kind == "conv2d" and value.ndim == 4:
        return value.mean(axis=(0, 2, 3))
    return value.reshape(-1, value.shape[-1]).mean(axis=0)


def calibrate(run: Callable[[Mapping[str, np.ndarray]], Mapping[Hashable, np.ndarray]],
              feeds: Iterable[Mapping[str, np.ndarray]], tensors: Iterable[Hashable],
              layers: Mapping[Hashable, LayerInput] | None = None, *, means: bool = True,
              histogram: bool = True) -> CalibrationTable:
    """Run the float model (`run`: a feed -> {tensor: value}) on every feed; observe `tensors`
    (a tensor whose values are not floating point is dropped: indices, shapes) and, for each
    of `layers` ({layer: LayerInput}), its input's per-channel mean (`means`) and second
    moments (where asked)."""
    feeds = list(feeds)
    layers = dict(layers or {})
    observers = {t: Observer() for t in tensors}
    sums: dict[Hashable, np.ndarray] = {}
    mean_kind = {spec.tensor: spec.kind for spec in layers.values()} if means else {}
    moments = {layer: InputMoments(spec.conv) for layer, spec in layers.items()
               if spec.moments}
    start = time.perf_counter()
    for i, feed in enumerate(feeds):
        values = run(feed)
        for tensor in list(observers):
            value = values[tensor]
            if not np.issubdtype(np.asarray(value).dtype, np.floating):
                del observers[tensor]
                continue
            observers[tensor].update(value, histogram)
        for tensor, kind in mean_kind.items():
            if tensor in observers:
                sums[tensor] = sums.get(tensor, 0.0) + channel_mean(values[tensor], kind)
        for layer, m in moments.items():
            m.update(values[layers[layer].tensor])
        if (i + 1) % 10 == 0 or i + 1 == len(feeds):
            log.info("calibrating: %d/%d samples", i + 1, len(feeds))
    log.debug("calibrated %d tensors on %d samples in %.1f s", len(observers), len(feeds),
              time.perf_counter() - start)
    return CalibrationTable(observers, {t: s / max(len(feeds), 1) for t, s in sums.items()},
                            moments, len(feeds))


__all__ = ["CalibrationTable", "LayerInput", "calibrate", "channel_mean"]
