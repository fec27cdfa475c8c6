"""Schedule steps that our default CPU schedules share (int8_default.py, float_default.py)."""

from __future__ import annotations

import logging
from typing import Callable

from .. import SCHEDULE_ATTR

log = logging.getLogger(__name__)


def largest_divisor(n: int, at_most: int) -> int:
    return max(d for d in range(1, min(n, at_most) + 1) if n % d == 0)


def blocks_per_task(blocks: int, at_most: int, outer: int, min_tasks: int) -> int:
    """The largest divisor of `blocks` up to `at_most` that still leaves `outer` x (blocks /
    it) >= `min_tasks` parallel tasks (1 when none does)."""
    chosen = largest_divisor(blocks, max(1, at_most))
    while chosen > 1 and outer * (blocks // chosen) < min_tasks:
        chosen = largest_divisor(blocks, chosen - 1)
    return chosen


def even_blocks_per_task(blocks: int, at_most: int, min_tasks: int, threads: int) -> int:
    """Of the divisors of `blocks` up to `at_most` that leave at least `min_tasks` tasks, the
    one whose tasks split most evenly over `threads` (the largest of those that split as
    evenly): 36 blocks of at most 4 make 12 tasks of 3 on 2 or 4 threads, where 9 tasks of 4
    leave a thread idle for a ninth of the time."""
    def idle(d):
        tasks = blocks // d
        return -(-tasks // threads) * threads / tasks
    fits = [d for d in range(1, min(blocks, max(1, at_most)) + 1)
            if blocks % d == 0 and blocks // d >= min_tasks]
    if not fits:
        return 1
    return min(fits, key=lambda d: (idle(d), -d))


def target_threads() -> int:
    """The current TVM target's core count (`num-cores`), else 1."""
    from tvm.target import Target

    target = Target.current(allow_none=True)
    cores = target.attrs.get("num-cores") if target is not None else None
    return max(1, int(cores)) if cores else 1


def vars_of(expr) -> set:
    """The names of the variables an index expression uses."""
    from tvm.tirx.analysis import undefined_vars

    return {v.name for v in undefined_vars(expr, [])}


def fewest_tiles(n: int, at_most: int) -> int:
    """The smallest tile of at most `at_most` that covers `n` in as few tiles as possible: a
    divisor where one does (12 -> 6, 56 -> 8), else the last tile is cut short (13 -> 7, two
    tiles of which the second has 6 rows, where the largest divisor, 1, gives 13 tiles)."""
    tiles = -(-n // min(n, at_most))
    return -(-n // tiles)


def row_tile(extent, at_most: int) -> int:
    """Rows per tile of a packed kernel: the largest divisor of the rows' extent up to
    `at_most`, or 1 when the extent is known only at run time (a language model's tokens:
    usually one at a time, and an unfilled tile costs its whole width)."""
    value = getattr(extent, "value", None)
    return largest_divisor(int(value), at_most) if isinstance(value, int) else 1


def inline_epilogue(sch, keep, keep_producers: bool = False) -> None:
    """Inline the elementwise epilogue steps after `keep` (the kernel's conv/matmul block)
    into the kernel's final output block. Its producers (pad, reshape) are skipped in the first
    pass only: each inlining rewrites the blocks, the skip compares the old ones, and a pad is
    inlined as a bounds check once an epilogue step was. Kept, as measured: a separate padding
    step (parallel, not vectorized) made EfficientNet-Lite0 slower, 2.46 -> 2.67 ms in int8 and
    6.47 -> 7.71 ms in fp32 (docs/studies/2026-12-06-cpu-kernels.md).
    `keep_producers`: never inline them (a tensorized block must read its input as the
    instruction does, without a bounds check: a packed int8 conv whose padded output channels
    are sliced off had its padding inlined, and kept TVM's scalar code)."""
    from tvm.s_tir import ScheduleError

    producers = {sch.get(b) for b in sch.get_producers(keep)}
    producer_names = {p.name_hint for p in producers}
    changed = True
    while changed:
        changed = False
        for block in sch.get_child_blocks(sch.get_sblock("root")):
            stmt = sch.get(block)
            if stmt.same_as(sch.get(keep)) or any(stmt.same_as(p) for p in producers) or \
                    (keep_producers and stmt.name_hint in producer_names):
                continue
            try:
                sch.compute_inline(block)
                changed = True
                break
            except ScheduleError:
                pass


def accumulate_in_tile(sch, block, loop, vector: int | None = None) -> None:
    """Accumulate each tile of `block` in a small buffer, and run what consumes it (the
    epilogue, or the copy to the kernel's output) under `loop`, tile by tile. `vector`: the
    epilogue in vectors of that many lanes, its other loops over the tile unrolled (a tile
    two registers wide vectorized as one 32-lane vector went through LLVM in 256-bit halves,
    with its narrowing casts in two steps each: a 14x14 int8 1x1 conv took 25 us, and 20 in
    16-lane vectors)."""
    from tvm.s_tir import ScheduleError

    copy = sch.cache_write(block, 0, "global")
    try:
        sch.compute_inline(copy)  # the epilogue reads the tile buffer directly
    except ScheduleError:
        pass  # the accumulator is the kernel's output
    for consumer in sch.get_consumers(block):
        try:
            sch.reverse_compute_at(consumer, loop, preserve_unit_loops=True)
            *outer, inner = sch.get_loops(consumer)
            if vector is None or int(sch.get(inner).extent) % vector:
                sch.vectorize(inner)
                continue
            pieces, lanes = sch.split(inner, [None, vector])
            sch.vectorize(lanes)
            sch.unroll(pieces)
            if outer:
                sch.unroll(outer[-1])
        except ScheduleError:
            pass


def schedule_each(mod, schedule_kernel: Callable, level: int = logging.INFO):
    """`mod` with every kernel that has no schedule yet replaced by `schedule_kernel(func)`
    (None: it keeps its code). A kernel whose scheduling fails keeps TVM's default code, and
    the failure is logged at `level`: one kernel's failure is not the build's."""
    import tvm


    updates = {}
    for gvar, func in mod.functions.items():
        if not isinstance(func, tvm.tirx.PrimFunc) or (func.attrs is not None and (
                "tirx.is_scheduled" in func.attrs or SCHEDULE_ATTR in func.attrs)):
            continue
        try:
            scheduled = schedule_kernel(func)
        except Exception as exc:  # noqa: BLE001 - see the docstring
            message = str(exc).strip()
            log.log(level, "kernel %s keeps the unscheduled code: %s", gvar.name_hint,
                    message.splitlines()[-1] if message else type(exc).__name__)
            continue
        if scheduled is not None:
            updates[gvar] = scheduled
    for gvar, func in updates.items():
        mod[gvar] = func
    return mod
