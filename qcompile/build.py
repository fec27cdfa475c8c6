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
from pathlib import Path


from .artifact import LIBRARY_FILE, Artifact, Manifest, sha256_of
from .errors import ToolchainError
from .frontend import FloatModel
from .targets import Target
from .tune import TuningLog, fused_module

log = logging.getLogger(__name__)


def versions() -> dict[str, str]:
    import tvm

    from . import __version__

    return {"qcompile": __version__, "tvm": tvm.__version__}


def optimize(mod, target: Target, tuning_log: TuningLog | None = None):
    """Run the target's standard Relax pipeline: fold, legalize, fuse, schedule.

    With a tuning log (CPU targets), the fused kernels that have records get their best tuned
    schedule; the others keep the default code.
    """
    import tvm
    from tvm import relax

    tvm_target = target.to_tvm()
    if tuning_log is None or target.is_gpu:
        with tvm_target:
            mod = relax.transform.FoldConstant()(mod)
            return relax.get_default_pipeline(tvm_target)(mod)
    from tvm.relax.backend.cpu_generic.pipeline import dataflow_lower_passes, finalize_passes

    mod = fused_module(mod, target)
    with tvm_target, tuning_log.database():
        mod = relax.transform.MetaScheduleApplyDatabase(enable_warning=False)(mod)
        seq = tvm.transform.Sequential(dataflow_lower_passes(tvm_target)
                                       + finalize_passes(tvm_target))
        return seq(mod)


def kernel_counts(mod) -> tuple[int, int]:
    """(kernels with a tuned schedule, all kernels) of an optimized module."""
    import tvm

    kernels = [f for _, f in mod.functions.items() if isinstance(f, tvm.tirx.PrimFunc)]
    tuned = [f for f in kernels if f.attrs is not None and "tirx.is_scheduled" in f.attrs]
    return len(tuned), len(kernels)


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
    tuned, kernels = kernel_counts(mod)
    if tuning_log is not None:
        log.info("tuning log %s: tuned schedules for %d of %d kernels%s", tuning_log.directory,
                 tuned, kernels, "" if tuned else " (its records are for other kernels or "
                 "another target: the default schedules are used)")
    executable = tvm.compile(mod, tvm_target, relax_pipeline=None)
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
            kernels={"total": kernels, "tuned": tuned,
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


