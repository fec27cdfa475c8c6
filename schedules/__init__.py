"""qcompile's schedules and tensor intrinsics, one package per target kind (installed as
`qcompile.schedules`).

Each kind's package has the same face; `qcompile.lower` picks the package by the target's kind
and is the only module that does, so that nothing else branches on it:

    fuse(mod, tvm_target, packed_layout)  Relax -> its fused, unscheduled TIR kernels
    apply(mod, tvm_target)                our default schedule for every kernel without one
    default(kernel, tvm_target)           one kernel's default Schedule (or None)
    space(kernel, tvm_target)             the space MetaSchedule tunes the kernel in
    finalize(mod, tvm_target)             the lowering after scheduling
    check(executable)                     refuse code with a known code-generation defect

- `cpu/`: int8 conv/matmul on weights packed for the CPU's dot-product instruction (VNNI
  `vpdpbusd`, ARM `sdot`, and `smmla` through our intrinsic), default schedules for those and
  for every other kernel, and the int8 search space;
- `opencl/`: dlight's GPU rules minus the ones that compute wrong results, and the int8
  search space (Mali, Adreno).
"""

from __future__ import annotations

# The attribute our default schedules set on a kernel: its value says which (the manifest
# counts them); a kernel that has it, or TVM's "tirx.is_scheduled", is not scheduled again.
SCHEDULE_ATTR = "qcompile.default_schedule"


def visit_relax_functions(mod, visit) -> None:
    """Call `visit` on every expression of each of `mod`'s Relax functions (post order)."""
    from tvm import relax

    for _, func in mod.functions.items():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func, visit)


def rewrite_relax_functions(mod, rewriter):
    """`mod` with each of its Relax functions visited by `rewriter` (a relax.PyExprMutator
    made on `mod`)."""
    from tvm import relax

    for gvar, func in mod.functions.items():
        if isinstance(func, relax.Function):
            rewriter.builder_.update_func(gvar, rewriter.visit_expr(func))
    return rewriter.builder_.get()
