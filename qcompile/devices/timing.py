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


__all__ = ["KernelTime", "time_kernels"]
