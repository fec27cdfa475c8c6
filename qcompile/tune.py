"""Tune stage: search schedules for the model's kernels with MetaSchedule, measuring each
candidate on the device (through an RPC tracker) or on this machine, and keep every measured
record in a tuning log (a MetaSchedule JSON database) that the build stage applies.

Candidates are built here with the target's (cross) compiler into a final .so: a phone has no
compiler, so MetaSchedule's default export (a .tar the device would link) cannot be used.
"""

from __future__ import annotations

import functools
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import DeviceError
from .frontend import FloatModel
from .targets import Target

log = logging.getLogger(__name__)

BUILD_TIMEOUT_S = 180  # MetaSchedule's 30 s times out on 2 cores (each worker imports ~17 s)
RUN_TIMEOUT_S = 60


@dataclass(frozen=True)
class TaskSummary:
    """One tuned kernel: its name, weight (uses in the model), and the best time measured."""

    name: str
    weight: int
    records: int
    best_us: float | None  # None: no candidate ran

    def describe(self) -> str:
        best = f"{self.best_us:10.1f} us" if self.best_us is not None else "   no valid run"
        return f"{self.name:<48} x{self.weight:<3} {self.records:>5} records  best {best}"


@dataclass(frozen=True)
class TuningLog:
    """A directory holding a MetaSchedule JSON database (workloads + tuning records)."""

    directory: Path
    tasks: tuple[TaskSummary, ...] = ()
    seconds: float = 0.0
    device: str = "this machine"
    emulated: bool = False

    def database(self):
        from tvm.s_tir import meta_schedule as ms

        return ms.database.JSONDatabase(work_dir=str(self.directory), allow_missing=False)

    def describe(self) -> str:
        lines = [f"tuned {len(self.tasks)} kernel(s) in {self.seconds:.0f} s on {self.device}"
                 + (" (EMULATED: measured times are not the phone's)" if self.emulated else ""),
                 *("  " + task.describe() for task in self.tasks),
                 f"tuning log: {self.directory}"]
        return "\n".join(lines)


def open_log(directory: str | Path) -> TuningLog:
    """An existing tuning log, or an InputError naming what is missing."""
    from .errors import InputError

    directory = Path(directory)
    needed = ("database_workload.json", "database_tuning_record.json")
    if not all((directory / name).is_file() for name in needed):
        raise InputError(f"'{directory}' is not a tuning log: it should hold {needed[0]} and "
                         f"{needed[1]}, as written by `qcompile tune --log {directory}`.")
    return TuningLog(directory)


def fused_module(mod, target: Target):
    """The model legalized to TIR and fused: the kernels that are tuned and then built.

    Tuning and building must see the same fused kernels, or the records do not match. On a
    target with an integer dot-product instruction, the int8 graph is converted to NHWC and its
    conv2d/matmul put on packed weights (schedules/packed_int8.py).
    """
    import tvm
    from tvm import relax
    from tvm.relax.backend.cpu_generic import library_dispatch_passes

    from .schedules import intrinsics, packed_int8

    tvm_target = target.to_tvm()
    dot = intrinsics.dot_product_for(tvm_target)
    with tvm_target:
        passes = [relax.transform.FoldConstant()]
        if dot is not None and _has_int8_conv(mod):
            passes += [relax.transform.ConvertLayout({"relax.nn.conv2d": ["NHWC", "OHWI"]}),
                       relax.transform.FoldConstant()]
        passes += library_dispatch_passes(tvm_target)
        passes += [relax.transform.LegalizeOps(
                       packed_int8.legalize_map(dot) if dot is not None else None),
                   relax.transform.AnnotateTIROpPattern(),
                   relax.transform.FoldConstant(),
                   relax.transform.FuseOps(),
                   relax.transform.FuseTIR()]
        return tvm.transform.Sequential(passes)(mod)


def _has_int8_conv(mod) -> bool:
    from tvm import relax

    found = []

    def visit(expr):
        if isinstance(expr, relax.Call) and getattr(expr.op, "name", "") == "relax.nn.conv2d" \
                and expr.args[1].ty.dtype == "int8":
            found.append(expr)

    for _, func in mod.functions.items():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func, visit)
    return bool(found)


def export_library(module, cc: str | None) -> str:
    """MetaSchedule builder export: a .so linked here with the target's compiler."""
    from tvm.support import cc as tvm_cc

    path = os.path.join(tempfile.mkdtemp(prefix="qcompile-candidate-"), "candidate.so")
    module.export_library(path, fcompile=tvm_cc.cross_compiler(cc) if cc else None)
    return path


def _runner(target: Target, rpc: tuple[tuple[str, int], str] | None):
    """A MetaSchedule runner for the device, and a description of where it measures."""
    from tvm.s_tir import meta_schedule as ms

    evaluator = ms.runner.EvaluatorConfig(number=3, repeat=1, min_repeat_ms=50,
                                          enable_cpu_cache_flush=False)
    if rpc is None:
        if target.cc is not None or target.is_gpu:
            raise DeviceError(f"Target '{target.name}' cannot be measured on this machine: "
                              "pass --rpc-tracker HOST:PORT and --rpc-key KEY of a device.")
        return ms.runner.LocalRunner(evaluator_config=evaluator, timeout_sec=RUN_TIMEOUT_S), \
            "this machine", False
    from .remote import device_info, request_session, tracker_status

    (host, port), key = rpc
    status = {k.key: k for k in tracker_status((host, port)).keys}
    if key not in status or status[key].total == 0:
        known = ", ".join(sorted(status)) or "none"
        raise DeviceError(f"No device is registered under key '{key}' at the tracker "
                          f"{host}:{port}, so nothing can measure the candidates. Keys "
                          f"registered there: {known}.")
    with_session = request_session((host, port), key, timeout=RUN_TIMEOUT_S)
    emulated = bool(device_info(with_session).get("emulated"))
    del with_session
    config = ms.runner.RPCConfig(tracker_host=host, tracker_port=port, tracker_key=key,
                                 session_priority=1, session_timeout_sec=RUN_TIMEOUT_S)
    runner = ms.runner.RPCRunner(rpc_config=config, evaluator_config=evaluator,
                                 max_workers=status[key].total)
    return runner, f"{status[key].total} device(s) '{key}' at {host}:{port}", emulated


def _summaries(tasks, database) -> tuple[TaskSummary, ...]:
    out = []
    for task in tasks:
        mod = task.dispatched[0]
        records = []
        if database.has_workload(mod):
            workload = database.commit_workload(mod)
            records = database.get_top_k(workload, 10_000)
        times = [sum(float(t) for t in r.run_secs) / len(r.run_secs) for r in records
                 if r.run_secs]
        best = min(times) * 1e6 if times else None
        out.append(TaskSummary(task.task_name, int(task.weight), len(records), best))
    return tuple(out)


def tune(model: FloatModel, target: Target, log_dir: str | Path, trials: int = 64,
         rpc: tuple[tuple[str, int], str] | None = None) -> TuningLog:
    """Tune `model`'s kernels for `target` with `trials` measurements in all (MetaSchedule,
    XGBoost cost model), adding every record to the JSON database in `log_dir`.

    rpc: ((tracker_host, tracker_port), key) of the devices that measure; None measures here.
    `target` must have its compiler resolved (Target.with_compiler).
    """
    from tvm.s_tir import meta_schedule as ms

    if target.is_gpu:
        raise DeviceError("Tuning GPU targets is not supported yet: their kernels use dlight's "
                          "default schedules. Compile without a tuning log.")
    from .schedules import intrinsics

    intrinsics.register()  # the search tensorizes with them
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    runner, where, emulated = _runner(target, rpc)
    tvm_target = target.to_tvm()
    mod = fused_module(model.mod, target)
    tasks = ms.relax_integration.extract_tasks(mod, tvm_target)
    log.info("tuning %d kernel(s) of %s for %s with %d trials, measured on %s%s", len(tasks),
             Path(model.source).name, target.name, trials, where,
             " (emulated: timings rank candidates but are not the phone's)" if emulated else "")
    contexts, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(
        tasks, work_dir=str(log_dir), num_threads=os.cpu_count() or 1)
    builder = ms.builder.LocalBuilder(
        max_workers=os.cpu_count() or 1, timeout_sec=BUILD_TIMEOUT_S,
        f_export=functools.partial(export_library, cc=target.cc))
    database = ms.database.JSONDatabase(work_dir=str(log_dir))
    start = time.perf_counter()
    ms.tune.tune_tasks(tasks=contexts, task_weights=weights, work_dir=str(log_dir),
                       max_trials_global=trials, num_trials_per_iter=min(trials, 64),
                       builder=builder, runner=runner, database=database, cost_model="xgb")
    seconds = time.perf_counter() - start
    return TuningLog(log_dir, _summaries(tasks, database), seconds, where, emulated)
