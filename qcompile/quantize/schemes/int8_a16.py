"""int8 weights with 16-bit inputs (uint16/int16): for inputs one int8 scale cannot hold.

The input is split into its two bytes, both run through the layer's int8 kernel as a batch of
two, and the accumulators are combined in float (byte_planes.py): the same int8 kernels, twice
the MACs. Its MACs count as int8 weights, not as int8 x int8.
"""

from __future__ import annotations

from dataclasses import dataclass

from .int8 import Int8


@dataclass(frozen=True)
class Int8A16(Int8):
    name = "int8-a16"
    in_rules = False  # a rules file writes it as precision int8 with 16-bit `activations`
    ACTIVATIONS = ("uint16", "int16")
    WIDE_OF = {"uint8": "uint16", "int8": "int16"}  # the 16-bit input type of an 8-bit one

    activations: str = "uint16"

    def int8_macs(self, macs: int) -> int:
        return 0  # one int8 pass per byte of the input: not int8 x int8 arithmetic


__all__ = ["Int8A16"]
