"""Group-wise 4-bit weights on the int8 dot-product instructions (W4A8).

A layer's weight arrives from realize as codes c in [0, 15] (the value is c - 8), two per byte
in the logical layout [N, K/2] (byte j of row n: c[n, 2j] in the low nibble, c[n, 2j+1] in
the high one), with one scale per group of `group` consecutive reduction elements:

    y[m, n] = sum_g scale[g, n] * acc[m, g, n],  acc[m, g, n] = sum_{k in g} x[m, k] (c[n, k] - 8)

with acc an exact int32 dot product per group (the input's zero point is folded into the bias
by realize: schedules/int4_logical.py).

`int4_logical.logical_te` is that computation, written plainly: realize emits it, so that a
module is correct on any target before lowering. On a CPU with a dot-product instruction,
`repack` rewrites each such kernel onto weights packed for the instruction, still two per byte:
[N/lanes, K/(2 reduce), lanes, reduce], the low nibbles one block of `reduce` reduction
elements and the high nibbles the next, each nibble the value c - 8 in two's complement (c ^ 8).
The kernel reads a byte's low nibble shifted up by 4 and its high nibble masked with 0xF0, as
int8: 16 times the two values, one instruction each (a shift by 4 and an `and`; x86 has no byte
shift, so LLVM makes it a `vgf2p8affineqb`), where unpacking c and subtracting 8 took two; each
group's exact int32 sum is shifted down by 4 before its scale. Where the instruction has a
`narrow` variant for small weights (AVX2: one `vpmaddubsw` where int8 weights take two), the
nibbles hold c as it is and are unpacked to c - 8 (an `and` or a shift, then a subtraction),
and the sums need no shift. The default schedule
(`schedule`) unpacks each block into a 64-byte (VNNI) or 16-byte (sdot) buffer right before the
instruction consumes it, for every row of its tile: the weights cross memory in 4 bits.

Palette weights (lut4: each nibble an index into the layer's 16 int8 values) are packed the
same way, as indices, and unpacked by a table lookup instead of the shift or mask
(palette_lookup.py: `vpshufb` / `tbl`, both halves of a block at once).

8-bit weights in groups (int8 codes [N, K] in the logical kernel: a decoder's int8 layers,
their input quantized per group) are packed the same way, each half block a byte of its
own ([N/lanes, K/(2 reduce), 2, lanes, reduce]), and read by the instruction as they are.
"""

from __future__ import annotations

import numpy as np

from .intrinsics import DotProduct
from .packed_int8 import _constant, _pad_rows
from .tiles import (blocks_per_task, even_blocks_per_task, largest_divisor, row_tile,
                    target_threads)


PACKED = "qcompile_packed_int4_matmul"  # the packed kernel's accumulation block
UNPACK = "qcompile_int4_unpack"  # its weight blocks, unpacked to int8 right before use
UNPACK_VALUES = "qcompile_int4_unpack_values"  # the same, as c - 8 for a `narrow` instruction
LOOKUP = "qcompile_palette_unpack"  # the same for palette weights, by a table lookup


def packed_te(data, packed, scales, group: int, channels: int, lanes: int, reduce: int,
              *terms, names=(), palette=None, values=False):
    """The same on weights packed for an instruction: packed [N/lanes, K/(2 reduce), lanes,
    reduce] uint8, the low nibbles of byte block b holding reduction block 2b; scales and the
    per-output group terms [N/lanes, K/group, lanes] (each column block's together). 8-bit
    weights come as int8 [N/lanes, K/(2 reduce), 2, lanes, reduce], read as they are.
    `palette` (int8 [16]): the nibbles index it (palette_lookup). `values`: the nibbles are
    codes c (pack_codes' centre 0), unpacked to c - 8, not 16 times it."""
    from tvm import te

    from ..int4_logical import GroupTerms
    from .palette_lookup import value

    blocks = int(packed.shape[1])          # byte blocks: 2 * reduce reduction elements each
    per_group = group // (2 * reduce)      # byte blocks per group
    groups = int(scales.shape[1])
    four = str(packed.dtype) != "int8" and palette is None
    if palette is not None:
        unpacked = te.compute(
            (int(packed.shape[0]), blocks, 2, lanes, reduce),
            lambda nb, b, h, lane, r: value(packed[nb, b, lane, r], palette, h), name=LOOKUP)
    elif four and values:
        unpacked = te.compute(
            (int(packed.shape[0]), blocks, 2, lanes, reduce),
            lambda nb, b, h, lane, r: te.if_then_else(
                h == 0, packed[nb, b, lane, r] & te.const(15, "uint8"),
                packed[nb, b, lane, r] >> te.const(4, "uint8")).astype("int8")
            - te.const(8, "int8"),
            name=UNPACK_VALUES)
    elif four:
        unpacked = te.compute(
            (int(packed.shape[0]), blocks, 2, lanes, reduce),
            lambda nb, b, h, lane, r: te.if_then_else(
                h == 0, packed[nb, b, lane, r] << te.const(4, "uint8"),
                packed[nb, b, lane, r] & te.const(0xF0, "uint8")).astype("int8"),
            name=UNPACK)
    else:
        unpacked = packed
    kb = te.reduce_axis((0, per_group), "kb")
    h = te.reduce_axis((0, 2), "h")
    r = te.reduce_axis((0, reduce), "r")
    rows = tuple(data.shape[:-1])

    def k_of(g, b, hh, rr):
        return ((g * per_group + b) * 2 + hh) * reduce + rr

    acc = te.compute(
        (*rows, groups, channels),
        lambda *idx: te.sum(
            data[(*idx[:-2], k_of(idx[-2], kb, h, r))].astype("int32")
            * unpacked[idx[-1] // lanes, idx[-2] * per_group + kb, h, idx[-1] % lanes,
                       r].astype("int32"),
            axis=[kb, h, r]),
        name=PACKED)
    g = te.reduce_axis((0, groups), "g")
    extra = GroupTerms.of(names, terms)

    def block(t, n):
        return t[n // lanes, g, n % lanes]

    def sixteenths(a):  # 4-bit weights were read as 16 times their value
        return a >> 4 if four and not values else a

    return te.compute(
        (*rows, channels),
        lambda *idx: te.sum(extra.term(sixteenths(acc[(*idx[:-1], g, idx[-1])]),
                                       block(scales, idx[-1]).astype("float32"), idx[:-1], g,
                                       lambda t: block(t, idx[-1])), axis=[g]),
        name=PACKED + "_groups")


def pack_codes(codes: np.ndarray, lanes: int, reduce: int, centre: int = 8) -> np.ndarray:
    """Codes [N, K] (0..15, N a multiple of `lanes`, K of 2 `reduce`) -> [N/lanes,
    K/(2 reduce), lanes, reduce] uint8: low nibble block 2b, high nibble block 2b + 1; each
    nibble c ^ `centre` (8: c - 8 in two's complement; 0: a palette's index as it is)."""
    n, k = codes.shape
    blocks = codes.reshape(n // lanes, lanes, k // (2 * reduce), 2, reduce)
    low, high = blocks[:, :, :, 0, :], blocks[:, :, :, 1, :]
    low, high = low.astype(np.uint8) ^ centre, high.astype(np.uint8) ^ centre
    packed = low | (high << 4)
    return np.ascontiguousarray(packed.transpose(0, 2, 1, 3))


def pack_values(values: np.ndarray, lanes: int, reduce: int) -> np.ndarray:
    """8-bit weights [N, K] (int8) -> [N/lanes, K/(2 reduce), 2, lanes, reduce]: the 4-bit
    layout's blocks, each of its two halves a byte of its own."""
    n, k = values.shape
    blocks = values.reshape(n // lanes, lanes, k // (2 * reduce), 2, reduce)
    return np.ascontiguousarray(blocks.transpose(0, 2, 3, 1, 4)).astype(np.int8)


def unpack_logical(codes_logical: np.ndarray) -> np.ndarray:
    """[N, K/2] bytes -> [N, K] codes (0..15)."""
    low = codes_logical & 15
    high = codes_logical >> 4
    return np.stack([low, high], axis=-1).reshape(codes_logical.shape[0], -1)


# A tile of rows: up to ROWS_PER_TILE rows by BLOCKS_PER_TILE column blocks, 16 accumulator
# registers. Each unpacked weight block feeds every row of the tile: 8 rows by 2 blocks
# unpack half as often per multiply as 4 by 4 did, and a row count of 49 or 196 (a 7x7 or
# 14x14 image) tiles by 7 rows where 4 found no divisor. 1x1 convolution shapes ran 1.2-2.5x
# faster, transformer shapes (K of 384-1536) the same; 24 or 32 accumulators (8 by 3 or 4)
# were slower there (docs/studies/2026-12-06-4bit-convolutions.md).
ROWS_PER_TILE = 8
BLOCKS_PER_TILE = 2
# One row at a time (a decoded token), each task reads STREAMS column blocks side by side, each
# its own run of memory and its own chain of instructions: with one, the 4096 x 4096 product
# read its weights at 17 GB/s from memory (one sequential stream per core), with 4, 30 GB/s
# (bench/int4.py). At least MIN_TASKS tasks are left for the threads, and fewer streams are
# taken where that splits the tasks evenly over the target's cores (tiles.even_blocks_per_task:
# 576 outputs, 36 blocks, run as 12 tasks of 3, not 9 of 4; 1536 x 576 went 15.8 -> 13.3 us).
STREAMS = 4
MIN_TASKS = 8
# A column block of a short reduction is a short run of memory (K = 576: 4.6 KB), and a stream
# that ends soon is one the hardware prefetcher has barely started on. Where there are many
# blocks (at least ROUND_TASKS tasks left), each stream reads adjacent blocks in turn, so that
# it runs for about STREAM_BYTES: the 576 x 49152 product (an LM head) took 619-687 us a layer
# with streams of 4 blocks against 709-761 with one (pairs of runs in the same hour). Not on
# fewer blocks: 576 x 1536 with 2 blocks per stream (12 tasks) took 20 us against 14; and not
# on long columns: 4096 x 4096's blocks are 32 KB, and 4 per stream took 373 us against 344.
STREAM_BYTES = 16 * 1024
ROUND_TASKS = 128


def schedule(sch, block, dot: DotProduct, rows_tile: int = ROWS_PER_TILE) -> None:
    """Default schedule of a packed int4 kernel: `schedule_tiles` when its row count is known
    and above one (a prompt's chunk, a sentence, a conv's pixels), else `schedule_rows` (a
    language model's tokens, known only at run time: usually one, bound by reading and
    unpacking the weights)."""
    *batch, _, _, _, _, _ = sch.get_loops(block)
    rows = 1
    for loop in batch:
        extent = getattr(sch.get(loop).extent, "value", None)
        rows = rows * extent if isinstance(extent, int) and rows else 0
    rows_tile = min(rows_tile, max(dot.accumulators // BLOCKS_PER_TILE, 1))
    if rows > 1 and largest_divisor(rows, rows_tile) > 1:
        schedule_tiles(sch, block, dot, rows_tile)
    else:
        schedule_rows(sch, block, dot)


def schedule_tiles(sch, block, dot: DotProduct, rows_tile: int = ROWS_PER_TILE) -> None:
    """Parallel over tiles of up to `rows_tile` rows by BLOCKS_PER_TILE column blocks. Per
    tile and group, the weight blocks are unpacked once and each feeds every row's
    accumulators (rows x blocks x `lanes` int32, in registers: the loops over them are
    unrolled); the group's float sums are taken right after, from those accumulators."""
    groups_block = sch.get_consumers(block)[0]
    epilogue = sch.get_consumers(groups_block)
    *batch, cols, g = sch.get_loops(groups_block)
    rows = sch.fuse(*batch) if len(batch) > 1 else batch[0]
    mo, mi = sch.split(rows, [None, row_tile(sch.get(rows).extent, rows_tile)])
    blocks = int(sch.get(cols).extent) // dot.lanes
    no, nj, ni = sch.split(cols, [None, largest_divisor(blocks, BLOCKS_PER_TILE), dot.lanes])
    sch.reorder(mo, no, g, mi, nj, ni)
    sch.compute_at(block, g, preserve_unit_loops=True)  # one group's accumulators at a time
    row, _, col, kb, h, r = sch.get_loops(block)[-6:]
    col_block, lane = sch.split(col, [None, dot.lanes])
    sch.reorder(kb, h, row, col_block, lane, r)
    _unpack_at(sch, block, kb, h, dot)
    _epilogue_at(sch, epilogue, no)
    sch.vectorize(ni)
    sch.parallel(sch.fuse(mo, no))
    _instruction_at(sch, block, kb, lane, dot)
    sch.unroll(row)
    sch.unroll(col_block)


def schedule_rows(sch, block, dot: DotProduct) -> None:
    """Parallel over rows and groups of up to STREAMS streams, each reading `_rounds` adjacent
    column blocks in turn; per group of weights, each block's `lanes` int32 accumulators are
    filled by the instruction from a just-unpacked weight block; then the blocks' float sums
    over the groups, while their accumulators are still in cache, `lanes` at a time (the
    scales of one block are contiguous)."""
    groups_block = sch.get_consumers(block)[0]
    *batch, g, cols, kb, h, r = sch.get_loops(block)
    rows = sch.fuse(*batch) if len(batch) > 1 else batch[0]
    total = int(sch.get(cols).extent) // dot.lanes
    reduction = 1
    for loop in (g, kb, h, r):
        reduction *= int(sch.get(loop).extent)
    four = any(sch.get(p).name_hint in (UNPACK, UNPACK_VALUES, LOOKUP)
               for p in sch.get_producers(block))
    turns = _rounds(total, reduction * dot.lanes // (2 if four else 1))
    blocks = even_blocks_per_task(total // turns, STREAMS, MIN_TASKS, target_threads())
    no, nb, rounds, ni = sch.split(cols, [None, blocks, turns, dot.lanes])
    sch.reorder(rows, no, rounds, g, kb, h, nb, ni, r)
    _unpack_at(sch, block, kb, h, dot)
    sch.unroll(nb)
    epilogue = sch.get_consumers(groups_block)
    sch.reverse_compute_at(groups_block, no, preserve_unit_loops=True)
    *_, lanes_loop, g_loop = sch.get_loops(groups_block)
    column_block, lanes_loop = sch.split(lanes_loop, [None, dot.lanes])
    sch.reorder(g_loop, column_block, lanes_loop)
    sch.unroll(column_block)
    _epilogue_at(sch, epilogue, no)
    sch.vectorize(lanes_loop)
    sch.parallel(sch.fuse(rows, no))
    _instruction_at(sch, block, kb, ni, dot)


def _rounds(total: int, block_bytes: int) -> int:
    """How many adjacent column blocks (of `block_bytes` each) each stream reads in turn: up
    to STREAM_BYTES of weights, a divisor of the `total` blocks that still leaves ROUND_TASKS
    tasks of STREAMS streams (1 where none does)."""
    return blocks_per_task(total, -(-STREAM_BYTES // block_bytes), 1, STREAMS * ROUND_TASKS)


def _unpack_at(sch, block, kb, h, dot: DotProduct) -> None:
    """Unpack each weight block right before the instruction consumes it: a 4-bit block's half
    under `h`; a palette block's two halves under `kb`, by the lookup instruction (where the
    target has one: palette_lookup)."""
    from .intrinsics import register
    from .palette_lookup import INTRIN

    for producer in sch.get_producers(block):
        name = sch.get(producer).name_hint
        if name in (UNPACK, UNPACK_VALUES):
            sch.compute_at(producer, h, preserve_unit_loops=True)
            inner = sch.get_loops(producer)
            sch.vectorize(sch.fuse(inner[-2], inner[-1]))
        elif name == LOOKUP:
            sch.compute_at(producer, kb, preserve_unit_loops=True)
            if dot.instruction in INTRIN:
                register()
                sch.tensorize(sch.get_loops(producer)[-3], INTRIN[dot.instruction])


def _instruction_at(sch, block, reduction, lanes, dot: DotProduct) -> None:
    """Zero the accumulators before `reduction` (vectorized) and make `lanes` the
    instruction (its `narrow` variant on weights unpacked to their 4-bit values)."""
    narrow = any(sch.get(p).name_hint == UNPACK_VALUES for p in sch.get_producers(block))
    init = sch.decompose_reduction(block, reduction)
    sch.vectorize(sch.get_loops(init)[-1])
    sch.tensorize(lanes, dot.narrow if narrow else dot.intrin)


def _epilogue_at(sch, epilogue, loop) -> None:
    """The scale, bias and bounds after the group sums, on each tile's outputs."""
    for consumer in epilogue:
        sch.reverse_compute_at(consumer, loop, preserve_unit_loops=True)
        sch.vectorize(sch.get_loops(consumer)[-1])


def repack(mod, dot: DotProduct):
    """`mod` with every logical W4A8 kernel call (int4_logical) on weights packed for `dot`
    (sdot for an smmla target: the kernel multiplies one row at a time), where its input's type
    is the instruction's; the others keep the logical kernel."""
    import tvm
    from tvm import relax, topi

    from .. import rewrite_relax_functions
    from ..int4_logical import FUNC_ATTR as LOGICAL_ATTR, PALETTE_ATTR, TERMS_ATTR, GroupTerms

    chosen = dot if dot.rows == 1 else dot.fallback
    logical = {gv: func for gv, func in mod.functions.items()
               if isinstance(func, tvm.tirx.PrimFunc) and func.attrs is not None
               and LOGICAL_ATTR in func.attrs}
    if chosen is None or not logical:
        return mod
    call_tir = tvm.ir.Op.get("relax.call_tir")

    @relax.expr_functor.mutator
    class Repack(relax.PyExprMutator):
        def visit_call_(self, call):
            call = super().visit_call_(call)
            if not (call.op.same_as(call_tir) and call.args[0] in logical):
                return call
            data, codes, scales, *terms = call.args[1].fields
            attrs = logical[call.args[0]].attrs
            palette = terms.pop() if PALETTE_ATTR in attrs else None
            group = int(attrs[LOGICAL_ATTR])
            names = [n for n in str(attrs.get(TERMS_ATTR, "")).split(",") if n]
            pairs, scale = _constant(codes), _constant(scales)
            if pairs is None or scale is None or \
                    str(data.ty.dtype) != chosen.activation_dtype or \
                    group % (2 * chosen.reduce):
                return call
            channels = pairs.shape[0]
            eight = pairs.dtype == np.int8  # 8-bit weights: their values, not code pairs
            values = not eight and palette is None and chosen.narrow is not None
            codes_nk = pairs if eight else unpack_logical(pairs)
            codes_nk = np.pad(codes_nk, ((0, -channels % chosen.lanes), (0, 0)),
                              constant_values=0 if eight else 8)
            if eight:
                packed = pack_values(codes_nk, chosen.lanes, chosen.reduce)
            else:
                packed = pack_codes(codes_nk, chosen.lanes, chosen.reduce,
                                    centre=0 if palette is not None or values else 8)

            def blocks(expr):  # [groups, N] -> [N padded / lanes, groups, lanes]
                value = _pad_rows(_constant(expr), 1, chosen.lanes)
                value = value.reshape(value.shape[0], -1, chosen.lanes).transpose(1, 0, 2)
                return relax.const(np.ascontiguousarray(value), str(value.dtype))

            terms = [blocks(t) if name in GroupTerms.PER_OUTPUT else t
                     for name, t in zip(names, terms)]
            out = self.builder_.call_te(
                packed_te, data, relax.const(packed, str(packed.dtype)), blocks(scales), group,
                codes_nk.shape[0], chosen.lanes, chosen.reduce, *terms, names=names,
                primfunc_name_hint="packed_int4_matmul", values=values,
                **({} if palette is None else {"palette": palette}))
            if codes_nk.shape[0] == channels:
                return out
            axis = len(data.ty.shape) - 1
            return self.builder_.call_te(topi.strided_slice, self.builder_.emit(out), [0],
                                         [channels], [1], [axis],
                                         primfunc_name_hint="packed_channels")

    return relax.transform.DeadCodeElimination()(rewrite_relax_functions(mod, Repack(mod)))


def schedule_kernel(sch, dot: DotProduct) -> bool:
    """Schedule the kernel's packed int4 block if it has one (whether it did)."""
    chosen = dot if dot.rows == 1 else dot.fallback
    for block in sch.get_child_blocks(sch.get_sblock("root")):
        if sch.get(block).name_hint == PACKED and chosen is not None:
            schedule(sch, block, chosen)
            return True
    return False
