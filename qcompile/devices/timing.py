"""Kernels built and timed like tuning candidates, on any device (layer timing and the
default schedules' measurements use it)."""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..errors import last_line
from ..tuning_log import mean_seconds

@dataclass
class KernelTime:
    """One kernel built and run like a tuning candidate: its run times (seconds), or why it
    did not build or run."""

    args: list                      # its arguments (MetaSchedule ArgInfo)
    run_secs: list | None = None    # one mean per timing pass
    build_error: str | None = None  # the last line of the builder's message
    run_error: str | None = None    # the last line of the runner's message

    @property
    def seconds(self) -> float | None:
        """The fastest pass: a pass can only be slowed by other work on the device."""
        times = [t for t in (mean_seconds([s]) for s in self.run_secs or []) if t is not None]
        return min(times) if times else None


def time_kernels(mods, tvm_target, build, runner, passes: int = 1) -> list[KernelTime]:
    """Build the scheduled kernels `mods` (IRModules with a "main" PrimFunc) with `build` (all
    at once, in parallel) and time each with `runner` (one after the other, so that they do
    not share the cores), in `passes` passes over all of them: kernels compared with each other
    are then timed minutes apart several times, and a slow minute on a shared machine does not
    decide. The built libraries are removed at the end."""
    import shutil

    from tvm.s_tir import meta_schedule as ms

    built = build.build([ms.builder.BuilderInput(mod, tvm_target) for mod in mods])
    device = "cpu" if tvm_target.kind.name == "llvm" else tvm_target.kind.name
    times = [KernelTime(ms.arg_info.ArgInfo.from_prim_func(mod["main"])) for mod in mods]
    for timed, result in zip(times, built):
        if result.error_msg:
            timed.build_error = last_line(result.error_msg)
    try:
        for _ in range(passes):
            for timed, result in zip(times, built):
                if timed.build_error or timed.run_error:
                    continue
                ran = runner.run([ms.runner.RunnerInput(result.artifact_path, device,
                                                        timed.args)])[0].result()
                if ran.error_msg:
                    timed.run_error = last_line(ran.error_msg)
                    timed.run_secs = None
                else:
                    values = [float(t) for t in ran.run_secs]
                    timed.run_secs = (timed.run_secs or []) + [sum(values) / len(values)]
    finally:
        for result in built:
            if not result.error_msg:
                shutil.rmtree(os.path.dirname(result.artifact_path), ignore_errors=True)
    return times


__all__ = ["KernelTime", "time_kernels"]
