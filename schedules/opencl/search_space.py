"""The search space MetaSchedule tunes an OpenCL (Mali, Adreno) kernel in.

Float kernels get MetaSchedule's default GPU rules. Integer kernels get the same rules with one
change: the shared-memory fetches that multi-level tiling adds are not vectorized
(`vector_load_lens=[1]` instead of `[1, 2, 3, 4, 8, 16]`).

Why: a vectorized fetch of int8 data is often a gather (the padded input of a conv, the weights
of a grouped conv), and TVM 0.27's OpenCL code generator packs a gathered char vector into one
int, which computes wrong values (default.codegen_defect; the builder rejects such
candidates). Measured on packed_convnet's three int8 convs for Mali, 24 sampled candidates each:
with the default rules 39 of the 72 had the defect (65 built), with fetches of 1 or 4 lanes 28
(65 built), with 1 lane none (67 built). A rejected candidate costs a build and a trial of the
search's budget.
What is given up: contiguous char4 fetches, which are correct when they happen.
"""

from __future__ import annotations

INT8_VECTOR_LOAD_LENS = [1]
DEFAULT_VECTOR_LOAD_LENS = [1, 2, 3, 4, 8, 16]  # TVM's ScheduleRule::DefaultCUDA


def is_integer_kernel(func) -> bool:
    """Whether the kernel `func` (a PrimFunc, or a tuning task's IRModule) reads 8-bit integer
    tensors."""
    import tvm

    if isinstance(func, tvm.IRModule):
        func = func["main"]
    return any(str(p.dtype) in ("int8", "uint8") for p in func.params)


def space(func, tvm_target):
    """The space generator to tune `func` (as is_integer_kernel takes it) in on the GPU target
    `tvm_target`: anything MetaSchedule's TuneContext takes as space_generator."""
    from tvm.s_tir import meta_schedule as ms

    if not is_integer_kernel(func):
        return "post-order-apply"
    return ms.space_generator.PostOrderApply(sch_rules=rules(INT8_VECTOR_LOAD_LENS))


def rules(vector_load_lens: list[int]) -> list:
    """MetaSchedule's default GPU schedule rules, with multi-level tiling's shared-memory
    fetches vectorized by `vector_load_lens`. The other rules are TVM's own objects; the
    tiling rule is rebuilt with DefaultCUDA's arguments (with DEFAULT_VECTOR_LOAD_LENS it
    samples the same candidates as TVM's: tested)."""
    from tvm.s_tir import meta_schedule as ms

    out = []
    for rule in ms.ScheduleRule.create("cuda"):
        if type(rule).__name__ == "MultiLevelTiling":
            rule = ms.schedule_rule.MultiLevelTiling(
                structure="SSSRRSRS", tile_binds=["blockIdx.x", "vthread.x", "threadIdx.x"],
                max_innermost_factor=64, vector_load_lens=list(vector_load_lens),
                reuse_read=ms.schedule_rule.ReuseType(req="must", levels=[4], scope="shared"),
                reuse_write=ms.schedule_rule.ReuseType(req="must", levels=[3], scope="local"))
        out.append(rule)
    return out
