"""Palette weights (weight sharing) on the int8 dot-product instructions: W4A8 whose 4-bit
codes index a table of 16 int8 values per layer (palettes.py: weighted k-means on the weights
within their groups), with one fp16 scale per group of `group_size` reduction elements, as the
uniform int4 scheme stores. The same kernel as int4 (schemes/int4.py), the table lookup in
place of the shift that unpacks a code (schedules/cpu/palette_lookup.py): the same bytes, a
level set fitted to the layer's weights instead of a uniform grid.

MatMul/Gemm and pointwise convolutions, like int4; another convolution planned lut4 by a rule
is refused by the plan.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ..palettes import quantize_palette
from .base import SimLayerOp
from .int4 import Int4
from .int4_weights import fake_groups

if TYPE_CHECKING:
    from ..realize import Realizer


@dataclass(frozen=True)
class Lut4(Int4):
    name = "lut4"

    def group_weight(self, r: Realizer, weight: np.ndarray, layer: str):
        return quantize_palette(weight, self.group_size,
                                moments=r.config.input_moments.get(layer))

    def fake_weight(self, sim: SimLayerOp) -> np.ndarray:
        return fake_groups(sim, self.group_size, quantize_palette)


__all__ = ["Lut4"]
