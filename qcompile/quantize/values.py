"""The values realize passes around: an integer tensor (QValue), what became of a layer
(LayerResult), and how to realize a model (RealizeConfig)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from .observers import QParams


@dataclass(frozen=True)
class QValue:
    """An integer tensor and what its integers mean."""

    expr: Any
    qp: QParams


@dataclass(frozen=True)
class LayerResult:
    """What happened to one weighted layer (conv2d/matmul)."""

    var: str
    op: str
    precision: str                  # the scheme's label: int8 | int8-a16 | fp16 | fp32 | ...
    reason: str = ""                # why it stayed in float
    input_qp: QParams | None = None
    output_qp: QParams | None = None  # None: the layer's output is float
    weight_scales: tuple[float, ...] = ()
    weight_sqnr_db: float | None = None
    rounding: str = ""              # how the int8 weights were rounded: gptq | nearest | model
    fused: tuple[str, ...] = ()     # bias / activation nodes folded into the kernel
    output_var: Any = None          # the relax var whose value the layer produces
    weights: int = 0                # elements of its constant weight
    weight_bits: float | None = None  # bits stored per weight, its scales and zeros included
    palette: tuple[int, ...] = ()   # palette weights (lut4): the value of each code


@dataclass(frozen=True)
class TableResult:
    """A constant lookup table (an embedding read by Gather) and how it is stored."""

    var: str                        # the relax var of the lookup
    rows: int
    width: int
    precision: str                  # int8 | int4-g32
    sqnr_db: float | None = None    # the table's own error

    def to_json(self) -> dict:
        from .report import finite

        return {"lookup": self.var, "shape": [self.rows, self.width],
                "precision": self.precision,
                "sqnr_db": None if self.sqnr_db is None else finite(self.sqnr_db)}


@dataclass(frozen=True)
class RealizeConfig:
    """plan: {layer (relax var name): scheme}; `default` for the layers it does not name."""

    plan: Mapping[str, Any] = field(default_factory=dict)
    default: Any = None                    # None: static int8 (schemes.Int8())
    plane_dtype: str = "uint8"             # the 8-bit planes of a 16-bit input: the target's
    input_qparams: Mapping[str, QParams] = field(default_factory=dict)  # {layer: its input's}
    weight_codes: Any = None               # frontend.WeightCodes of a pre-quantized model
    group_codes: Any = None                # qdq.WeightCodes whose 4-bit weights keep their codes
    input_means: Mapping = field(default_factory=dict)    # {layer input var: channel means}
    input_moments: Mapping = field(default_factory=dict)  # {layer: rounding.InputMoments}
    tables: str | None = None              # constant lookup tables: int8 | int4 | None


__all__ = ["LayerResult", "QValue", "RealizeConfig", "TableResult"]
