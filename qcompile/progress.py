"""The tune's progress: one live line per kernel (trials, best time, GOPS, ETA), and the stop
after the batch during which Ctrl-C came or every device dropped out."""

from __future__ import annotations

import time
from typing import TextIO

from .devices import Device
from .errors import DeviceError, TuneInterrupted
from .tuning_log import mean_seconds

def progress_callback(devices: Device, out: TextIO, stop):
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


__all__ = ["progress_callback"]
