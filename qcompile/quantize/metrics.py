"""Accuracy metrics for the precision search: a quantized model's outputs against fp32's.

A metric takes (references, outputs, feeds): per sample, the fp32 outputs and the quantized
outputs (lists of arrays in the model's output order) and the inputs, and returns one number.

    top1     share of samples whose arg-max (over the last axis) agrees with fp32; at least X
    cosine   mean cosine similarity to fp32 per sample; at least X
    mse      mean squared error against fp32; at most X
    python:MODULE:FUNCTION or python:FILE.py:FUNCTION
             your own function(references, outputs, feeds) -> float; higher is better unless
             the function has an attribute `higher_is_better = False`

The built-in metrics read the model's first floating-point output.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..errors import InputError

Outputs = Sequence[Sequence[np.ndarray]]


@dataclass(frozen=True)
class Metric:
    name: str
    fn: Callable[[Outputs, Outputs, Sequence], float]
    higher_is_better: bool = True

    def __call__(self, references: Outputs, outputs: Outputs, feeds: Sequence = ()) -> float:
        return float(self.fn(references, outputs, feeds))

    def meets(self, value: float, budget: float) -> bool:
        return value >= budget if self.higher_is_better else value <= budget

    def better(self, value: float, than: float) -> bool:
        """`value` is strictly better than `than`."""
        return value > than if self.higher_is_better else value < than

    def describe(self, budget: float) -> str:
        return f"{self.name} {'>=' if self.higher_is_better else '<='} {budget:g}"


def _first_float(sample: Sequence[np.ndarray]) -> int:
    for i, value in enumerate(sample):
        if np.issubdtype(np.asarray(value).dtype, np.floating):
            return i
    raise InputError("the model has no floating-point output for the metric to compare; "
                     "give --metric python:MODULE:FUNCTION")


def _pairs(references: Outputs, outputs: Outputs):
    k = _first_float(references[0])
    return [(np.asarray(r[k], np.float64), np.asarray(o[k], np.float64))
            for r, o in zip(references, outputs)]


def top1(references: Outputs, outputs: Outputs, feeds=()) -> float:
    pairs = _pairs(references, outputs)
    return float(np.mean([np.array_equal(r.argmax(axis=-1), o.argmax(axis=-1))
                          for r, o in pairs]))


def cosine(references: Outputs, outputs: Outputs, feeds=()) -> float:
    values = []
    for r, o in _pairs(references, outputs):
        r, o = r.ravel(), o.ravel()
        denom = np.linalg.norm(r) * np.linalg.norm(o)
        values.append(float(r @ o / denom) if denom else float(np.array_equal(r, o)))
    return float(np.mean(values))


def mse(references: Outputs, outputs: Outputs, feeds=()) -> float:
    return float(np.mean([np.mean((r - o) ** 2) for r, o in _pairs(references, outputs)]))


BUILTIN = {"top1": Metric("top1", top1), "cosine": Metric("cosine", cosine),
           "mse": Metric("mse", mse, higher_is_better=False)}


def load_metric(spec: "str | Metric") -> Metric:
    """A metric by name, or python:MODULE:FUNCTION / python:FILE.py:FUNCTION (a Metric is
    returned as it is)."""
    if isinstance(spec, Metric):
        return spec
    if spec in BUILTIN:
        return BUILTIN[spec]
    if not spec.startswith("python:") or spec.count(":") < 2:
        raise InputError(f"Unknown metric '{spec}': use top1, cosine, mse or "
                         "python:MODULE:FUNCTION.")
    where, function = spec[len("python:"):].rsplit(":", 1)
    try:
        if where.endswith(".py"):
            path = Path(where)
            loader_spec = importlib.util.spec_from_file_location(path.stem, path)
            if loader_spec is None or not path.exists():
                raise FileNotFoundError(where)
            module = importlib.util.module_from_spec(loader_spec)
            loader_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(where)
    except (ImportError, FileNotFoundError) as exc:
        raise InputError(f"Metric '{spec}': cannot import {where} ({exc}).") from None
    except SyntaxError as exc:
        raise InputError(f"Metric '{spec}': {exc.filename or where}, line {exc.lineno}: "
                         f"{exc.msg}. Fix the file (python -m py_compile FILE shows it).") \
            from None
    except Exception as exc:  # noqa: BLE001 - the user's module failed while it was imported
        raise InputError(f"Metric '{spec}': importing {where} raised {type(exc).__name__}: "
                         f"{exc}. Fix the module so that importing it only defines the "
                         "function.") from None
    fn = getattr(module, function, None)
    if not callable(fn):
        raise InputError(f"Metric '{spec}': {where} has no function '{function}'.")
    return Metric(spec, fn, bool(getattr(fn, "higher_is_better", True)))
