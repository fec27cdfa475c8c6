"""Calibration data: what the user passes, checked against the model before any work.

From the command line, an .npz with one array per model input, the samples stacked along a new
leading axis: an input of shape [1, 3, 224, 224] takes an array [S, 1, 3, 224, 224]. An array
of the input's own rank is read as S samples along its first axis when the input's batch is 1
([S, 3, 224, 224] works too). From Python, any iterable of {input name: array} dicts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from ..errors import InputError
from ..npz import read_npz
from ..specs import TensorSpec, name_mismatch

MIN_SAMPLES = {"minmax": 1, "percentile": 8, "entropy": 8, "mse": 8}


def _check_layout(name: str, shape: tuple, spec: TensorSpec, origin: str) -> bool:
    """Whether an array of `shape` stacks samples with a new first axis (else the input's own
    rank, for a batch of 1); an InputError if it does neither."""
    expected = tuple(spec.shape)
    if spec.admits(shape[1:]):
        return True
    if len(expected) >= 1 and expected[0] == 1 and spec.admits((1, *shape[1:])):
        return False
    raise InputError(f"Calibration array '{name}' in {origin} has shape {list(shape)}; "
                     f"input '{name}' is {list(expected)}, so write "
                     f"[S, {', '.join(map(str, expected))}] (S samples stacked along a new "
                     "first axis).")


def _samples_of(name: str, array: np.ndarray, spec: TensorSpec, origin: str) -> list[np.ndarray]:
    if _check_layout(name, array.shape, spec, origin):
        return list(array)
    return [a[None] for a in array]


def load_calibration(source: str | Path | Iterable[Mapping[str, Any]],
                     inputs: Sequence[TensorSpec], method: str = "minmax",
                     ) -> list[dict[str, np.ndarray]]:
    """The calibration samples as a list of {input name: array} feeds, checked: every input
    present, shapes and dtypes right, values finite, enough samples for the method."""
    if isinstance(source, (str, Path)):
        feeds = _read_npz(Path(source), inputs)
        origin = str(source)
    else:
        feeds = [dict(sample) for sample in source]
        origin = "the calibration samples"
    if not feeds:
        raise InputError(f"{origin} holds no samples: calibration needs at least "
                         f"{MIN_SAMPLES.get(method, 1)} for the {method} method.")
    expected = {s.name: s for s in inputs}
    for i, feed in enumerate(feeds):
        problem = name_mismatch(inputs, feed)
        if problem:
            raise InputError(f"Calibration sample {i} of {origin} does not match the model "
                             f"({problem}). The model takes: "
                             f"{'; '.join(s.describe() for s in inputs)}.")
        for name, spec in expected.items():
            value = np.asarray(feed[name])
            if not spec.admits(value.shape):
                raise InputError(f"Calibration sample {i}, input '{name}': shape "
                                 f"{list(value.shape)}, but the model takes {list(spec.shape)}.")
            if str(value.dtype) != spec.dtype:
                if np.can_cast(value.dtype, spec.dtype, casting="same_kind"):
                    value = value.astype(spec.dtype)
                else:
                    raise InputError(f"Calibration sample {i}, input '{name}': dtype "
                                     f"{value.dtype}, but the model takes {spec.dtype}.")
            if value.dtype.kind == "f" and not np.all(np.isfinite(value)):
                bad = int(np.size(value) - np.count_nonzero(np.isfinite(value)))
                raise InputError(f"Calibration sample {i}, input '{name}' has {bad} NaN or "
                                 "infinite value(s): calibration needs real data.")
            feed[name] = np.ascontiguousarray(value)
    needed = MIN_SAMPLES.get(method, 1)
    if len(feeds) < needed:
        raise InputError(f"{origin} has {len(feeds)} sample(s); the {method} method needs at "
                         f"least {needed} (it reads a distribution). Add samples, or use "
                         "--calibration-method minmax.")
    return feeds


def _read_npz(path: Path, inputs: Sequence[TensorSpec]) -> list[dict[str, np.ndarray]]:
    if not path.is_file():
        raise InputError(f"Calibration file '{path}' does not exist. Pass an .npz with one array "
                         "per model input, samples stacked along the first axis.")
    specs = {s.name: s for s in inputs}

    def check(name: str, shape: tuple, _dtype) -> None:
        if name in specs:
            _check_layout(name, shape, specs[name], str(path))

    arrays = read_npz(path, "numpy.savez(path, input_name=samples, ...)", check)
    missing = [s.name for s in inputs if s.name not in arrays]
    if missing:
        raise InputError(f"Calibration file '{path}' has no array for input(s) "
                         f"{', '.join(repr(n) for n in missing)}; it has "
                         f"{', '.join(repr(n) for n in arrays) or 'none'}. The model takes: "
                         f"{'; '.join(s.describe() for s in inputs)}.")
    per_input = {s.name: _samples_of(s.name, arrays[s.name], s, str(path)) for s in inputs}
    counts = {name: len(samples) for name, samples in per_input.items()}
    if len(set(counts.values())) > 1:
        raise InputError(f"Calibration file '{path}' has different sample counts per input: "
                         f"{counts}.")
    count = next(iter(counts.values()))
    return [{name: per_input[name][i] for name in per_input} for i in range(count)]
