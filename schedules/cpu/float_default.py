"""Default CPU schedules for the kernels that have neither a tuning record nor a packed int8
schedule: fp32/fp16 conv2d (dense, grouped, depthwise; NCHW or NHWC), matmul and
batch matmul, and the depthwise int8 convs of a quantized model.

Without them such a kernel is TVM's legalized loop nest, serial and scalar: EfficientNet-Lite0
in fp32 took 257 ms here against onnxruntime's 8 ms. The schedule is the textbook
register-tiled one, with fixed tile sizes instead of searched ones:

- the kernel's multiply-accumulate block (its "anchor": the one block with reduction loops
  that reads two or more buffers) is tiled over two of its output axes: the output's innermost
  axis `v` (contiguous in memory: vectorized, up to VECTOR elements, or the register width
  where it divides the axis) and an axis `t` that the vectorized operand does not depend on
  (unrolled, up to ROWS, in as few tiles as cover it: a 13-pixel row in tiles of 7 and 6,
  the second cut short by a condition), so that each vector load of that operand is reused
  ROWS times, each scalar of the other is broadcast, and ROWS independent sums hide the
  latency of the multiply-adds (one row at a time ran at a tenth of the speed);
- the reduction runs inside the tile, which accumulates in a small buffer; the elementwise
  epilogue (bias, clip, residual add) runs on each tile while it is still in cache;
- the loops above the tile run in parallel;
- an operand that the vector axis reads with a stride (the OHWI weights of an NHWC conv) is
  copied once per call into a layout where it is contiguous; only small operands (weights)
  are, so the copy costs little next to the kernel.

A matrix-vector product (one row: no `t` axis to tile) gets a WIDE_VECTOR-wide tile instead,
so that every weight row it touches is read by whole cache lines (a 49152 x 576 projection:
37 -> 10.5 ms here). An axis whose extent is known only at run time (a decoder's tokens) is
never used as `t`: one token must not pay for ROWS. A vector axis of such an extent (attention
scores over the cached tokens) is computed over its extent rounded up to the tile, on operands
padded with zeros: a bounds check inside the vector loop (the fallback, where the padding
cannot be done) keeps it scalar.

Kernels without such a block (softmax, layer norm, reshapes) get the intermediate steps that
one step reads inlined, and are scheduled row by row (rows.py): in parallel over the rows,
vectorized along them; where that does not apply, their outer loops run in parallel.
MetaSchedule tuning replaces all of these with measured schedules (`qcompile tune`).
"""

from __future__ import annotations

import logging

from .. import SCHEDULE_ATTR
from . import rows, windows
from .tiles import (accumulate_in_tile, fewest_tiles, inline_epilogue, largest_divisor,
                    schedule_each, vars_of)

log = logging.getLogger(__name__)

KINDS = ("float", "windows", "rows", "parallel")  # SCHEDULE_ATTR values set here
VECTOR = 8    # output elements per vector tile (one AVX2 / two NEON fp32 registers)
# A CPU with wider registers (AVX-512: 16 floats) takes tiles of its width where the axis
# divides by it: ddddocr's detector in fp32 here 44 -> 30 ms, its 3x3 convs 160 -> 255 GOPS.
# Elsewhere VECTOR, so that a channel count such as 24 or 40 is not cut into odd vectors.
ROWS = 8      # rows of the register tile
COLUMNS = 2   # vector tiles side by side in the register tile, where the axis divides
# (ROWS x COLUMNS = 16 accumulators; native runner here, fp32: EfficientNet-Lite0 3.93 -> 3.73
# ms, paraphrase-MiniLM-L3-v2 2.83 -> 2.41 ms against one column)
WIDE_VECTOR = 64  # output elements per tile when there are no rows to tile
# (EfficientNet-Lite0 fp32 here: 8 x 8 35 ms, 4 x 8 38 ms, 4 x 16 45 ms, 8 x 16 47 ms)
MIN_PARALLEL = 4096  # elements of output below which a kernel stays on one thread
# ... unless it does this many multiply-adds: EfficientNet-Lite0's classifier (1000 outputs,
# a 5 MB weight) ran on one thread, 0.45 ms against onnxruntime's 0.08
MIN_PARALLEL_MACS = 1 << 18
SYMBOLIC = 1 << 20   # the size assumed for an extent known only at run time (a sequence)


def _extent(expr, unknown: int = SYMBOLIC) -> int:
    """A loop's or a buffer's extent as an int; `unknown` when it is known only at run time."""
    value = getattr(expr, "value", None)
    return int(value) if isinstance(value, int) else unknown


def _tile(expr, size: int) -> int:
    """The tile for an axis: the largest divisor of its extent up to `size`, or `size` itself
    for a run-time extent (the last tile is then cut by a condition)."""
    value = getattr(expr, "value", None)
    return largest_divisor(int(value), size) if isinstance(value, int) else size


def vector_tile(extent: int, lanes: int) -> int:
    """The vector tile of an output axis of `extent` elements (known at compile time): `lanes`
    (the CPU's register width in floats) when it is wider than VECTOR and divides the axis,
    else the largest divisor up to VECTOR. The packed float weights (packed_float.py) are cut
    into panels of this width."""
    if lanes > VECTOR and extent % lanes == 0:
        return lanes
    return largest_divisor(extent, VECTOR)


def _vector_tile(expr, lanes: int) -> int:
    """`vector_tile` of a loop extent; VECTOR for one known only at run time."""
    extent = _extent(expr)
    return VECTOR if extent == SYMBOLIC else vector_tile(extent, lanes)


def lanes_of(tvm_target) -> int:
    """Float lanes of the target's widest vector register, at least VECTOR."""
    from tvm.target import codegen

    if tvm_target is None or tvm_target.kind.name != "llvm":
        return VECTOR
    return max(VECTOR, int(codegen.llvm_get_vector_width(tvm_target)) // 32)


def _anchor(sch):
    """The kernel's one multiply-accumulate block, or None (no such block, or several): a block
    with reduction axes that reads two or more buffers along them (a layer norm's sum of
    squared deviations reads its mean once per row: not one)."""
    found = []
    for block in sch.get_child_blocks(sch.get_sblock("root")):
        stmt = sch.get(block)
        reduced = {iv.var.name for iv in stmt.iter_vars if iv.iter_type != 0}
        along = [r for r in stmt.reads
                 if any(vars_of(e.min) & reduced for e in r.region)]
        if reduced and len(along) >= 2:
            found.append(block)
    return found[0] if len(found) == 1 else None


def _dims_using(region, var_name: str) -> list[int]:
    """The dimensions of a buffer region whose index uses `var_name`."""
    return [d for d, r in enumerate(region.region) if var_name in vars_of(r.min)]


def _make_contiguous(sch, block, var_name: str, output_elements: int) -> None:
    """Copy each small operand that the vector axis reads with a stride into a layout where
    the dimension it reads along comes last (e.g. OHWI weights -> HWIO)."""
    from tvm.s_tir import ScheduleError

    stmt = sch.get(block)
    for index, read in enumerate(stmt.reads):
        dims = _dims_using(read, var_name)
        shape = [_extent(s) for s in read.source.shape]
        size = 1
        for s in shape:
            size *= s
        if len(dims) != 1 or dims[0] == len(shape) - 1 or size * 4 > output_elements:
            continue
        moved = dims[0]
        order = [d for d in range(len(shape)) if d != moved] + [moved]
        try:
            copy = sch.cache_read(block, index, "global")
            sch.transform_layout(copy, ("write", 0), _permutation(order))
        except ScheduleError as exc:
            log.debug("operand %s stays strided: %s", read.source.name, exc)


def _permutation(order: list[int]):
    from tvm.tirx import IndexMap

    return IndexMap.from_func(lambda *idx: [idx[d] for d in order], ndim=len(order),
                              index_dtype="int64")


def _output_elements(stmt, unknown: int = SYMBOLIC) -> int:
    """How many elements a block writes: the product of its spatial axes' extents (an extent
    known only at run time counts as `unknown`)."""
    elements = 1
    for iv in stmt.iter_vars:
        if iv.iter_type == 0:
            elements *= _extent(iv.dom.extent, unknown)
    return elements


def _parallel_outer(sch, block) -> bool:
    """Run a block's outer loops in parallel (up to two of them fused), when it writes enough
    elements, counting an extent known only at run time as 1 (a language model's one new
    token: waking the thread pool for a row of elementwise work costs more than the work);
    whether it did."""
    from tvm.s_tir import ScheduleError

    stmt = sch.get(block)
    loops = sch.get_loops(block)
    if not loops or _output_elements(stmt, unknown=1) < MIN_PARALLEL:
        return False
    spatial = 0
    for iv in stmt.iter_vars:
        if iv.iter_type != 0:
            break
        spatial += 1
    outer = loops[:min(2, spatial, len(loops) - 1)] if spatial > 1 else loops[:1]
    if not outer:
        return False
    try:
        sch.parallel(sch.fuse(*outer) if len(outer) > 1 else outer[0])
    except ScheduleError:
        return False
    return True


def schedule_anchor(sch, block, lanes: int = VECTOR) -> None:
    from tvm.s_tir import ScheduleError

    stmt = sch.get(block)
    loops = sch.get_loops(block)
    if len(loops) != len(stmt.iter_vars):
        raise ScheduleError("the block's loops are not one per axis")
    spatial, reduction = _axes(sch, block)
    if [iv for _, iv in spatial] != list(stmt.iter_vars[:len(spatial)]):
        raise ScheduleError("reduction axes come before output axes")
    output_elements = _output_elements(stmt)
    v_loop, v_iv = spatial[-1]
    # a copy must be cheap next to the work even when a run-time extent is 1 (one token)
    _make_contiguous(sch, block, v_iv.var.name, _output_elements(stmt, unknown=1))
    stmt = sch.get(block)
    # the operands read contiguously along v; t is an axis none of them depends on
    contiguous = [r for r in stmt.reads if _dims_using(r, v_iv.var.name) == [len(r.region) - 1]]
    used = set()
    for read in contiguous:
        for r in read.region:
            used |= vars_of(r.min)
    t_index = None
    # rows of a run-time extent (tokens) are not tiled: one token must not pay for ROWS
    for i, (_, iv) in reversed(list(enumerate(spatial[:-1]))):
        if iv.var.name not in used and 1 < _extent(iv.dom.extent) < SYMBOLIC:
            t_index = i
            break
    if t_index is None and len(spatial) > 1 and \
            1 < _extent(spatial[-2][1].dom.extent) < SYMBOLIC:
        t_index = len(spatial) - 2  # no reuse to gain: still several rows per tile
    # without rows to reuse each loaded vector (a matrix-vector product), a wider tile reads
    # whole cache lines of every operand row it touches
    width = VECTOR if t_index is not None else WIDE_VECTOR
    if _extent(v_iv.dom.extent) == SYMBOLIC and _pad_vector_axis(sch, block, width):
        spatial, reduction = _axes(sch, block)
        v_loop, v_iv = spatial[-1]
    tile = _vector_tile(v_iv.dom.extent, lanes) if t_index is not None else \
        _tile(v_iv.dom.extent, width)
    # (an extent known only at run time counts as 1: its tiles are cut by a condition)
    columns = COLUMNS if t_index is not None and \
        _extent(v_iv.dom.extent, unknown=1) % (COLUMNS * tile) == 0 else 1
    vo, vc, vi = sch.split(v_loop, [None, columns, tile])
    outer = [loop for i, (loop, _) in enumerate(spatial[:-1]) if i != t_index]
    if t_index is not None:
        t_loop, t_iv = spatial[t_index]
        to, ti = sch.split(t_loop, [None, fewest_tiles(_extent(t_iv.dom.extent), ROWS)])
        tiles = [vo, to] if _panels_outweigh_rows(sch.get(block), v_iv, t_iv) else [to, vo]
        sch.reorder(*outer, *tiles, *reduction, ti, vc, vi)
        tile_outer = [*outer, *tiles]
    else:
        ti = None
        sch.reorder(*outer, vo, *reduction, vc, vi)
        tile_outer = [*outer, vo]
    accumulate_in_tile(sch, block, tile_outer[-1], vector=tile if columns > 1 else None)
    sch.unroll(vc)
    macs = output_elements
    for loop in reduction:
        macs *= _extent(sch.get(loop).extent)
    if output_elements >= MIN_PARALLEL or macs >= MIN_PARALLEL_MACS:
        sch.parallel(sch.fuse(*tile_outer) if len(tile_outer) > 1 else tile_outer[0])
    if ti is not None:
        sch.unroll(ti)
    sch.vectorize(vi)
    if reduction:
        sch.decompose_reduction(block, reduction[0])


def _operand_bytes(stmt, var_name: str, other_name: str) -> int:
    """Bytes of the block's operands that `var_name` indexes and `other_name` does not."""
    total = 0
    for read in stmt.reads:
        used = set()
        for r in read.region:
            used |= vars_of(r.min)
        if var_name in used and other_name not in used:
            size = read.source.dtype.bits // 8
            for extent in read.source.shape:
                size *= _extent(extent)
            total += size
    return total


def _panels_outweigh_rows(stmt, v_iv, t_iv) -> bool:
    """Whether the operands read along the vector axis (a matmul's weights: its column panels)
    are larger than those read along the rows (its input): the panels' loop then goes
    outside the rows' loop, so that each panel is read from memory once and used for every
    row tile while in cache, and the smaller operand is the one read again. MiniLM's FFN
    matmuls (weights 2.4 MB, inputs 98 KB) read their weights once per row tile otherwise."""
    v_name, t_name = v_iv.var.name, t_iv.var.name
    return _operand_bytes(stmt, v_name, t_name) > _operand_bytes(stmt, t_name, v_name)


def _axes(sch, block) -> tuple[list, list]:
    """The block's (loop, iter var) pairs of its output axes, and its reduction loops."""
    loops = sch.get_loops(block)
    iter_vars = sch.get(block).iter_vars
    spatial = [(loop, iv) for loop, iv in zip(loops, iter_vars) if iv.iter_type == 0]
    reduction = [loop for loop, iv in zip(loops, iter_vars) if iv.iter_type != 0]
    return spatial, reduction


def _pad_vector_axis(sch, block, width: int) -> bool:
    """Compute the block over its vector axis, of a length known only at run time (attention
    scores over the cached tokens), rounded up to a multiple of `width`: its operand along
    that axis copied with zeros after the end, the result read back up to the length. The
    tile's vector loop then has no bounds check, which kept it scalar (the scores of a
    32-token chunk took 0.32 ms a layer, 0.05 ms padded).
    Whether it could."""
    from tvm.s_tir import ScheduleError

    axes = len(sch.get(block).iter_vars)
    spatial = sum(1 for iv in sch.get(block).iter_vars if iv.iter_type == 0)
    padding = [1] * axes
    padding[spatial - 1] = width
    try:
        sch.pad_einsum(block, padding)
    except ScheduleError as exc:
        log.debug("the vector axis keeps its bounds check: %s", exc)
        return False
    for consumer in sch.get_consumers(block):  # the copy back: read by the epilogue directly
        try:
            sch.compute_inline(consumer)
        except ScheduleError:
            pass  # it writes the kernel's output: it runs on each tile
    for producer in sch.get_producers(block):  # the padded operand's copy
        _parallel_outer(sch, producer)
    return True


def schedule(func, lanes: int = VECTOR):
    """(the Schedule of `func`, "float") when it has a multiply-accumulate block to tile,
    (the Schedule, "windows") when it is a pool along the outer axes (windows.py),
    (the Schedule, "rows") when it runs row by row (rows.py), (the Schedule, "parallel") when
    only its outer loops run in parallel, or None."""
    from tvm.s_tir import Schedule

    sch = Schedule(func)
    block = _anchor(sch)
    if block is not None:
        inline_epilogue(sch, block)
        for producer in sch.get_producers(block):  # padding, transposes: in parallel
            _parallel_outer(sch, producer)
        schedule_anchor(sch, block, lanes)
        return sch, "float"
    inline_single_use(sch)
    by_window = sch.copy()
    if windows.schedule(by_window, lanes, MIN_PARALLEL):
        return by_window, "windows"
    by_rows = sch.copy()
    if rows.schedule(by_rows, MIN_PARALLEL):
        return by_rows, "rows"
    changed = [_parallel_outer(sch, child)
               for child in sch.get_child_blocks(sch.get_sblock("root"))]
    return (sch, "parallel") if any(changed) else None


def inline_single_use(sch) -> None:
    """Inline each intermediate block that exactly one block reads (casts, shifts, the halves
    of a split): FuseTIR leaves one block per op, each writing a whole buffer. A block read by
    several (softmax's exp) stays, so nothing is computed twice."""
    from tvm.s_tir import ScheduleError

    changed = True
    while changed:
        changed = False
        for block in sch.get_child_blocks(sch.get_sblock("root")):
            if len(sch.get_consumers(block)) != 1:
                continue
            try:
                sch.compute_inline(block)
            except ScheduleError:
                continue
            changed = True
            break


def schedule_kernel(func, lanes: int = VECTOR):
    """`func` scheduled, or None when it has no loops worth scheduling."""
    found = schedule(func, lanes)
    if found is None:
        return None
    sch, kind = found
    return sch.mod["main"].with_attr(SCHEDULE_ATTR, kind)


def apply(mod, lanes: int = VECTOR):
    """Schedule every kernel of `mod` that has no schedule yet (tuned kernels and packed int8
    kernels keep theirs), with vector tiles up to `lanes` wide (`lanes_of(target)`). A kernel
    this cannot handle keeps TVM's default code."""
    return schedule_each(mod, lambda func: schedule_kernel(func, lanes))
