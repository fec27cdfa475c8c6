"""fp32: the layer stays float, and says why (the rules, the image stem, no integer kernel)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from .base import Scheme, stays_float

if TYPE_CHECKING:
    from ..ops.linear import LayerOp
    from ..realize import Realizer


@dataclass(frozen=True)
class Fp32(Scheme):
    name = "fp32"
    in_rules = True

    reason: str = "kept in float by the rules"

    def emit(self, r: Realizer, layer: LayerOp):
        return stays_float(r, layer, self.reason)


__all__ = ["Fp32"]
