"""Where and how tuning candidates are built and measured: a builder whose worker processes
live for the whole tune, the devices (this machine, or every device under a key at an RPC
tracker), and a measure callback that shows progress and notices when no device is left.
"""

from __future__ import annotations

import logging
import os
import subprocess
import tempfile
import time
from dataclasses import dataclass
from typing import TextIO

from .errors import DeviceError, InputError, TuneInterrupted, last_line
from .targets import Target
from .tuning_log import mean_seconds

log = logging.getLogger(__name__)

BUILD_TIMEOUT_S = 180  # MetaSchedule's 30 s times out on 2 cores (each worker imports ~17 s)
RUN_TIMEOUT_S = 60
WORKER_USES = 64  # builds per worker process before it is replaced (TVM's workers leak memory)


def export_library(module, cc: str | None) -> str:
    """MetaSchedule builder export: a .so linked here with the target's compiler."""
    from tvm.support import cc as tvm_cc

    path = os.path.join(tempfile.mkdtemp(prefix="qcompile-candidate-"), "candidate.so")
    module.export_library(path, fcompile=tvm_cc.cross_compiler(cc) if cc else None)
    return path


def _warm_worker() -> None:
    import tvm.s_tir.tensor_intrin  # noqa: F401  what MetaSchedule's default build imports


def _build_gpu_candidate(mod, target, params, cc: str | None) -> str:
    """Build a GPU candidate like MetaSchedule does, into a .so (which an RPC device runs) with
    its OpenCL C and launch sizes beside it (which pocl runs: pocl.runner). A candidate whose
    OpenCL C has a known code-generation defect fails to build (schedules.opencl.default.codegen_defect)."""
    from tvm.s_tir.meta_schedule.builder import local_builder

    from . import pocl
    from .schedules.opencl.default import codegen_defect

    runtime_module = local_builder.default_build(mod, target, params)
    source = runtime_module.imports[0].inspect_source()
    defect = codegen_defect(source)
    if defect is not None:  # a failed build: this candidate is never measured nor applied
        raise RuntimeError(f"candidate rejected: {defect}")
    path = export_library(runtime_module, cc)
    pocl.write_candidate(os.path.dirname(path), source, mod["main"])
    return path


def builder(cc: str | None, gpu: bool = False):
    """A MetaSchedule builder linking candidates with `cc` (None: the host compiler); `gpu`:
    the candidates are OpenCL kernels (see _build_gpu_candidate).

    MetaSchedule's LocalBuilder starts new worker processes for every batch, and each spends
    about 17 s importing TVM's tensor intrinsics: on 2 cores that was 30 s per batch, longer
    than building and measuring it. These workers are kept, and replaced every WORKER_USES
    builds."""
    import functools

    from tvm.ir.utils import derived_object
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.meta_schedule.builder import local_builder
    from tvm.support.popen_pool import PopenPoolExecutor, StatusKind

    export = functools.partial(export_library, cc=cc)

    @derived_object
    class PersistentBuilder(ms.builder.PyBuilder):
        def __init__(self) -> None:
            # TVM's C++ warnings from candidates ("Detect vectorize inside vectorized
            # loop") would drown the progress lines; build errors come back as results
            self.pool = PopenPoolExecutor(max_workers=os.cpu_count() or 1,
                                          timeout=BUILD_TIMEOUT_S, initializer=_warm_worker,
                                          maximum_process_uses=WORKER_USES,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        def build(self, build_inputs):
            if gpu:
                jobs = [(item.mod, item.target, None, cc) for item in build_inputs]
                work = lambda job: _build_gpu_candidate(*job)  # noqa: E731
            else:
                jobs = [(None, export, item.mod, item.target,
                         local_builder._serialize_params(item.params)) for item in build_inputs]
                work = lambda job: local_builder._worker_func(*job)  # noqa: E731
            results = []
            for done in self.pool.map_with_error_catching(work, jobs):
                if done.status == StatusKind.COMPLETE:
                    results.append(ms.builder.BuilderResult(done.value, None))
                elif done.status == StatusKind.TIMEOUT:
                    results.append(ms.builder.BuilderResult(
                        None, f"build timed out after {BUILD_TIMEOUT_S} s"))
                else:
                    results.append(ms.builder.BuilderResult(
                        None, f"build failed: {done.value}"))
            return results

    return PersistentBuilder()


class Devices:
    """Where candidates are measured: this machine, the devices under a key at a tracker, or
    (GPU targets, `pocl=True`) pocl, an OpenCL implementation on this machine's CPU."""

    def __init__(self, target: Target, rpc: tuple[tuple[str, int], str] | None,
                 pocl: bool = False):
        self.rpc = rpc
        self.pocl = pocl
        if pocl:
            if not target.is_gpu:
                raise InputError(f"--pocl measures OpenCL (GPU) candidates, and target "
                                 f"'{target.name}' is a CPU ({target.kind}).")
            if rpc is not None:
                raise InputError("Measure on the devices at the tracker or on pocl, not both: "
                                 "drop --pocl or --rpc-tracker.")
            from . import pocl as pocl_

            why = pocl_.available()
            if why is not None:
                raise DeviceError(why)
            self.where, self.count, self.emulated = "pocl (OpenCL on this CPU)", 1, True
            return
        if rpc is None:
            if target.cc is not None or target.is_gpu:
                raise DeviceError(
                    f"Target '{target.name}' cannot be measured on this machine: pass "
                    "--rpc-tracker HOST:PORT and --rpc-key KEY of a device"
                    + (" (or --pocl: the whole flow on an OpenCL implementation for this CPU, "
                       "whose timings are not the GPU's)." if target.is_gpu else "."))
            self.where, self.count, self.emulated = "this machine", 1, False
            return
        from .remote import device_info, request_session

        (host, port), key = rpc
        self.count = self.available()
        if self.count == 0:
            raise DeviceError(self._none_left("No device is registered"))
        session = request_session((host, port), key, timeout=RUN_TIMEOUT_S)
        self.emulated = bool(device_info(session).get("emulated"))
        del session
        self.where = f"{self.count} device(s) '{key}' at {host}:{port}"

    def available(self) -> int:
        count, known = registered_devices(*self.rpc)
        self._known = ", ".join(known) or "none"
        return count

    def _none_left(self, what: str) -> str:
        (host, port), key = self.rpc
        return (f"{what} under key '{key}' at the tracker {host}:{port}, so nothing can "
                f"measure the candidates. Keys registered there: {self._known}. Start or "
                f"reconnect the device (`python -m tvm.exec.rpc_server --tracker {host}:{port} "
                f"--key {key}`, or `qcompile device emulate` for the emulated one) and run the "
                "same tune again: it resumes from the records in the log.")

    def runner(self):
        from tvm.s_tir import meta_schedule as ms

        evaluator = ms.runner.EvaluatorConfig(number=3, repeat=1, min_repeat_ms=50,
                                              enable_cpu_cache_flush=False)
        if self.pocl:
            from . import pocl

            return pocl.runner(number=evaluator.number, repeat=evaluator.repeat)
        if self.rpc is None:
            return ms.runner.LocalRunner(evaluator_config=evaluator, timeout_sec=RUN_TIMEOUT_S)
        (host, port), key = self.rpc
        config = ms.runner.RPCConfig(tracker_host=host, tracker_port=port, tracker_key=key,
                                     session_priority=1, session_timeout_sec=RUN_TIMEOUT_S)
        return ms.runner.RPCRunner(rpc_config=config, evaluator_config=evaluator,
                                   max_workers=self.count, f_create_session=create_session)

    def check_alive(self) -> None:
        """After a batch in which every candidate failed: stop if no device is left."""
        if self.rpc is not None and self.available() == 0:
            raise DeviceError(self._none_left("Every device dropped out: none is left"))


@dataclass
class KernelTime:
    """One kernel built and run like a tuning candidate: its run times (seconds), or why it
    did not build or run."""

    args: list                      # its arguments (MetaSchedule ArgInfo)
    run_secs: list | None = None
    build_error: str | None = None  # the last line of the builder's message
    run_error: str | None = None    # the last line of the runner's message

    @property
    def seconds(self) -> float | None:
        return mean_seconds(self.run_secs) if self.run_secs else None


def time_kernels(mods, tvm_target, build, runner) -> list[KernelTime]:
    """Build the scheduled kernels `mods` (IRModules with a "main" PrimFunc) with `build` (all
    at once, in parallel) and time each with `runner` (one after the other, so that they do
    not share the cores), removing each built library after its run."""
    import shutil

    from tvm.s_tir import meta_schedule as ms

    built = build.build([ms.builder.BuilderInput(mod, tvm_target) for mod in mods])
    device = "cpu" if tvm_target.kind.name == "llvm" else tvm_target.kind.name
    times = []
    for mod, result in zip(mods, built):
        timed = KernelTime(ms.arg_info.ArgInfo.from_prim_func(mod["main"]))
        if result.error_msg:
            timed.build_error = last_line(result.error_msg)
        else:
            try:
                ran = runner.run([ms.runner.RunnerInput(result.artifact_path, device,
                                                        timed.args)])[0].result()
            finally:
                shutil.rmtree(os.path.dirname(result.artifact_path), ignore_errors=True)
            if ran.error_msg:
                timed.run_error = last_line(ran.error_msg)
            else:
                timed.run_secs = [float(t) for t in ran.run_secs]
        times.append(timed)
    return times


def registered_devices(address: tuple[str, int], key: str) -> tuple[int, list[str]]:
    """(devices registered under `key` at the tracker, every key registered there)"""
    from .remote import tracker_status

    status = {k.key: k for k in tracker_status(address).keys}
    return (status[key].total if key in status else 0), sorted(status)


def create_session(rpc_config):
    """MetaSchedule's session for one candidate, failing at once when the tracker has no device
    under the key: its own request would wait for one forever, so a tune whose devices died
    would hang instead of stopping."""
    from tvm.s_tir.meta_schedule.runner.rpc_runner import default_create_session

    address = (rpc_config.tracker_host, rpc_config.tracker_port)
    key = rpc_config.tracker_key
    if registered_devices(address, key)[0] == 0:
        raise DeviceError(f"no device is registered under key '{key}' at the tracker "
                          f"{address[0]}:{address[1]}")
    return default_create_session(rpc_config)


def progress_callback(devices: Devices, out: TextIO, stop):
    """A MetaSchedule measure callback printing one live line per kernel; it stops the tune
    (TuneInterrupted) after the batch during which `stop` (a threading.Event) was set."""
    from tvm.s_tir import meta_schedule as ms
    from tvm.ir.utils import derived_object

    @derived_object
    class Progress(ms.measure_callback.PyMeasureCallback):
        def __init__(self) -> None:
            self.error: DeviceError | TuneInterrupted | None = None
            self.start("", 0.0, 0, None)

        def start(self, label: str, flops: float, budget: int, best: float | None) -> None:
            self.label, self.flops, self.budget, self.best = label, flops, budget, best
            self.done = self.failed = 0
            self.started = time.perf_counter()

        def line(self) -> str:
            elapsed = time.perf_counter() - self.started
            eta = elapsed / self.done * (self.budget - self.done) if self.done else 0.0
            best = "-" if self.best is None else f"{self.best * 1e6:.1f} us"
            ops = "" if self.best is None or not self.flops else \
                f" ({self.flops / self.best / 1e9:.1f} GOPS)"
            return (f"{self.label}: {self.done}/{self.budget} trials, best {best}{ops}, "
                    f"{self.failed} failed, {elapsed:.0f} s, ETA {eta:.0f} s")

        def apply(self, task_scheduler, task_id, measure_candidates, builder_results,
                  runner_results) -> None:
            failed = 0
            for built, ran in zip(builder_results, runner_results):
                seconds = mean_seconds(ran.run_secs) if built.error_msg is None and \
                    ran.error_msg is None else None
                if seconds is None:
                    failed += 1
                elif self.best is None or seconds < self.best:
                    self.best = seconds
            self.done += len(runner_results)
            self.failed += failed
            end = "\n" if not out.isatty() else "\r"
            out.write(self.line() + end)
            out.flush()
            ran_nothing = all(r.error_msg is not None for r in runner_results)
            built_some = any(b.error_msg is None for b in builder_results)
            if stop.is_set():
                self.error = TuneInterrupted("stopped")
                raise self.error
            if ran_nothing and built_some:
                try:
                    devices.check_alive()
                except DeviceError as exc:
                    self.error = exc  # TVM re-raises it as a RuntimeError: tune() unwraps it
                    raise

    return Progress()
