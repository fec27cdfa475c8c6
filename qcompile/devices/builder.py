"""Tuning candidates built on this machine with the target's (cross) compiler, into a final
.so that a device without a compiler loads: a builder whose worker processes live for the whole
tune (MetaSchedule's start new ones for every batch)."""

from __future__ import annotations

import os
import subprocess
import tempfile

BUILD_TIMEOUT_S = 180  # MetaSchedule's 30 s timed out on 2 cores (its workers import ~17 s)
WORKER_USES = 64  # builds per worker process before it is replaced (TVM's workers leak memory)


def export_library(module, cc: str | None) -> str:
    """MetaSchedule builder export: a .so linked here with the target's compiler."""
    from tvm.support import cc as tvm_cc

    path = os.path.join(tempfile.mkdtemp(prefix="qcompile-candidate-"), "candidate.so")
    module.export_library(path, fcompile=tvm_cc.cross_compiler(cc) if cc else None)
    return path


def _warm_worker() -> None:
    """What MetaSchedule's default build imports, once per worker (its CPU intrinsics)."""
    from ..schedules.cpu.intrinsics import import_tvm_cpu_intrinsics

    import_tvm_cpu_intrinsics()


def _build_gpu_candidate(mod, target, params, cc: str | None) -> str:
    """Build a GPU candidate like MetaSchedule does, into a .so (which an RPC device runs) with
    its OpenCL C and launch sizes beside it (which pocl runs: pocl.runner). A candidate whose
    OpenCL C has a known code-generation defect fails to build (schedules.opencl.default.codegen_defect)."""
    from tvm.s_tir.meta_schedule.builder import local_builder

    from ..schedules.opencl.default import codegen_defect
    from . import pocl

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
    about 17 s importing all of TVM's tensor intrinsics: on 2 cores that was 30 s per batch,
    longer than building and measuring it. These workers are kept, replaced every WORKER_USES
    builds, and import only the CPU intrinsics (intrinsics.import_tvm_cpu_intrinsics)."""
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



def builder_for(target):
    """The builder for a target's candidates (OpenCL ones keep their source for pocl)."""
    return builder(target.cc, gpu=target.kind == "opencl")


__all__ = ["BUILD_TIMEOUT_S", "builder", "builder_for", "export_library"]
