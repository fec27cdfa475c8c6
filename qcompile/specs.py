"""Value objects shared by every stage: a named tensor's shape and dtype."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import InputError, ShapeError


@dataclass(frozen=True)
class TensorSpec:
    """A model input or output: its name, static shape and dtype."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "TensorSpec":
        return cls(name=data["name"], shape=tuple(data["shape"]), dtype=data["dtype"])

    def describe(self) -> str:
        return f"{self.name}: {self.dtype}[{','.join(map(str, self.shape))}]"

    def admits(self, shape) -> bool:
        """Whether an array of `shape` fits: the same rank, and each fixed dimension equal (a
        named one, e.g. a decoder's 'past', takes any length)."""
        shape = tuple(shape)
        return len(shape) == len(self.shape) and all(
            not isinstance(want, int) or got == want for got, want in zip(shape, self.shape))


def check_shape(spec: TensorSpec, shape) -> None:
    """An InputError when an input array's `shape` is not the compiled model's."""
    if tuple(shape) != tuple(spec.shape):
        raise InputError(f"Input '{spec.name}' has shape {list(shape)}, but the model was "
                         f"compiled for {list(spec.shape)}. Reshape the data, or compile again "
                         "with --input-shape.")


def name_mismatch(specs, names) -> str | None:
    """"missing 'a', 'b'" / "unknown 'c'" when `names` are not exactly the specs' names."""
    expected = [s.name for s in specs]
    missing = [n for n in expected if n not in names]
    if missing:
        return f"missing {', '.join(repr(n) for n in missing)}"
    extra = [n for n in names if n not in expected]
    if extra:
        return f"unknown {', '.join(repr(n) for n in extra)}"
    return None


def parse_input_shape(text: str) -> tuple[str, tuple[int, ...]]:
    """Parse the CLI's `NAME:1,3,224,224` into (name, shape)."""
    name, sep, dims = text.rpartition(":")
    try:
        shape = tuple(int(d) for d in dims.split(","))
    except ValueError:
        shape = ()
    if not sep or not name or not shape or any(d <= 0 for d in shape):
        raise ShapeError(f"--input-shape '{text}' is malformed: write NAME:D1,D2,... with "
                         "positive integers, e.g. --input-shape images:1,3,224,224.")
    return name, shape
