"""16-bit integer inputs through int8 kernels: x = 256 h + l, each byte a plane.

An int8 layer with a 16-bit input (uint16/int16) runs its int8 x int8 kernel on the input's
high and low bytes stacked along axis 0 (a batch of two), each byte moved into the range of the
target's 8-bit input type (`plane_dtype`: uint8 for x86 VNNI, int8 for ARM sdot); the two int32
accumulators are combined in float, where 256 acc_h need not fit int32.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .observers import QParams

if TYPE_CHECKING:
    from .realize import Realizer


def plane_offsets(qp: QParams, plane_dtype: str) -> tuple[int, int]:
    """What is added to the high and low bytes of a 16-bit integer to fit `plane_dtype`."""
    high = {("uint16", "uint8"): 0, ("int16", "uint8"): 128,
            ("uint16", "int8"): -128, ("int16", "int8"): 0}[(qp.dtype, plane_dtype)]
    return high, (0 if plane_dtype == "uint8" else -128)


def plane_zero_point(qp: QParams, plane_dtype: str) -> int:
    """The zero point of a 16-bit input in terms of its byte planes: x - z = 256 h + l - z'."""
    high, low = plane_offsets(qp, plane_dtype)
    return qp.zero_point + 256 * high + low


def byte_planes(r: Realizer, data, qp: QParams):
    """A 16-bit integer tensor as its high and low bytes, stacked along axis 0 (one int8
    kernel computes both)."""
    op = r.relax.op
    plane_dtype = r.config.plane_dtype
    high, low = plane_offsets(qp, plane_dtype)
    wide = op.astype(data, "int32")
    h = op.add(op.right_shift(wide, r._const(8, "int32")), r._const(high, "int32"))
    l = op.add(op.bitwise_and(wide, r._const(255, "int32")), r._const(low, "int32"))
    return r._emit(op.concat([op.astype(h, plane_dtype), op.astype(l, plane_dtype)], axis=0))


def combined_planes(r: Realizer, acc, correction: np.ndarray):
    """The float32 accumulator of a 16-bit input from its planes' int32 accumulators (stacked
    along axis 0): 256 acc_h + acc_l + correction, in float (256 acc_h may not fit int32)."""
    op = r.relax.op
    halves = r._emit(op.split(acc, 2, axis=0))
    acc_h = op.astype(r.relax.TupleGetItem(halves, 0), "float32")
    acc_l = op.astype(r.relax.TupleGetItem(halves, 1), "float32")
    return op.add(op.add(op.multiply(acc_h, r._const(256.0, "float32")), acc_l),
                  r._const(correction, "float32"))


__all__ = ["byte_planes", "combined_planes", "plane_offsets", "plane_zero_point"]
