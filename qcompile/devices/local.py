"""This machine: candidates measured by MetaSchedule's local runner, models run in-process."""

from __future__ import annotations

from .base import RUN_TIMEOUT_S, Device


class LocalDevice(Device):
    where = "this machine"

    def runner(self):
        from tvm.s_tir import meta_schedule as ms

        return ms.runner.LocalRunner(evaluator_config=self.evaluator(),
                                     timeout_sec=RUN_TIMEOUT_S)

    def threads(self) -> int:
        """The runtime's thread count in this process, which the runner's worker processes
        inherit (TVM_NUM_THREADS; unset, half the CPUs on x86)."""
        import tvm

        return int(tvm.get_global_func("runtime.NumThreads")())

    def load(self, directory):
        from ..runtime import load

        return load(directory)


__all__ = ["LocalDevice"]
