"""What every device is: where candidates and kernels are measured, and models run."""

from __future__ import annotations

RUN_TIMEOUT_S = 60


class Device:
    """A place that measures tuning candidates and kernels (`runner`, a MetaSchedule runner)
    and runs compiled models (`load`). `where` names it for messages and logs; `emulated`: its
    timings are not a phone's (qemu, pocl)."""

    where: str = ""
    emulated: bool = False
    stand_in: bool = False  # measures on another processor than the target's (pocl for a GPU)
    count: int = 1  # devices measuring in parallel

    def evaluator(self):
        """How each candidate is timed: 3 runs of at least 50 ms."""
        from tvm.s_tir import meta_schedule as ms

        return ms.runner.EvaluatorConfig(number=3, repeat=1, min_repeat_ms=50,
                                         enable_cpu_cache_flush=False)

    def runner(self):
        raise NotImplementedError

    def threads(self) -> int | None:
        """The threads each kernel measured here runs on, when known (None: the device's
        runtime decides, out of sight)."""
        return None

    def describe(self) -> str:
        """Where measurements happen, with the thread count when known (for messages)."""
        threads = self.threads()
        return self.where if threads is None else f"{self.where} with {threads} thread(s)"

    def check_alive(self) -> None:
        """After a batch in which every candidate failed: raise DeviceError when no device is
        left to measure on (a single local device always is)."""

    def load(self, directory):
        """The compiled model in `directory` loaded here (runtime.LoadedModel)."""
        raise NotImplementedError


__all__ = ["Device", "RUN_TIMEOUT_S"]
