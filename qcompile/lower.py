"""Lowering: a Relax module -> its target kind's fused kernels -> scheduled -> finalized.

Build and tune share this, so that a tuning record, which belongs to one fused kernel, finds
that kernel again at build time. The target kind's schedules package (schedules/cpu,
schedules/opencl) does each step; this module is the only one that picks it.

    kernels(mod, target)              the fused, unscheduled kernels: what tune searches
    schedule(kernels, target, log)    each kernel's best record in the log, else our default
    lower(mod, target, log)           all three steps: what build compiles
    finish(kernels, target, log)      the last two, on kernels made already
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import last_line
from .relax_main import module_copy
from .targets import Target
from .tvm_noise import quiet

if TYPE_CHECKING:
    from .tuning_log import TuningLog

log = logging.getLogger(__name__)


def schedules_of(target: Target):
    """The schedules package of the target's kind (schedules/cpu for llvm, schedules/opencl)."""
    if target.kind == "llvm":
        from .schedules import cpu

        return cpu
    if target.kind == "opencl":
        from .schedules import opencl

        return opencl
    raise ValueError(f"qcompile has no schedules for target kind '{target.kind}'")


def kernels(mod, target: Target, packed_layout: bool | None = None):
    """The model legalized to TIR and fused, unscheduled: the kernels tuned and then built.
    `packed_layout` (CPU): convert to NHWC for packed int8 even without an int8 conv (True),
    or never (False); None: when the model has one."""
    with quiet():  # legalizing prints TVM's take warning for every Gather
        return schedules_of(target).fuse(mod, target.to_tvm(), packed_layout)


def schedule(fused, target: Target, tuning_log: TuningLog | None = None):
    """The kernels of `fused` (from `kernels`) with each one's best record in `tuning_log`
    and, for the others, our default schedules (`fused` itself is left as it was)."""
    tvm_target = target.to_tvm()
    with tvm_target:
        tuned = (apply_tuning_log(fused, tuning_log) if tuning_log is not None
                 else module_copy(fused))
        return schedules_of(target).apply(tuned, tvm_target)


def lower(mod, target: Target, tuning_log: TuningLog | None = None):
    """The Relax module ready for tvm.compile: fused, scheduled, finalized."""
    return finish(kernels(mod, target), target, tuning_log)


def finish(fused, target: Target, tuning_log: TuningLog | None = None):
    """`kernels`' output scheduled and finalized: ready for tvm.compile."""
    scheduled = schedule(fused, target, tuning_log)
    return schedules_of(target).finalize(scheduled, target.to_tvm())


def dot_product(target: Target):
    """The integer dot-product instruction (schedules.cpu.DotProduct) the target's int8
    kernels are packed for, or None (GPUs; CPUs without one)."""
    from .schedules.cpu import dot_product_for

    return dot_product_for(target.to_tvm())


def tuned_schedule(kernel, target: Target, tuning_log: TuningLog):
    """One kernel (an IRModule with "main") with its best record in `tuning_log`, as compile
    would give it; None when the log has no record that replays on it."""
    with target.to_tvm():
        applied = apply_tuning_log(kernel, tuning_log)
    attrs = applied["main"].attrs
    return applied if attrs is not None and "tirx.is_scheduled" in attrs else None


def default_schedule(kernel, target: Target):
    """Our default schedule of one kernel (an IRModule with "main"), as `schedule` gives it
    without a record, or None when it has none worth measuring."""
    return schedules_of(target).default(kernel, target.to_tvm())


def search_space(kernel, target: Target):
    """The space generator MetaSchedule tunes the kernel in."""
    return schedules_of(target).space(kernel, target.to_tvm())


def code_defect(executable, target: Target) -> str | None:
    """Why the compiled code would compute wrong results (a known TVM code-generation defect),
    or None."""
    try:
        schedules_of(target).check(executable)
    except ValueError as exc:
        return str(exc)
    return None


def apply_tuning_log(mod, tuning_log: TuningLog):
    """`mod` with each kernel given its best schedule from the log, one kernel at a time
    (`mod` itself is left as it was).

    Records are keyed by the kernel's anchor (conv/matmul) block, so a record can match a
    kernel whose other blocks differ from the one it was tuned on; replaying its trace can
    then fail inside TVM. Such a kernel keeps its default code instead of failing the build.
    (Call inside `with target:`.)"""
    import tvm
    from tvm import relax

    apply = relax.transform.MetaScheduleApplyDatabase(enable_warning=False)
    mod = module_copy(mod)
    with tuning_log.database():
        for gvar, func in list(mod.functions.items()):
            if not isinstance(func, tvm.tirx.PrimFunc):
                continue
            try:
                applied = apply(tvm.IRModule({gvar: func}))
            except Exception as exc:  # noqa: BLE001 - one kernel's record is not the build
                log.info("kernel %s keeps its default schedule: its tuning record does not "
                         "replay on it (%s)", gvar.name_hint,
                         last_line(str(exc), type(exc).__name__)[:120])
                continue
            mod[gvar] = applied[gvar.name_hint]
    return mod


@dataclass(frozen=True)
class KernelCounts:
    """How the kernels of a lowered module got their schedules."""

    total: int
    tuned: int             # a schedule from the tuning log
    int8_default: int = 0  # our default schedule for a packed int8 kernel
    float_default: int = 0  # our default schedule for the other CPU kernels
    gpu_default: int = 0   # dlight's schedule, as schedules/opencl chooses it

    def to_json(self) -> dict[str, int]:
        return {"total": self.total, "tuned": self.tuned,
                "int8_default_schedules": self.int8_default,
                "float_default_schedules": self.float_default,
                "gpu_default_schedules": self.gpu_default}


def kernel_counts(mod, target: Target) -> KernelCounts:
    import tvm

    from .schedules import SCHEDULE_ATTR

    kernels_ = [f for _, f in mod.functions.items() if isinstance(f, tvm.tirx.PrimFunc)]
    attrs = [f.attrs if f.attrs is not None else {} for f in kernels_]
    ours = schedules_of(target).schedule_counts(attrs)
    return KernelCounts(
        total=len(kernels_),
        tuned=sum(1 for a in attrs if "tirx.is_scheduled" in a and SCHEDULE_ATTR not in a),
        int8_default=ours.get("int8_default_schedules", 0),
        float_default=ours.get("float_default_schedules", 0),
        gpu_default=ours.get("gpu_default_schedules", 0))


__all__ = ["KernelCounts", "apply_tuning_log", "code_defect", "default_schedule", "dot_product",
           "finish", "kernel_counts", "kernels", "lower", "schedule", "schedules_of", "search_space",
           "tuned_schedule"]
