"""What every scheme is, and the view of a weighted ONNX node it fakes itself on in the search's
simulator (SimLayerOp; its view for realize is ops.linear.LayerOp)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Protocol

import numpy as np

if TYPE_CHECKING:
    from ..observers import QParams
    from ..ops.linear import LayerOp
    from ..realize import Realizer


class SimLayerOp(Protocol):
    """A weighted ONNX node in the simulator's fake-quantized copy of the model (simulate.py
    implements it); a scheme's `fake` rewrites it through these."""

    weight: np.ndarray          # the float weight, in the layout quantize_weight takes
    bias: np.ndarray | None     # the float bias per output channel (None: none)
    kind: str                   # conv2d | matmul
    takes_rows: bool            # a matmul or a pointwise conv (ops.linear.LayerOp.takes_rows)
    moments: object             # the layer input's rounding.InputMoments (None: not collected)
    means: np.ndarray | None    # the layer input's channel means, for bias correction

    def input_qparams(self, scheme: Scheme) -> QParams: ...
    def round_input(self, qp: QParams) -> None: ...       # the input through a Q/DQ pair
    def half_input(self) -> None: ...                     # the input rounded to fp16
    def set_weight(self, weight: np.ndarray) -> None: ...
    def set_bias(self, bias: np.ndarray) -> None: ...


@dataclass(frozen=True)
class Scheme:
    """A way to compute one weighted layer. Subclasses set the class attributes."""

    name: ClassVar[str] = ""
    in_rules: ClassVar[bool] = False         # a rules file's `precision` may name it
    takes_integers: ClassVar[bool] = False   # reads an integer (calibrated) input
    int8_kernel: ClassVar[bool] = False      # emits an int8 x int8 -> int32 kernel
    int8_weights: ClassVar[bool] = False     # stores its weight as int8
    covers_convs: ClassVar[bool] = True      # has a kernel for convolutions

    @classmethod
    def from_settings(cls, settings) -> "Scheme":
        """The scheme for a rules.LayerSettings of this scheme's precision."""
        return cls()

    @property
    def label(self) -> str:
        """As the report and the manifest name the layer's precision."""
        return self.name

    def int8_macs(self, macs: int) -> int:
        """How many of the layer's MACs multiply int8 by int8."""
        return macs if self.int8_kernel else 0

    def int8_weight_macs(self, macs: int) -> int:
        """How many of the layer's MACs use an int8 weight."""
        return macs if self.int8_weights else 0

    def emit(self, r: Realizer, layer: LayerOp):
        """The layer's output in the realized graph (a float expr or a QValue), recording a
        LayerResult in `r.layers`; NotImplemented: the node is re-emitted in float."""
        raise NotImplementedError

    def fake(self, sim: SimLayerOp) -> None:
        """Rewrite the simulator's copy of the layer as this scheme computes it (default:
        nothing, the layer stays fp32)."""


def stays_float(r: Realizer, layer: LayerOp, reason: str):
    """Record that `layer` runs in fp32 and why; NotImplemented (the node is re-emitted)."""
    r.layers.append(layer.result("fp32", reason=reason))
    return NotImplemented


__all__ = ["Scheme", "SimLayerOp", "stays_float"]
