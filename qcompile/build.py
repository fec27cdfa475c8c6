"""Build stage: a Relax module -> a self-contained shared library for the target.

The standard Relax pipeline for the target kind runs here (constant folding, legalization to
TIR, operator fusion, and dlight's default GPU schedules for OpenCL targets), then the library is
linked on this machine with the target's (cross) compiler: a phone has no compiler, so the .so
that reaches it must be final.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path


from .artifact import LIBRARY_FILE, Artifact, Manifest, sha256_of
from .errors import InputError, ToolchainError, last_line
from .frontend import FloatModel
from .relax_main import module_copy
from .targets import Target
from .tune import fused_module
from .tuning_log import TuningLog

log = logging.getLogger(__name__)


def versions() -> dict[str, str]:
    import tvm

    from . import __version__

    return {"qcompile": __version__, "tvm": tvm.__version__}


def optimize(mod, target: Target, tuning_log: TuningLog | None = None):
    """Run the target's standard Relax pipeline: fold, legalize, fuse, schedule.

    With a tuning log, the fused kernels that have records get their best tuned schedule; the
    others get qcompile's default schedules (schedules/int8_default.py for packed int8
    kernels, schedules/float_default.py for the rest; on GPUs, schedules/gpu_default.py).
    """
    import tvm

    from .schedules import float_default, int8_default, intrinsics

    tvm_target = target.to_tvm()
    if target.is_gpu:
        _, scheduled = gpu_kernels(mod, target, tuning_log)
        backend = _gpu_backend(tvm_target)
        with tvm_target:
            seq = tvm.transform.Sequential(backend.dataflow_lower_passes(tvm_target)
                                           + backend.finalize_passes(tvm_target))
            return seq(scheduled)
    from tvm.relax.backend.cpu_generic.pipeline import dataflow_lower_passes, finalize_passes

    mod = fused_module(mod, target)
    with tvm_target:
        if tuning_log is not None:
            mod = apply_tuning_log(mod, tuning_log)
        dot = intrinsics.dot_product_for(tvm_target)
        if dot is not None:
            mod = int8_default.apply(mod, dot)
        mod = float_default.apply(mod)
        seq = tvm.transform.Sequential(dataflow_lower_passes(tvm_target)
                                       + finalize_passes(tvm_target))
        return seq(mod)


def gpu_kernels(mod, target: Target, tuning_log: TuningLog | None = None):
    """An OpenCL target's Relax module with its kernels fused, before and after scheduling:
    (fused, scheduled). TVM's pipeline for the target (generic GPU, or Adreno's) up to fusion;
    then each kernel's best record in `tuning_log`, and for the others qcompile's choice of
    dlight rules (schedules/gpu_default.py)."""
    import tvm
    from tvm import relax

    from .schedules import gpu_default

    tvm_target = target.to_tvm()
    backend = _gpu_backend(tvm_target)
    with tvm_target:
        passes = [relax.transform.FoldConstant()] + \
            backend.library_dispatch_passes(tvm_target) + backend.legalize_passes(tvm_target)
        fused = tvm.transform.Sequential(
            [p for p in passes if p.info.name != "ApplyDefaultSchedule"])(mod)
        tuned = apply_tuning_log(fused, tuning_log) if tuning_log is not None else fused
        return fused, gpu_default.apply(tuned, tvm_target)


def _gpu_backend(tvm_target):
    from tvm.relax.backend import adreno, gpu_generic

    return adreno if "adreno" in tvm_target.keys else gpu_generic


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


def check_opencl(module) -> None:
    """Refuse to ship OpenCL C with a known TVM code-generation defect (wrong results): the
    tuner rejects such candidates and qcompile's dlight rules avoid the schedules that caused
    it so far; this stops one that slips through."""
    from .schedules.gpu_default import codegen_defect

    pending = [module]
    while pending:
        current = pending.pop()
        pending.extend(current.imports)
        if current.kind == "opencl":
            defect = codegen_defect(current.inspect_source())
            if defect is not None:
                raise InputError(f"The GPU build would compute wrong results: {defect}. "
                                   "Compile without --tuning-log if one was given, or in "
                                   "another precision (--quantize fp16).")


@dataclass(frozen=True)
class KernelCounts:
    total: int
    tuned: int             # a schedule from the tuning log
    int8_default: int      # our default schedule for a packed int8 kernel (schedules/)
    float_default: int     # our default schedule for the other kernels (schedules/)
    gpu_default: int = 0   # dlight's schedule, as schedules/gpu_default.py chooses it


def kernel_counts(mod) -> KernelCounts:
    """How the kernels of an optimized module got their schedules."""
    import tvm

    from .schedules.gpu_default import SCHEDULE as DLIGHT
    from .schedules.int8_default import SCHEDULE_ATTR

    kernels = [f for _, f in mod.functions.items() if isinstance(f, tvm.tirx.PrimFunc)]
    attrs = [f.attrs if f.attrs is not None else {} for f in kernels]
    return KernelCounts(total=len(kernels),
                        tuned=sum(1 for a in attrs if "tirx.is_scheduled" in a
                                  and SCHEDULE_ATTR not in a),
                        int8_default=sum(1 for a in attrs
                                         if a.get(SCHEDULE_ATTR) == "packed-int8"),
                        float_default=sum(1 for a in attrs if SCHEDULE_ATTR in a
                                          and a.get(SCHEDULE_ATTR) not in ("packed-int8",
                                                                           DLIGHT)),
                        gpu_default=sum(1 for a in attrs if a.get(SCHEDULE_ATTR) == DLIGHT))


def link(executable, path: Path, target: Target) -> None:
    """Export the executable as one .so, linked with the target's compiler."""
    fcompile = None
    if target.cc is not None:
        from tvm.support import cc

        fcompile = cc.cross_compiler(target.cc)
    try:
        # -s: no symbol tables or debug info in what ships to the phone (about 0.5 MB)
        executable.export_library(str(path), fcompile=fcompile, options=["-s"])
    except RuntimeError as exc:  # tvm.support.cc raises RuntimeError with the linker output
        lines = [line for line in str(exc).splitlines() if line.strip()]
        cpu = target.host if target.is_gpu else target.target
        raise ToolchainError(
            f"Linking {LIBRARY_FILE} with '{target.cc or 'the host compiler'}' failed: "
            f"{' / '.join(lines[1:4]) or exc}. Check that this compiler produces code for "
            f"{cpu.get('mtriple', 'this machine')}.") from None


def build(model: FloatModel, target: Target, out_dir: str | Path,
          tuning_log: TuningLog | None = None) -> Artifact:
    """Compile `model` for `target` into OUT_DIR/model.so + model.json.

    `target` must have its compiler resolved (Target.with_compiler). The directory is written
    whole or not at all: a failed build leaves an existing OUT_DIR untouched.
    """
    import tvm

    out_dir = Path(out_dir)
    tvm_target = target.to_tvm()
    start = time.perf_counter()
    log.info("optimizing and generating code for %s (%s)", target.name, target.kind)
    mod = optimize(model.mod, target, tuning_log)
    counts = kernel_counts(mod)
    if counts.int8_default:
        log.info("%d int8 kernel(s) on packed weights with qcompile's default schedules",
                 counts.int8_default)
    if counts.float_default:
        log.info("%d other kernel(s) with qcompile's default (untuned) schedules",
                 counts.float_default)
    if counts.gpu_default:
        log.info("%d GPU kernel(s) with dlight's default (untuned) schedules",
                 counts.gpu_default)
    if tuning_log is not None:
        log.info("tuning log %s: tuned schedules for %d of %d kernels%s", tuning_log.directory,
                 counts.tuned, counts.total, "" if counts.tuned else " (its records are for other kernels or "
                 "another target: the default schedules are used)")
    executable = tvm.compile(mod, tvm_target, relax_pipeline=None)
    if target.is_gpu:
        check_opencl(executable.mod)
    log.info("linking %s with %s", LIBRARY_FILE, target.cc or "the host compiler")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".qcompile-", dir=out_dir.parent))
    try:
        library = staging / LIBRARY_FILE
        link(executable, library, target)
        manifest = Manifest(
            inputs=model.inputs, outputs=model.outputs, target=target.to_json(),
            layers=tuple(layer.to_json() for layer in model.layers),
            library_sha256=sha256_of(library), library_bytes=library.stat().st_size,
            versions=versions(), source={"model": model.source, "sha256": model.sha256},
            kernels={"total": counts.total, "tuned": counts.tuned,
                     "int8_default_schedules": counts.int8_default,
                     "float_default_schedules": counts.float_default,
                     "gpu_default_schedules": counts.gpu_default,
                     "tuning_log": str(tuning_log.directory) if tuning_log else None})
        Artifact(staging, manifest).save()
        out_dir.mkdir(exist_ok=True)
        for item in staging.iterdir():
            os.replace(item, out_dir / item.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("built %s (%.1f MB) in %.1f s", out_dir / LIBRARY_FILE,
             manifest.library_bytes / 1e6, time.perf_counter() - start)
    return Artifact(out_dir, manifest)


