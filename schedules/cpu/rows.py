"""Default CPU schedule for kernels without a multiply-accumulate block that work row by row:
softmax, layer and RMS norms, a group's absolute maximum, and plain elementwise kernels
(transposes, residual adds, requantizations).

TVM legalizes such a kernel into one loop nest per step (softmax: row maximum, exponentials,
row sum, division), each over the whole tensor, serial and scalar. Here every step moves under
the leading axes they share, which run in parallel, so a row's steps run back to back while it
is in cache; each elementwise step is vectorized along its innermost axis; each reduction
along its innermost axis keeps VECTOR partial results in a vector (rfactor: the step's sum or
maximum over ko of x[ko * VECTOR + ki], vectorized over ki), reduced to one at the end of the
row. A kernel whose steps do not share their leading axes, or whose extents are not known at
compile time, is left to the caller.
"""

from __future__ import annotations

import logging

from .tiles import largest_divisor

log = logging.getLogger(__name__)

VECTOR = 8  # float lanes per step (one AVX2, two NEON registers)


def _loops_match(sch, block) -> bool:
    """One loop per block axis, spatial axes first, every extent a compile-time constant."""
    from tvm.tirx import IntImm

    stmt = sch.get(block)
    loops = sch.get_loops(block)
    kinds = [iv.iter_type for iv in stmt.iter_vars]
    if len(loops) != len(kinds) or not kinds or kinds[0] != 0:
        return False
    if any(k not in (0, 2) for k in kinds) or kinds != sorted(kinds):
        return False  # only data-parallel (0) and commutative reduction (2) axes, in order
    return all(isinstance(sch.get(loop).extent, IntImm) for loop in loops)


def _leading(sch, block) -> int:
    return sum(1 for iv in sch.get(block).iter_vars if iv.iter_type == 0)


def _extent(sch, loop) -> int:
    return int(sch.get(loop).extent)


def _lanes(extent: int) -> int:
    """The vector lanes for a loop of this extent: VECTOR, or the largest divisor of the
    extent below it (a remainder would need a bounds check, which keeps the loop scalar)."""
    return largest_divisor(extent, VECTOR)


def _iterations(sch, block) -> int:
    count = 1
    for loop in sch.get_loops(block):
        count *= _extent(sch, loop)
    return count


def _vectorize_inner(sch, block) -> None:
    """Vectorize the block's innermost loop: whole when it is at most 2 x VECTOR long, else
    in _lanes."""
    inner = sch.get_loops(block)[-1]
    extent = _extent(sch, inner)
    if 2 <= extent <= 2 * VECTOR:
        sch.vectorize(inner)
    elif _lanes(extent) >= 2:
        sch.vectorize(sch.split(inner, [None, _lanes(extent)])[1])


def _vector_partials(sch, block):
    """Reduce the block's innermost axis into _lanes partial results (rfactor), when that
    makes at least two lanes of at least two steps; the rfactor block, or None."""
    inner = sch.get_loops(block)[-1]
    extent = _extent(sch, inner)
    lanes = _lanes(extent)
    if lanes < 2 or extent < 2 * lanes:
        return None
    _, lanes_loop = sch.split(inner, [None, lanes])
    return sch.rfactor(lanes_loop, factor_axis=_leading(sch, block))  # the partials' axis: last


def _vectorize_partials(sch, rf, row) -> None:
    """Vectorize the rfactor block `rf`, moved under `row`, over its partial results: the lane
    loop innermost, below the reduction loop, the partials' initialization before it (a
    reduction block loses its init when decomposed, and with it vectorize's consent).
    compute_at gave it one loop per axis, in the block's axis order, which puts the lanes
    (rfactor's new axis) first."""
    from tvm.s_tir import ScheduleError

    stmt = sch.get(rf)
    loops = sch.get_loops(rf)
    under = loops[len(loops) - len(stmt.iter_vars):]
    if len(loops) != len(stmt.iter_vars) + 1 or not sch.get(loops[0]).same_as(sch.get(row)):
        raise ScheduleError("the partials' loops are not one per axis under the row")
    lanes_var = stmt.writes[0].region[-1].min
    kinds = [iv.iter_type for iv in stmt.iter_vars]
    lane = next(i for i, iv in enumerate(stmt.iter_vars) if iv.var.same_as(lanes_var))
    reduce = kinds.index(2)
    sch.reorder(under[reduce], under[lane])
    sch.vectorize(under[lane])
    sch.decompose_reduction(rf, under[reduce])  # the copied lane loop stays vectorized


def schedule(sch, min_parallel: int) -> bool:
    """Schedule the kernel in `sch` (its single-use steps already inlined) row by row, in
    parallel when a step iterates at least `min_parallel` times; whether it could. `sch` is
    left half-done when it could not: schedule a copy."""
    from tvm.s_tir import ScheduleError

    blocks = list(sch.get_child_blocks(sch.get_sblock("root")))
    if not blocks or not all(_loops_match(sch, b) for b in blocks):
        return False
    last = blocks[-1]
    spatial = _leading(sch, last)
    reduces = spatial < len(sch.get(last).iter_vars)
    # the leading axes every step shares; an elementwise last step keeps one to vectorize
    shared = min([_leading(sch, b) for b in blocks] + ([] if reduces else [spatial - 1]))
    extents = [_extent(sch, loop) for loop in sch.get_loops(last)[:spatial]]
    if shared < 1 or any(_extent(sch, sch.get_loops(b)[i]) != extents[i]
                         for b in blocks for i in range(shared)):
        return False
    elements = max(_iterations(sch, b) for b in blocks)  # a reduction's work is its input
    try:
        partials = [_vector_partials(sch, b) for b in blocks
                    if any(iv.iter_type != 0 for iv in sch.get(b).iter_vars)]
        loops = sch.get_loops(last)
        row = sch.fuse(*loops[:shared]) if shared > 1 else loops[0]
        if not reduces:
            _vectorize_inner(sch, last)
        steps = [b for b in sch.get_child_blocks(sch.get_sblock("root"))
                 if not sch.get(b).same_as(sch.get(last))]
        for block in reversed(steps):
            sch.compute_at(block, row, preserve_unit_loops=True)
        # before the partials are decomposed: parallel wants reduction blocks with their init
        if elements >= min_parallel and _extent(sch, row) > 1:
            sch.parallel(row)
        for block in steps:
            if all(iv.iter_type == 0 for iv in sch.get(block).iter_vars) and \
                    len(sch.get_loops(block)) > 1:
                _vectorize_inner(sch, block)
        for rf in partials:
            if rf is not None:
                _vectorize_partials(sch, rf, row)
    except ScheduleError as exc:
        log.debug("row schedule failed: %s", str(exc).splitlines()[0])
        return False
    return True


__all__ = ["schedule"]
