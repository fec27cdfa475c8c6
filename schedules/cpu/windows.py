"""Default CPU schedule for window reductions along the non-innermost axes of NHWC tensors:
max and average pools, global pools (a mean over H and W), each with its elementwise steps.

The channels are innermost in both the input and the output, and the window's axes never
index them: the channels go in the vector lanes, the window's loops run above them, and each
tile of channels accumulates in registers while the pixels run in parallel. The row schedule
(rows.py) would vectorize along the reduction, which here strides across pixels: it ran the
pools of a YOLOX-like detector's spatial pyramid (13 x 13 windows over 13 x 13 x 192) scalar,
at 0.2 GB/s, 1.3 ms for one of them.
"""

from __future__ import annotations

import logging

from .tiles import accumulate_in_tile, largest_divisor, vars_of

log = logging.getLogger(__name__)


def _last_dim_var(region, name: str) -> bool:
    """Whether the last dimension of a buffer region is indexed by the variable `name`
    alone."""
    from tvm.tirx import Var

    index = region.region[-1].min
    return isinstance(index, Var) and index.name == name and int(region.region[-1].extent) == 1


def _uses(region, names: set[str]) -> bool:
    """Whether a dimension before the region's last is indexed by one of `names`."""
    return any(vars_of(r.min) & names for r in region.region[:-1])


def _window_block(sch):
    """The kernel's one reduction block if it is a window reduction along non-innermost axes
    (see the module's docstring), else None."""
    from tvm.tirx import IntImm

    reducing = [b for b in sch.get_child_blocks(sch.get_sblock("root"))
                if any(iv.iter_type != 0 for iv in sch.get(b).iter_vars)]
    if len(reducing) != 1:
        return None
    block = reducing[0]
    stmt = sch.get(block)
    kinds = [iv.iter_type for iv in stmt.iter_vars]
    loops = sch.get_loops(block)
    if len(loops) != len(kinds) or kinds != sorted(kinds) or kinds[0] != 0 or \
            any(k not in (0, 2) for k in kinds) or \
            not all(isinstance(sch.get(loop).extent, IntImm) for loop in loops):
        return None
    spatial = sum(1 for k in kinds if k == 0)
    inner = stmt.iter_vars[spatial - 1].var.name
    reduced = {iv.var.name for iv in stmt.iter_vars[spatial:]}
    if not all(_last_dim_var(r, inner) for r in list(stmt.reads) + list(stmt.writes)):
        return None
    if not any(_uses(r, reduced) for r in stmt.reads):
        return None
    return block


def schedule(sch, lanes: int, min_parallel: int) -> bool:
    """Schedule the kernel in `sch` (single-use steps inlined) as a window reduction with
    vectors of up to `lanes` channels, in parallel when it writes at least `min_parallel`
    elements; whether it could. Schedule a copy: `sch` is left half-done when it could not."""
    from tvm.s_tir import ScheduleError

    block = _window_block(sch)
    if block is None:
        return False
    try:
        stmt = sch.get(block)
        spatial = sum(1 for iv in stmt.iter_vars if iv.iter_type == 0)
        loops = sch.get_loops(block)
        channels = int(sch.get(loops[spatial - 1]).extent)
        width = largest_divisor(channels, lanes)
        if width < 2:
            return False
        co, ci = sch.split(loops[spatial - 1], [None, width])
        outer = list(loops[:spatial - 1]) + [co]
        sch.reorder(*outer, *loops[spatial:], ci)
        tile = sch.fuse(*outer) if len(outer) > 1 else outer[0]
        accumulate_in_tile(sch, block, tile)
        elements = 1
        for iv in stmt.iter_vars[:spatial]:
            elements *= int(iv.dom.extent)
        if elements >= min_parallel and int(sch.get(tile).extent) > 1:
            sch.parallel(tile)
        sch.vectorize(ci)
        sch.decompose_reduction(block, sch.get_loops(block)[1])
    except ScheduleError as exc:
        log.debug("window schedule failed: %s", str(exc).splitlines()[0])
        return False
    return True


__all__ = ["schedule"]
