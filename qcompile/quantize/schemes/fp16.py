"""fp16: the layer's input and weight in half precision, accumulated in fp32 (the weight is
stored as fp16: half the size). Bias and activation follow in fp32."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ..weights import sqnr_db
from .base import Scheme, SimLayerOp, stays_float

if TYPE_CHECKING:
    from ..ops.linear import LayerOp
    from ..realize import Realizer


@dataclass(frozen=True)
class Fp16(Scheme):
    name = "fp16"
    in_rules = True

    def emit(self, r: Realizer, layer: LayerOp):
        if layer.unsupported is not None:
            return stays_float(r, layer, "kept in float by the rules")
        half = layer.weight.astype(np.float16)
        x = r._emit(r.relax.op.astype(r.float_of(layer.node.args[0]), "float16"))
        r.layers.append(layer.result("fp16", reason="kept in fp16 by the rules",
                                     weight_sqnr_db=sqnr_db(layer.weight,
                                                            half.astype(np.float32)),
                                     output_var=layer.node.var))
        return r._emit(layer.float_accumulating(r, x, r._const(half, "float16")))

    def fake(self, sim: SimLayerOp) -> None:
        sim.half_input()
        sim.set_weight(sim.weight.astype(np.float16).astype(np.float32))


__all__ = ["Fp16"]
