"""OpenCL GPU kernels (Mali, Adreno): TVM's pipeline for the target up to fusion (generic
GPU, or Adreno's), dlight's rules minus the ones that compute wrong results (default.py), and
an int8 search space whose candidates avoid a code-generation defect (search_space.py)."""

from __future__ import annotations

from . import default as dlight_default, search_space


def _backend(tvm_target):
    from tvm.relax.backend import adreno, gpu_generic

    return adreno if "adreno" in tvm_target.keys else gpu_generic


def fuse(mod, tvm_target, packed_layout: bool | None = None):
    """TVM's pipeline for the target up to fusion, without its default schedules.
    `packed_layout` does not apply to GPUs."""
    import tvm
    from tvm import relax

    backend = _backend(tvm_target)
    with tvm_target:
        passes = [relax.transform.FoldConstant()] + \
            backend.library_dispatch_passes(tvm_target) + backend.legalize_passes(tvm_target)
        return tvm.transform.Sequential(
            [p for p in passes if p.info.name != "ApplyDefaultSchedule"])(mod)


def apply(mod, tvm_target):
    return dlight_default.apply(mod, tvm_target)


def default(kernel, tvm_target):
    return dlight_default.schedule(kernel["main"], tvm_target)


def space(kernel, tvm_target):
    return search_space.space(kernel, tvm_target)


def finalize(mod, tvm_target):
    import tvm

    backend = _backend(tvm_target)
    with tvm_target:
        return tvm.transform.Sequential(backend.dataflow_lower_passes(tvm_target)
                                        + backend.finalize_passes(tvm_target))(mod)


def check(executable) -> None:
    """Refuse OpenCL C with a known TVM code-generation defect (wrong results): the tuner
    rejects such candidates and our dlight rules avoid the schedules that caused it so far;
    this stops one that slips through. ValueError naming the defect."""
    pending = [executable]
    while pending:
        current = pending.pop()
        pending.extend(current.imports)
        if current.kind == "opencl":
            defect = dlight_default.codegen_defect(current.inspect_source())
            if defect is not None:
                raise ValueError(defect)


def schedule_counts(attrs) -> dict[str, int]:
    from .. import SCHEDULE_ATTR

    return {"gpu_default_schedules": sum(1 for a in attrs
                                         if a.get(SCHEDULE_ATTR) == dlight_default.SCHEDULE)}


__all__ = ["apply", "check", "default", "finalize", "fuse", "schedule_counts", "space"]
