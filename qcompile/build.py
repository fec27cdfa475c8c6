"""Build stage: a Relax module -> a self-contained shared library for the target.

The module is lowered for the target's kind (lower.py: fused kernels, each with its tuned or
default schedule), compiled, checked for known code-generation defects, then linked on this
machine with the target's (cross) compiler: a phone has no compiler, so the .so that reaches it
must be final.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path
from typing import Callable


from . import kernel_facts, lower
from .artifact import LIBRARY_FILE, MANIFEST_FILE, OWN_FILES, Artifact, Manifest, sha256_of
from .errors import CodegenError, InputError, ToolchainError
from .paths import new_staging, remove_stale_staging
from .frontend import FloatModel
from .targets import Target
from .tuning_log import TuningLog

log = logging.getLogger(__name__)


def versions() -> dict[str, str]:
    import tvm

    from .version import __version__

    return {"qcompile": __version__, "tvm": tvm.__version__}


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
        cpu = target.cpu
        raise ToolchainError(
            f"Linking {LIBRARY_FILE} with '{target.cc or 'the host compiler'}' failed: "
            f"{' / '.join(lines[1:4]) or exc}. Check that this compiler produces code for "
            f"{cpu.get('mtriple', 'this machine')}.") from None


def build(model: FloatModel, target: Target, out_dir: str | Path,
          tuning_log: TuningLog | None = None,
          extras: Callable[[Path], object] | None = None) -> Artifact:
    """Compile `model` for `target` into OUT_DIR/model.so + model.json.

    `target` must have its compiler resolved (Target.with_compiler). `extras(directory)`
    writes more files beside them (reports) before they are published. The directory is
    written whole or not at all: a failed build leaves an existing OUT_DIR untouched, and an
    earlier build's reports that this one does not write are removed (publish).
    """
    import tvm

    out_dir = Path(out_dir)
    tvm_target = target.to_tvm()
    start = time.perf_counter()
    log.info("optimizing and generating code for %s (%s)", target.name, target.kind)
    fused = lower.kernels(model.mod, target)
    mod = lower.finish(fused, target, tuning_log)
    counts = lower.kernel_counts(mod, target)
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
                 counts.tuned, counts.total, "" if counts.tuned else " (its records are for "
                 "other kernels or another target: the default schedules are used)")
    executable = tvm.compile(mod, tvm_target, relax_pipeline=None)
    defect = lower.code_defect(executable.mod, target)
    if defect is not None:
        raise CodegenError(f"The {target.name} build would compute wrong results: {defect}. "
                           "Compile without --tuning-log if one was given, or in another "
                           "precision (--quantize fp16).")
    log.info("linking %s with %s", LIBRARY_FILE, target.cc or "the host compiler")
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_staging(out_dir.parent)
        staging = new_staging(out_dir.parent)
    except OSError as exc:
        raise _unwritable(out_dir, exc) from None
    try:
        library = staging / LIBRARY_FILE
        link(executable, library, target)
        manifest = Manifest(
            inputs=model.inputs, outputs=model.outputs, target=target.to_json(),
            layers=tuple(layer.to_json() for layer in model.layers),
            library_sha256=sha256_of(library), library_bytes=library.stat().st_size,
            versions=versions(), source={"model": model.source, "sha256": model.sha256},
            kernels={**counts.to_json(),
                     "tuning_log": str(tuning_log.directory) if tuning_log else None,
                     "functions": kernel_facts.describe(fused, mod)})
        try:
            Artifact(staging, manifest).save()
            if extras is not None:
                extras(staging)
            publish(staging, out_dir)
        except OSError as exc:
            raise _unwritable(out_dir, exc) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("built %s (%.1f MB) in %.1f s", out_dir / LIBRARY_FILE,
             manifest.library_bytes / 1e6, time.perf_counter() - start)
    return Artifact(out_dir, manifest)


def publish(staging: Path, out_dir: Path) -> None:
    """Move a finished build from `staging` into `out_dir`: qcompile's own files of an earlier
    build that this one does not have (a quantization report after an fp32 build) are removed
    first, the manifest is replaced last. Other files in `out_dir` are kept."""
    out_dir.mkdir(exist_ok=True)
    produced = {item.name for item in staging.iterdir()}
    for name in OWN_FILES:
        if name not in produced:
            (out_dir / name).unlink(missing_ok=True)
    for item in sorted(staging.iterdir(), key=lambda item: item.name == MANIFEST_FILE):
        os.replace(item, out_dir / item.name)


def _unwritable(out_dir: Path, exc: OSError) -> InputError:
    return InputError(f"Cannot write the build to '{out_dir}': {exc.strerror or exc} "
                      f"({exc.filename or out_dir}). Pass -o a directory you can write to, "
                      "on a disk with room for the library.")
