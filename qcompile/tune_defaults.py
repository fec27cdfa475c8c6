"""Our default schedules as the first candidates of a tune: for each kernel that reduces (a
conv, a matmul), the schedule compile gives it without a record is measured like a searched
candidate and stored in the log, so the search has to beat it (a short search often does not).
qcompile-log.json lists the kernels whose default was measured, so a tune on an older log
measures just those defaults, even for kernels whose trial budget is spent."""

from __future__ import annotations

import logging
from pathlib import Path

from . import lower
from .devices.timing import time_kernels
from .targets import Target
from .tuning_log import DEFAULTS_KEY, kernel_blocks, read_info, workload_key, write_info

log = logging.getLogger(__name__)


def has_reduction(mod) -> bool:
    """Whether a kernel reduces (conv, matmul, pooling): those are worth searching. An
    elementwise kernel's schedule space holds one schedule (parallel + vectorize), measured
    once: MetaSchedule would spend five empty search rounds finding nothing new."""
    from tvm.tirx import IterVar

    return any(int(iv.iter_type) == IterVar.CommReduce
               for block in kernel_blocks(mod) for iv in block.iter_vars)


def unmeasured(database, contexts, foreign, log_dir: Path) -> set[str]:
    """The kernels (task names) that may have a default schedule worth measuring (they
    reduce) and whose default the log has not measured (qcompile-log.json lists those)."""
    measured = (read_info(log_dir) or {}).get(DEFAULTS_KEY) or {}
    return {c.task_name for c in contexts if c.task_name not in foreign
            and has_reduction(c.mod)
            and workload_key(database.commit_workload(c.mod).mod) not in measured}


def _note(database, mod, log_dir: Path, seconds: float | None) -> None:
    info = read_info(log_dir) or {}
    info.setdefault(DEFAULTS_KEY, {})[workload_key(database.commit_workload(mod).mod)] = \
        round(seconds * 1e6, 2) if seconds is not None else None
    write_info(log_dir, info)


def measure(context, target: Target, database, build, runner,
                     log_dir: Path) -> float | None:
    """Measure our default schedule of the kernel like a searched candidate and add it to
    the database: the search then keeps it unless it finds a faster one (a short search
    often does not). Its mean time in seconds, or None (no such schedule, or it failed)."""
    from tvm.s_tir import meta_schedule as ms

    try:
        sch = lower.default_schedule(context.mod, target)
    except Exception as exc:  # noqa: BLE001 - the search goes on without it
        log.info("%s: no default schedule to measure (%s)", context.task_name, exc)
        _note(database, context.mod, log_dir, None)
        return None
    if sch is None:
        _note(database, context.mod, log_dir, None)
        return None
    timed = time_kernels([sch.mod], context.target, build, runner)[0]
    if timed.build_error:
        log.info("%s: qcompile's default schedule did not build: %s", context.task_name,
                 timed.build_error)
        _note(database, context.mod, log_dir, None)
        return None
    seconds = timed.seconds
    if seconds is None:
        log.info("%s: qcompile's default schedule did not run: %s", context.task_name,
                 timed.run_error or "no time")
        return None  # measured again by the next run (the device may have failed)
    database.commit_tuning_record(ms.database.TuningRecord(
        sch.trace, database.commit_workload(context.mod), timed.run_secs, context.target,
        timed.args))
    _note(database, context.mod, log_dir, seconds)
    log.info("%s: qcompile's default schedule: %.1f us", context.task_name, seconds * 1e6)
    return seconds


__all__ = ["has_reduction", "measure", "unmeasured"]
