"""Default schedules for the packed int8 kernels: used when no tuning record covers a kernel.

Without them an untuned int8 kernel is a serial scalar loop nest. Each packed conv2d/matmul
(and whatever requantize/clip epilogue FuseOps put in the same kernel) is scheduled the way a
tuned one would be, with fixed tile sizes instead of searched ones:

- conv2d: parallel over image rows and groups of output blocks; tiles of pixels x output
  blocks of `lanes` channels (`conv_tile`: about 16 accumulators, the fewest loads per
  instruction) accumulate in registers, the inner `lanes` x 4 block is the dot-product
  instruction, and the epilogue runs on each tile in `lanes`-wide vectors while the tile is
  still in cache;
- matmul: the same with tiles of up to 8 rows x output blocks, parallel over tiles (one row:
  several output blocks per tile, each its own chain of instructions);
- depthwise conv2d: parallel over image rows; per row and 16 channels, the padded input rows
  the window reads are copied (vectorized) into a small buffer, then tiles of up to 8 pixels
  accumulate in int32, each kernel row's taps 4 at a time through the depthwise intrinsic,
  and the epilogue runs on each tile. (The epilogue's loop over the tile's pixels is
  unrolled: left a loop of 8, LLVM turned its stores into byte scatters, 3x slower.)

MetaSchedule tuning replaces these with measured ones (`qcompile tune`).
"""

from __future__ import annotations

import logging

from .intrinsics import DEPTHWISE_INTRIN, DEPTHWISE_LANES, DotProduct, register
from .. import SCHEDULE_ATTR
from .tiles import (accumulate_in_tile, blocks_per_task, inline_epilogue, largest_divisor,
                    row_tile, schedule_each)
from . import packed_int4
from .packed_int8 import CONV_BLOCK, DEPTHWISE_BLOCK, MATMUL_BLOCK, block_name

PACKED = "packed-int8"  # SCHEDULE_ATTR's value on the kernels scheduled here
TILE_PIXELS = 8
TILE_ROWS = 8
ACCUMULATORS = 16  # int32 vector accumulators per tile (pixels or rows x output blocks)
ALL_BLOCKS = 24    # ... or up to this many when they cover all the output channels
# (the target's DotProduct.accumulators in place of 16, and 3/2 of it in place of 24)
TILE_PIXELS_MOST = 16  # pixels per conv tile, at most
MIN_PARALLEL = 8   # parallel tasks a tile size must leave (output rows x column tiles)
PAD_BLOCK = "PadInput"  # topi.nn.pad's block


def packed_block(sch, dot: DotProduct):
    """(the packed conv/matmul block, whether it is a conv, the instruction it is packed for:
    `dot` or its fallback), or (None, False, None) when the kernel has none."""
    for block in sch.get_child_blocks(sch.get_sblock("root")):
        name = sch.get(block).name_hint
        for kind in (CONV_BLOCK, MATMUL_BLOCK):
            for choice in dot.choices():
                if name.startswith(block_name(kind, choice)):
                    return block, kind == CONV_BLOCK, choice
    return None, False, None


def conv_tile(width: int, blocks: int, rows: int,
              accumulators: int = ACCUMULATORS) -> tuple[int, int]:
    """(pixels, output blocks) of a conv tile: a divisor of the row's width by a divisor of
    the output blocks, with at most `accumulators` accumulators (3/2 as many when the tile
    covers all the output channels: each input pixel is then read once), the fewest loads per
    instruction ((pixels + blocks) / their product), then the most accumulators, leaving at
    least MIN_PARALLEL tasks over the `rows` image rows. On EfficientNet-Lite0's 1x1 convs
    (AVX-512, 2 threads) these tiles came within 1.0-1.45x of the tuned records, where tiles of
    8 pixels x 1 block took 1.4-3.8x (tuning_logs/README.md). More accumulators are not always
    faster: 7x7, 192 -> 1152 in 7 pixels x 3 blocks took 30 us, in 7 x 2 24 us."""
    options = []
    for pixels in (d for d in range(1, min(width, TILE_PIXELS_MOST) + 1) if width % d == 0):
        for per in (d for d in range(1, blocks + 1) if blocks % d == 0):
            most = accumulators * ALL_BLOCKS // ACCUMULATORS if per == blocks else accumulators
            if pixels * per <= most and rows * (blocks // per) >= min(MIN_PARALLEL, rows * blocks):
                options.append((-(pixels + per) / (pixels * per), pixels * per, pixels, per))
    _, _, pixels, per = max(options)
    return pixels, per


def column_blocks(blocks: int, tile: int, outer: int,
                  accumulators: int = ACCUMULATORS) -> int:
    """Output blocks per tile beside `tile` rows: as many as give up to `accumulators`
    accumulators while the `outer` x blocks / that tiles still give MIN_PARALLEL tasks."""
    return blocks_per_task(blocks, max(accumulators // tile, 1), outer, MIN_PARALLEL)


def schedule_conv(sch, block, dot: DotProduct) -> None:
    if dot.rows == 2:
        return schedule_conv_pairs(sch, block, dot)
    n, y, x, o, r, s, io, ii = sch.get_loops(block)
    width, channels = int(sch.get(x).extent), int(sch.get(o).extent)
    rows = int(sch.get(y).extent) * int(sch.get(n).extent)
    pixels, per_tile = conv_tile(width, channels // dot.lanes, rows, dot.accumulators)
    xo, xi = sch.split(x, [None, pixels])
    oo, ob, oi = sch.split(o, [None, per_tile, dot.lanes])
    sch.reorder(n, y, oo, xo, r, s, io, xi, ob, oi, ii)
    accumulate_in_tile(sch, block, xo, vector=dot.lanes)
    sch.parallel(sch.fuse(n, y, oo))
    init = sch.decompose_reduction(block, r)
    sch.vectorize(sch.get_loops(init)[-1])
    sch.tensorize(oi, dot.intrin)
    sch.unroll(ob)
    sch.unroll(xi)


def schedule_matmul(sch, block, dot: DotProduct) -> None:
    if dot.rows == 2:
        return schedule_matmul_pairs(sch, block, dot)
    loops = sch.get_loops(block)
    *batch, cols, ko, ki = loops
    rows = sch.fuse(*batch) if len(batch) > 1 else batch[0]
    # 1 for rows known only at run time
    tile = row_tile(sch.get(rows).extent, min(TILE_ROWS, dot.accumulators))
    per_tile = column_blocks(int(sch.get(cols).extent) // dot.lanes, tile,
                             getattr(sch.get(rows).extent, "value", 1) // tile,
                             dot.accumulators)
    mo, mi = sch.split(rows, [None, tile])
    no, nb, ni = sch.split(cols, [None, per_tile, dot.lanes])
    sch.reorder(mo, no, ko, mi, nb, ni, ki)
    accumulate_in_tile(sch, block, no, vector=dot.lanes)
    sch.parallel(sch.fuse(mo, no))
    init = sch.decompose_reduction(block, ko)
    sch.vectorize(sch.get_loops(init)[-1])
    sch.tensorize(ni, dot.intrin)
    sch.unroll(nb)
    sch.unroll(mi)


PAIR_TILE = 4  # pixel pairs x channel pairs per tile for smmla: 8 x 8 int32 accumulators


def schedule_conv_pairs(sch, block, dot: DotProduct) -> None:
    """conv2d with an instruction taking two pixels (smmla): tiles of up to 8 pixels x 8
    channels, each instruction 2 pixels x 2 channels x 8 input channels."""
    n, y, x, o, r, s, io, ii = sch.get_loops(block)
    width, channels = int(sch.get(x).extent), int(sch.get(o).extent)
    pairs = largest_divisor(width // 2, PAIR_TILE)
    cpairs = largest_divisor(channels // dot.lanes, PAIR_TILE)
    xo, xm, x2 = sch.split(x, [None, pairs, 2])
    oo, om, o2 = sch.split(o, [None, cpairs, dot.lanes])
    sch.reorder(n, y, xo, oo, r, s, io, xm, om, x2, o2, ii)
    accumulate_in_tile(sch, block, oo)
    sch.parallel(sch.fuse(n, y))
    init = sch.decompose_reduction(block, r)
    sch.vectorize(sch.get_loops(init)[-1])
    sch.tensorize(x2, dot.intrin)


def schedule_matmul_pairs(sch, block, dot: DotProduct) -> None:
    loops = sch.get_loops(block)
    *batch, cols, ko, ki = loops
    rows = sch.fuse(*batch) if len(batch) > 1 else batch[0]
    extent, width = int(sch.get(rows).extent), int(sch.get(cols).extent)
    mo, mm, m2 = sch.split(rows, [None, largest_divisor(extent // 2, PAIR_TILE), 2])
    no, nm, n2 = sch.split(cols, [None, largest_divisor(width // dot.lanes, PAIR_TILE),
                                  dot.lanes])
    sch.reorder(mo, no, ko, mm, nm, m2, n2, ki)
    accumulate_in_tile(sch, block, no)
    sch.parallel(sch.fuse(mo, no))
    init = sch.decompose_reduction(block, ko)
    sch.vectorize(sch.get_loops(init)[-1])
    sch.tensorize(m2, dot.intrin)


def depthwise_block(sch):
    """The kernel's packed depthwise block, or None."""
    for block in sch.get_child_blocks(sch.get_sblock("root")):
        if sch.get(block).name_hint == DEPTHWISE_BLOCK:
            return block
    return None


def schedule_depthwise(sch, block, dot: DotProduct) -> None:
    from tvm.s_tir import ScheduleError

    keep = (DEPTHWISE_BLOCK, PAD_BLOCK)
    changed = True
    while changed:  # the epilogue inlined; the padding stays a step of its own
        changed = False
        for other in sch.get_child_blocks(sch.get_sblock("root")):
            if sch.get(other).name_hint in keep:
                continue
            try:
                sch.compute_inline(other)
                changed = True
                break
            except ScheduleError:
                pass
    pads = [b for b in sch.get_producers(block) if sch.get(b).name_hint == PAD_BLOCK]
    n, y, x, c, r, g, k = sch.get_loops(block)
    xo, xi = sch.split(x, [None, largest_divisor(int(sch.get(x).extent),
                                                  min(TILE_PIXELS, dot.accumulators))])
    co, ci = sch.split(c, [None, DEPTHWISE_LANES])
    sch.reorder(n, y, co, xo, r, g, xi, ci, k)
    accumulate_in_tile(sch, block, xo)
    for consumer in sch.get_consumers(block):
        loops = sch.get_loops(consumer)
        if len(loops) >= 2:
            sch.unroll(loops[-2])
    rows = sch.fuse(n, y)
    if pads:
        pad = pads[0]
        sch.compute_at(pad, co, preserve_unit_loops=True)
        sch.vectorize(sch.get_loops(pad)[-1])
    sch.parallel(rows)
    init = sch.decompose_reduction(block, r)
    sch.vectorize(sch.get_loops(init)[-1])
    sch.tensorize(ci, DEPTHWISE_INTRIN[dot.instruction])
    sch.unroll(xi)


def schedule(func, dot: DotProduct):
    """The Schedule of `func` on our default schedule, or None when it has no packed int8
    block."""
    from tvm.s_tir import Schedule

    sch = Schedule(func)
    depthwise = depthwise_block(sch)
    if depthwise is not None:
        schedule_depthwise(sch, depthwise, dot)
        return sch
    block, is_conv, chosen = packed_block(sch, dot)
    if block is None:
        inline_epilogue_int4(sch)
        return sch if packed_int4.schedule_kernel(sch, dot) else None
    inline_epilogue(sch, block, keep_producers=True)
    (schedule_conv if is_conv else schedule_matmul)(sch, block, chosen)
    return sch


def inline_epilogue_int4(sch) -> None:
    """A packed int4 kernel's elementwise epilogue (the blocks after its group sums) inlined
    into its last block; the blocks before the sums (unpacking, padding) stay."""
    from tvm.s_tir import ScheduleError

    blocks = sch.get_child_blocks(sch.get_sblock("root"))
    names = [sch.get(b).name_hint for b in blocks]
    if packed_int4.PACKED + "_groups" not in names:
        return
    for block in blocks[names.index(packed_int4.PACKED + "_groups") + 1:-1]:
        try:
            sch.compute_inline(block)
        except ScheduleError:
            pass


def schedule_kernel(func, dot: DotProduct):
    """`func` scheduled, or None when it has no packed int8 block."""
    sch = schedule(func, dot)
    return None if sch is None else sch.mod["main"].with_attr(SCHEDULE_ATTR, PACKED)


def apply(mod, dot: DotProduct):
    """Schedule every packed int8 kernel of `mod` that has no schedule yet (tuned ones keep
    theirs). A kernel our schedule cannot handle keeps TVM's default code, with a warning."""
    register()
    return schedule_each(mod, lambda func: schedule_kernel(func, dot), logging.WARNING)
