"""What a tuning log's records say about a model's kernels: the records of a kernel, whether a
record's schedule replays on it, copying another log's records that apply (--reuse-log),
counting what was measured, and training the cost model on what the log holds."""

from __future__ import annotations

from pathlib import Path

from .tuning_log import (PRUNED_KEY, TuningLog, mean_seconds, pruned_trials, read_info,
                         workload_key, write_info)


def records(database, mod) -> list:
    if not database.has_workload(mod):
        return []
    return list(database.get_top_k(database.commit_workload(mod), 1_000_000))


def replays(trace, mod) -> bool:
    """Whether a schedule trace applies to the kernel `mod`."""
    from tvm.s_tir import Schedule

    try:
        trace.apply_to_schedule(Schedule(mod), remove_postproc=False)
    except Exception:  # noqa: BLE001 - TVM raises various errors for a trace that does not fit
        return False
    return True


def trace_for(record, context):
    """The record's schedule as a trace of this kernel: its own trace when it replays, else
    its anchor (conv/matmul) steps applied to this kernel as compile does (MetaSchedule's
    schedule_using_anchor_trace) and the resulting trace, if that replays; None otherwise.
    The record keeps its measured time, taken with the other epilogue."""
    from tvm.s_tir import Schedule
    from tvm.s_tir.meta_schedule.trace_apply import schedule_using_anchor_trace

    if replays(record.trace, context.mod):
        return record.trace
    try:
        sch = Schedule(context.mod)
        schedule_using_anchor_trace(sch, record.trace, context.target)
    except Exception:  # noqa: BLE001 - TVM raises various errors for a trace that does not fit
        return None
    return sch.trace if replays(sch.trace, context.mod) else None


def replays_here(database, mod) -> bool:
    """Whether the database's best record of `mod` (if any) replays on it."""
    found = records(database, mod)
    return not found or replays(found[0].trace, mod)


def adopt(database, contexts, other: TuningLog, log_dir: Path) -> dict[str, int]:
    """Copy into `database` the records of `other` that replay on this model's kernels,
    under this model's kernels (and count the candidates `other` had pruned). Kernels the
    database already has records for are left alone. {kernel: records copied}."""
    from tvm.s_tir.meta_schedule.database import TuningRecord

    source = other.database()
    adopted, pruned = {}, {}
    for context in contexts:
        if database.has_workload(context.mod):
            continue
        traces = [(r, trace_for(r, context)) for r in records(source, context.mod)
                  if mean_seconds(r.run_secs)]
        traces = [(r, trace) for r, trace in traces if trace is not None]
        if not traces:
            continue
        workload = database.commit_workload(context.mod)
        for r, trace in traces:
            database.commit_tuning_record(TuningRecord(trace, workload, r.run_secs,
                                                       r.target, r.args_info))
        adopted[context.task_name] = len(traces)
        dropped = pruned_trials(other.info, traces[0][0].workload.mod)
        if dropped:
            pruned[workload_key(workload.mod)] = dropped
    if pruned:
        info = read_info(log_dir) or {}
        info[PRUNED_KEY] = {**info.get(PRUNED_KEY, {}), **pruned}
        write_info(log_dir, info)
    return adopted


def measured(database, mod, info) -> int:
    """Candidates measured for this kernel: its records, and those prune() dropped."""
    found = records(database, mod)
    if not found:
        return 0
    return len(found) + pruned_trials(info, found[0].workload.mod)


def best_seconds(found) -> float | None:
    """The fastest valid run among the records `found` (None: none ran)."""
    return min((t for t in (mean_seconds(r.run_secs) for r in found) if t is not None),
               default=None)


def warm_start(cost_model, contexts, database) -> int:
    """Train the cost model on the records the log already holds for these kernels."""
    from tvm.s_tir import meta_schedule as ms

    trained = 0
    for context in contexts:
        ran = [r for r in records(database, context.mod) if r.run_secs]
        if not ran:
            continue
        candidates = [r.as_measure_candidate() for r in ran]
        results = [ms.runner.RunnerResult(run_secs=[float(t) for t in r.run_secs],
                                          error_msg=None) for r in ran]
        cost_model.update(context, candidates, results)
        trained += len(ran)
    return trained


__all__ = ["adopt", "best_seconds", "measured", "records", "replays", "replays_here",
           "trace_for", "warm_start"]
