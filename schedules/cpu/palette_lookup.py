"""Palette weights unpacked by a table lookup: the 4-bit index of each weight turned into its
int8 value from a 16-entry table, a whole packed block at a time.

A palette layer's packed block (packed_int4's layout, [lanes, reduce] bytes) holds two blocks
of indices, the low nibbles and the high ones; the table P is the layer's 16 int8 values:

    U[h, i, k] = P[nibble_h(W[i, k])],  nibble_0 = byte & 15, nibble_1 = byte >> 4

On x86 (AVX-512BW) that is one `vpshufb` per half of a 64-byte block (the table copied into
each 128-bit lane: the instruction looks up within lanes), two 256-bit ones on AVX2, on
AArch64 one `tbl` per half of a 16-byte block, after an `and` (a shift for the high half):
the values come out in the block layout the dot-product instruction reads, where the uniform
4-bit kernel's shift or mask leaves them. `value` states one element the way the kernel's
compute and the intrinsic's description both do: as a chain of comparisons with constant
indices, because tensorize cannot match a description whose buffer index is itself a load
(W's byte indexing P).
"""

from __future__ import annotations

TABLE = 16  # entries: a 4-bit index
INTRIN = {"vpdpbusd": "qcompile_palette_unpack_16x4_vpshufb",
          "vpmaddubsw": "qcompile_palette_unpack_16x4_vpshufb_avx2",
          "sdot": "qcompile_palette_unpack_4x4_tbl"}
# a packed block: lanes x reduce bytes
SHAPE = {"vpdpbusd": (16, 4), "vpmaddubsw": (16, 4), "sdot": (4, 4)}
# the lookup instruction and the bytes it looks up at once
LOOKUP = {"vpdpbusd": ("llvm.x86.avx512.pshuf.b.512", 64),
          "vpmaddubsw": ("llvm.x86.avx2.pshuf.b", 32),
          "sdot": ("llvm.aarch64.neon.tbl1.v16i8", 16)}

def value(packed_byte, palette, h):
    """The int8 value of nibble `h` of `packed_byte`: the palette entry it indexes."""
    from tvm import tirx

    nibble = tirx.if_then_else(h == 0, packed_byte & tirx.const(15, "uint8"),
                               packed_byte >> tirx.const(4, "uint8"))
    chosen = palette[TABLE - 1]
    for entry in range(TABLE - 2, -1, -1):
        chosen = tirx.if_then_else(nibble == tirx.const(entry, "uint8"), palette[entry], chosen)
    return chosen


def intrinsics() -> dict:
    """{name: (description, implementation)} of the lookup intrinsics (registered with the
    dot-product ones: intrinsics.register)."""
    return {name: _lookup(instruction) for instruction, name in INTRIN.items()}


def _lookup(instruction: str):
    from tvm.script import tirx as T

    lanes, reduce = SHAPE[instruction]
    size = lanes * reduce

    @T.prim_func(s_tir=True)
    def desc(w: T.handle, p: T.handle, u: T.handle) -> None:
        W = T.match_buffer(w, (lanes, reduce), "uint8", offset_factor=1)
        P = T.match_buffer(p, (TABLE,), "int8", offset_factor=1)
        U = T.match_buffer(u, (2, lanes, reduce), "int8", offset_factor=1)
        with T.sblock("root"):
            T.reads(W[0:lanes, 0:reduce], P[0:TABLE])
            T.writes(U[0:2, 0:lanes, 0:reduce])
            for h, i, k in T.grid(2, lanes, reduce):
                with T.sblock("unpack"):
                    vh, vi, vk = T.axis.remap("SSS", [h, i, k])
                    U[vh, vi, vk] = value(W[vi, vk], P, vh)

    bytes_ = f"uint8x{size}"
    values = f"int8x{size}"

    @T.prim_func(s_tir=True)
    def impl(w: T.handle, p: T.handle, u: T.handle) -> None:
        W = T.match_buffer(w, (lanes, reduce), "uint8", offset_factor=1)
        P = T.match_buffer(p, (TABLE,), "int8", offset_factor=1)
        U = T.match_buffer(u, (2, lanes, reduce), "int8", offset_factor=1)
        with T.sblock("root"):
            T.reads(W[0:lanes, 0:reduce], P[0:TABLE])
            T.writes(U[0:2, 0:lanes, 0:reduce])
            U[0, 0, T.ramp(0, 1, size)] = _look_up(
                instruction, P.vload([0], f"int8x{TABLE}"),
                T.reinterpret(W.vload([0, 0], bytes_) & T.broadcast(T.uint8(15), size),
                              dtype=values), size)
            U[1, 0, T.ramp(0, 1, size)] = _look_up(
                instruction, P.vload([0], f"int8x{TABLE}"),
                T.reinterpret(W.vload([0, 0], bytes_) >> T.broadcast(T.uint8(4), size),
                              dtype=values), size)

    return desc, impl


def _look_up(instruction: str, table, indices, size: int):
    """The table's entries at `indices` (int8 lanes, each 0..15), by the instruction's lookup,
    as many bytes at a time as it takes (the table copied into each of its 16-byte lanes)."""
    from tvm.script import tirx as T

    name, width = LOOKUP[instruction]
    copies = T.Shuffle([table] * (width // TABLE), list(range(width)))
    parts = [T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id(name), copies,
                                     T.Shuffle([indices], list(range(start, start + width))),
                                     dtype=f"int8x{width}")
             for start in range(0, size, width)]
    return parts[0] if len(parts) == 1 else T.Shuffle(parts, list(range(size)))


__all__ = ["INTRIN", "SHAPE", "TABLE", "intrinsics", "value"]
