"""Tune stage: search schedules for the model's kernels with MetaSchedule, measuring each
candidate on the device (through an RPC tracker) or on this machine, and keep every measured
record in a tuning log (tuning_log.py) that the build stage applies.

- Kernels are tuned one after the other, each up to `trials` measured candidates, with one
  XGBoost cost model shared by all of them and first trained on the records already in the log.
- Resume and reuse: a kernel's budget counts the records the log already holds for its workload,
  whichever model or earlier (interrupted) run measured them. A kernel tuned before costs
  nothing; a run killed midway continues where it stopped.
- A candidate that fails to build or run is a record of a failure, not the end of the run. When
  every candidate of a batch fails on RPC and the tracker has no device left under the key, the
  run stops with a DeviceError (what was measured stays in the log).
- Candidates are built here with the target's (cross) compiler into a final .so: a phone has no
  compiler, so MetaSchedule's default export (a .tar the device would link) cannot be used.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import TextIO

from . import lower, metaschedule_logging, tune_defaults, tune_records
from .errors import InputError, QcompileError, TuneFailed, TuneInterrupted, last_line
from .devices import Device, device_for
from .devices.builder import builder_for
from .frontend import FloatModel
from .progress import progress_callback
from .targets import Target
from .tuning_log import (MODULE_EQUALITY, RECORDS_FILE, STAND_IN_KEY, THREADS_KEY, TaskSummary,
                         TuningLog, identity, incompatibility, open_database, read_info,
                         repair, write_info)

log = logging.getLogger(__name__)

TRIALS_PER_BATCH = 16
# Smaller than MetaSchedule's defaults (population 512, 4 genetic rounds, 5 failures): on 2
# cores each batch's search took 10-75 s, longer than measuring it.
SEARCH = {"population_size": 256, "init_min_unmeasured": 32, "genetic_num_iters": 2,
          "max_fail_count": 2}
COST_MODEL_WARMUP = 32  # random candidates before the cost model ranks them (MetaSchedule: 100)
FAILURE_FILE = "qcompile-failure.txt"  # in the log: the traceback of the last tune that failed


def check_log_dir(directory: Path, target: Target) -> None:
    """Refuse, before any work, a --log that is a file (or under one), or a log measured for
    another target or TVM, or a damaged one; drop a torn last line (a killed tune's)."""
    directory = Path(directory)
    ancestor = directory
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if ancestor.exists() and not ancestor.is_dir():
        where = "is a file" if ancestor == directory else f"is under the file '{ancestor}'"
        raise InputError(f"The tuning log '{directory}' (--log) {where}: a tuning log is a "
                         "directory. Pass --log a directory (it is created if missing).")
    if not directory.is_dir():
        return
    repair(directory)
    info = read_info(directory)
    if info is None:
        if any(directory.glob("database_*.json")):
            log.warning("tuning log %s has no record of its target: assuming %s", directory,
                        target.name)
        return
    why = incompatibility(info, target)
    if why is not None:
        raise InputError(f"The tuning log {directory} belongs to another target or TVM: {why}. "
                         f"Tune '{target.name}' into another directory (--log DIR).")


def tune(model: FloatModel, target: Target, log_dir: str | Path, trials: int = 32,
         rpc: tuple[tuple[str, int], str] | None = None,
         out: TextIO | None = None, reuse: TuningLog | None = None,
         pocl: bool = False) -> TuningLog:
    """Tune each kernel of `model` (already quantized, if it is to be) for `target` until the
    log holds `trials` measured candidates for it (MetaSchedule, XGBoost cost model).

    rpc: ((tracker_host, tracker_port), key) of the devices that measure; None measures here.
    `target` must have its compiler resolved (Target.with_compiler). Progress goes to `out`
    (default: stderr), one line per batch of candidates. `reuse`: another log (for the same
    target) whose records that apply to this model's kernels are copied in first.
    `pocl`: a GPU target's candidates are measured on pocl (an OpenCL implementation for this
    CPU: the whole flow without a phone, with timings that are not the phone's).
    """
    out = out or sys.stderr
    log_dir = Path(log_dir)
    check_log_dir(log_dir, target)
    devices = device_for(target, rpc, pocl)  # before anything is written: no new log
    try:
        return _tune(model, target, log_dir, trials, devices, out, reuse)
    except QcompileError:
        raise
    except Exception as exc:  # a failure inside TVM: said in one paragraph, traceback kept
        raise _failure(exc, log_dir) from exc


def _failure(exc: Exception, log_dir: Path) -> TuneFailed:
    """The error for a tune that failed for an internal reason: what failed, what the log
    kept, and where the traceback was written."""
    where = "its traceback could not be written"
    path = log_dir / FAILURE_FILE
    try:
        path.write_text("".join(traceback.format_exception(exc)))
        where = f"its traceback is in {path}"
    except OSError:
        pass
    records = log_dir / RECORDS_FILE
    kept = (sum(1 for line in records.open() if line.strip()) if records.is_file() else 0)
    return TuneFailed(
        f"Tuning failed inside TVM, not because of the model or the target "
        f"({type(exc).__name__}: {last_line(str(exc))}); {where}. The log {log_dir} keeps the "
        f"{kept} record(s) measured before it: run the same command again to continue, and "
        "if it fails the same way, report it with that file.")


def _tune(model: FloatModel, target: Target, log_dir: Path, trials: int, devices: Device,
          out: TextIO, reuse: TuningLog | None) -> TuningLog:
    """tune()'s work, once its arguments are checked."""
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.analysis import estimate_tir_flops

    created = not log_dir.exists()
    log_dir.mkdir(parents=True, exist_ok=True)
    if read_info(log_dir) is None:
        write_info(log_dir, identity(target))
    if devices.stand_in:
        write_info(log_dir, {**read_info(log_dir), STAND_IN_KEY: devices.where})
    database = open_database(log_dir, create=True)  # also registers our tensor intrinsics
    where = _record_threads(log_dir, devices, database)
    tvm_target = target.to_tvm()
    mod = lower.kernels(model.mod, target)
    tasks = ms.relax_integration.extract_tasks(mod, tvm_target, module_equality=MODULE_EQUALITY)
    # MetaSchedule's per-batch messages go to log_dir/logs/*.log, not to the console
    logging.getLogger("tvm.s_tir.meta_schedule").setLevel(logging.WARNING)
    if not tasks:
        if created:  # a log of nothing would only be in the way
            shutil.rmtree(log_dir, ignore_errors=True)
        raise InputError(f"{Path(model.source).name} has no kernel to tune for {target.name}: "
                         "nothing in it runs as a compiled kernel. Compile it directly.")
    contexts, weights = _tune_contexts(tasks, target, log_dir)
    if reuse is not None:
        adopted = tune_records.adopt(database, contexts, reuse, log_dir)
        if adopted:
            log.info("reused %d record(s) of %s for %d kernel(s)", sum(adopted.values()),
                     reuse.directory, len(adopted))
    # Records are keyed by anchor block (the conv/matmul), so a log can hold records of a
    # differently fused kernel with the same anchor: they do not replay here, and MetaSchedule
    # would store this kernel's records under that workload, where they break the log's loading.
    foreign = {c.task_name for c in contexts if not tune_records.replays_here(database, c.mod)}
    for name in sorted(foreign):
        log.warning("kernel %s is not tuned: the log's records for its anchor operation were "
                    "measured on a differently fused kernel, and MetaSchedule keys records by "
                    "anchor. Tune into a new --log with --reuse-log %s to tune it.", name,
                    log_dir)
    info = read_info(log_dir)
    before = {c.task_name: tune_records.measured(database, c.mod, info) for c in contexts}
    budgets = {c.task_name: trials if tune_defaults.has_reduction(c.mod) else 1 for c in contexts}
    flops = {c.task_name: estimate_tir_flops(c.mod) for c in contexts}
    weight_of = {c.task_name: w for c, w in zip(contexts, weights)}
    # the kernels that cost the most first: an interrupted tune has spent its time best
    unmeasured = tune_defaults.unmeasured(database, contexts, foreign, log_dir)
    todo = sorted((c for c in contexts if c.task_name not in foreign and (
                       before[c.task_name] < budgets[c.task_name]
                       or c.task_name in unmeasured)),
                  key=lambda c: -flops[c.task_name] * weight_of[c.task_name])
    log.info("%d kernel(s) of %s for %s: %d already have %d records in %s, %d to tune with up "
             "to %d trials each, measured on %s%s", len(contexts), Path(model.source).name,
             target.name, len(contexts) - len(todo), trials, log_dir, len(todo), trials,
             where,
             " (EMULATED: timings rank candidates but are not the phone's)"
             if devices.emulated else "")
    build = builder_for(target)
    runner = devices.runner()
    cost_model = ms.cost_model.XGBModel(num_tuning_cores=os.cpu_count() or 1,
                                        num_warmup_samples=COST_MODEL_WARMUP)
    warm = tune_records.warm_start(cost_model, contexts, database)
    if warm:
        log.info("cost model trained on %d record(s) already in the log", warm)
    stop = threading.Event()
    progress = progress_callback(devices, out, stop)
    callbacks = [ms.measure_callback.AddToDatabase(),
                 ms.measure_callback.RemoveBuildArtifact(),
                 ms.measure_callback.UpdateCostModel(), progress]
    seconds: dict[str, float] = {}
    defaults: dict[str, float] = {}
    start = time.perf_counter()
    try:
        with _stop_on_signals(stop):
            _tune_each(todo, budgets, before, flops, weight_of, database, progress, seconds,
                       unmeasured, defaults, out, build=build, runner=runner,
                       cost_model=cost_model, callbacks=callbacks, log_dir=log_dir,
                       target=target)
    except TuneInterrupted:
        kept = sum(len(tune_records.records(database, c.mod)) for c in contexts)
        raise TuneInterrupted(
            f"Tuning stopped: the log {log_dir} keeps all {kept} record(s) of this model's "
            "kernels. Run the same command again to continue where it stopped.") from None
    finally:  # also when interrupted: the log says how long it has been tuned
        total = time.perf_counter() - start
        updated = read_info(log_dir) or identity(target)
        updated["tuning_seconds"] = round(updated.get("tuning_seconds", 0.0) + total, 1)
        updated["models"] = sorted(set(updated.get("models", [])) | {Path(model.source).name})
        write_info(log_dir, updated)
    (log_dir / FAILURE_FILE).unlink(missing_ok=True)  # an earlier failure's: this run got past it
    summaries = []
    for context, weight in zip(contexts, weights):
        records = tune_records.records(database, context.mod)
        best = tune_records.best_seconds(records)
        ops = flops[context.task_name]
        summaries.append(TaskSummary(
            context.task_name, int(weight), len(records),
            best * 1e6 if best is not None else None,
            ops / best / 1e9 if best and ops else None,
            tune_records.measured(database, context.mod, info) - before[context.task_name],
            seconds.get(context.task_name, 0.0),
            defaults[context.task_name] * 1e6 if context.task_name in defaults else None))
    return TuningLog(log_dir, read_info(log_dir), tuple(summaries), total, where,
                     devices.emulated)


def _record_threads(log_dir: Path, devices: Device, database) -> str:
    """Write into the log the thread count kernels are measured with here (when the device
    says), warning when the log's earlier records were measured with another; returns where
    the measurements happen, for messages."""
    threads = devices.threads()
    if threads is None:
        return devices.where
    info = read_info(log_dir)
    earlier = info.get(THREADS_KEY)
    if earlier is not None and earlier != threads and len(database):
        log.warning("tuning log %s holds times measured with %d thread(s), and this run "
                    "measures with %d: they do not compare. Set TVM_NUM_THREADS=%d to go on "
                    "as before, or tune into another --log.", log_dir, earlier, threads,
                    earlier)
    write_info(log_dir, {**info, THREADS_KEY: threads})
    return devices.describe()


def _tune_contexts(tasks, target: Target, log_dir: Path) -> tuple[list, list[float]]:
    """MetaSchedule's TuneContext and weight of each task, each kernel searched in the space
    its target kind's schedules give it (lower.search_space: for int8 CPU kernels on packed
    weights the loop around the tensorized block stays serial, so that every candidate
    builds, and smmla kernels are tiled onto our intrinsic; OpenCL int8 kernels fetch
    unvectorized)."""
    from tvm.s_tir import meta_schedule as ms

    contexts, weights = [], []
    for task in tasks:
        space = lower.search_space(task.dispatched[0], target)
        with metaschedule_logging.configuring():
            context, weight = ms.relax_integration.extracted_tasks_to_tune_contexts(
                [task], work_dir=str(log_dir), space=space, num_threads=os.cpu_count() or 1,
                strategy=ms.search_strategy.EvolutionarySearch(**SEARCH))
        contexts += context
        weights += weight
    return contexts, weights


@contextlib.contextmanager
def _stop_on_signals(stop: threading.Event):
    """Ctrl-C or SIGTERM: finish the batch being measured, then stop (MetaSchedule would
    otherwise take the interrupt for a failed build and go on). A second one stops at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, _frame):
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        log.warning("stopping after the batch being measured (again to stop at once; "
                    "the batch's records would then be lost)")

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _tune_each(todo, budgets, before, flops, weight_of, database, progress, seconds,
               unmeasured, defaults, out, *, build, runner, cost_model, callbacks,
               log_dir, target: Target) -> None:
    """Tune the kernels one after the other, each up to its budget; `seconds` gets the time
    spent on each, `defaults` the time of our default schedule of each kernel in
    `unmeasured` (those whose default the log has not measured: measured first, as one of
    the candidates; on a log tuned before defaults were measured, even when the kernel's
    budget is spent)."""
    from tvm.s_tir import meta_schedule as ms

    for number, context in enumerate(todo, 1):
        name = context.task_name
        budget = budgets[name] - before[name]
        if name in unmeasured:
            measured = tune_defaults.measure(context, target, database, build, runner,
                                        log_dir)
            if measured is not None:
                defaults[name] = measured
                budget -= 1
        if budget <= 0:
            continue
        progress.start(f"[{number}/{len(todo)}] {name}", flops[name], budget,
                       tune_records.best_seconds(tune_records.records(database, context.mod)))
        task_start = time.perf_counter()
        try:
            ms.tune.tune_tasks(tasks=[context], task_weights=[weight_of[name]],
                               work_dir=str(log_dir), max_trials_global=budget,
                               num_trials_per_iter=min(budget, TRIALS_PER_BATCH),
                               builder=build, runner=runner, database=database,
                               cost_model=cost_model, measure_callbacks=callbacks,
                               task_scheduler="round-robin", module_equality=MODULE_EQUALITY)
        except Exception:
            if progress.error is not None:  # the devices are gone; the log keeps the rest
                raise progress.error from None
            raise
        finally:
            seconds[name] = time.perf_counter() - task_start
        if out.isatty():
            out.write("\n")
