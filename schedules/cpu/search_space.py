"""The search space MetaSchedule tunes a CPU kernel in.

A kernel with a conv/matmul packed for an integer dot product (packed_int8.py) is searched in
the target's default space (x86: VNNI, ARM: sdot/udot tensorization) with two changes; every
other kernel in the default space itself.

- The loop directly around a tensorized block stays serial. MetaSchedule's vectorize
  postprocessor may pick the innermost spatial loop around it, and TVM's vectorizer cannot
  widen the intrinsic's vector operands: the build aborts ("Cannot broadcast lanes=4 ... to
  16", "VectorizeLoop before LiftStorageAlloc"). Sampled on a 3x3 int8 conv, 12 candidates per
  space: TVM's default space built 4 for arm64-dotprod (sdot) and 7 for the host (VNNI); this
  one 12 and 12 (on the host, each computing the unscheduled kernel's integers). An
  annotation on that loop keeps the postprocessor off it (the intrinsic is the vector code
  already).
- Kernels packed for an instruction TVM's default space does not know get MetaSchedule's
  multi-level tiling with our intrinsic for it (intrinsics.py): smmla (arm64-i8mm), 2 output
  pixels (or matmul rows) x 2 packed output channels x 8 reduction bytes per instruction, and
  AVX2's vpmaddubsw pairs (x86 without VNNI), the 16 x 4 block of VNNI's. smmla's
  accumulator is 2 x 2, and the tensorize postprocessor can vectorize only a one-loop
  zeroing: the zeroing stays scalar (4 stores per block, once per reduction).
"""

from __future__ import annotations

import functools

SERIAL_ANNOTATION = "qcompile.serial_around_intrinsic"


def packed_for(func, tvm_target):
    """The dot product (intrinsics.DotProduct) the kernel `func` (a PrimFunc, or a tuning
    task's IRModule) has a conv/matmul packed for on `tvm_target`, or None."""
    import tvm

    from .int8_default import packed_block
    from .intrinsics import dot_product_for

    dot = dot_product_for(tvm_target)
    if dot is None:
        return None
    if isinstance(func, tvm.tirx.PrimFunc):
        func = tvm.IRModule({"main": func})
    sch = tvm.s_tir.Schedule(func)
    for gvar, f in func.functions.items():
        if isinstance(f, tvm.tirx.PrimFunc):
            sch.work_on(gvar.name_hint)
            chosen = packed_block(sch, dot)[2]
            if chosen is not None:
                return chosen
    return None


def space(func, tvm_target):
    """The space generator to tune `func` in on the CPU target `tvm_target`: anything
    MetaSchedule's TuneContext takes as space_generator."""
    dot = packed_for(func, tvm_target)
    if dot is None:
        return "post-order-apply"
    return tensorized_space(tvm_target, dot)


def tensorized_space(tvm_target, dot=None):
    """The target's default space, with the loop around a tensorized block kept serial, and
    for a kernel packed for smmla or AVX2 (`dot`) tensorization with our intrinsic tried
    first."""
    import tvm
    from tvm.s_tir import meta_schedule as ms

    from .intrinsics import AVX2, SMMLA, register

    smmla = dot is SMMLA

    register()
    # The target's defaults (TVM picks ARM's by the target's features), read off a space
    # initialized for it; cloned, since the new space initializes them again.
    probe = ms.TuneContext(mod=tvm.IRModule({"main": _empty()}), target=tvm_target,
                           space_generator="post-order-apply", task_name="defaults")
    defaults = probe.space_generator
    rules = [rule.clone() for rule in defaults.sch_rules]
    tiling = [i for i, rule in enumerate(rules)
              if type(rule).__name__ in ("MultiLevelTilingWithIntrin", "MultiLevelTiling")]
    rules.insert(tiling[-1] + 1, SerialAroundIntrinsic())
    if dot in (SMMLA, AVX2):
        rules.insert(tiling[0], ms.schedule_rule.MultiLevelTilingWithIntrin(
            dot.intrin, structure="SSRSRS", max_innermost_factor=32 if smmla else 64))
    postprocs = [ms.postproc.RewriteTensorize(vectorize_init_loop=not smmla)
                 if type(p).__name__ == "RewriteTensorize" else p.clone()
                 for p in defaults.postprocs]
    if not any(type(p).__name__ == "RewriteTensorize" for p in postprocs):
        # x86 without VNNI: TVM's space tensorizes nothing, and has no postprocessor for it
        after = [i for i, p in enumerate(postprocs)
                 if type(p).__name__ == "RewriteReductionBlock"]
        postprocs.insert(after[0] + 1 if after else len(postprocs),
                         ms.postproc.RewriteTensorize(vectorize_init_loop=True))
    mutators = {m.clone(): p for m, p in defaults.mutator_probs.items()}
    return ms.space_generator.PostOrderApply(sch_rules=rules, postprocs=postprocs,
                                             mutator_probs=mutators)


def _empty():
    """A trivial kernel, to initialize a space for a target (its rules do not depend on it)."""
    from tvm import te

    a = te.placeholder((1,), "int8", name="a")
    return te.create_prim_func([a, te.compute((1,), lambda i: a[i], name="b")])


@functools.cache
def _serial_rule_class():
    from tvm.ir.utils import derived_object
    from tvm.s_tir import meta_schedule as ms

    @derived_object
    class SerialAroundIntrinsic(ms.schedule_rule.PyScheduleRule):
        """Annotates the loop directly around each block that multi-level tiling marked for
        tensorizing, so that the vectorize postprocessor leaves it alone."""

        def _initialize_with_tune_context(self, context) -> None:
            pass

        def apply(self, sch, block):
            for child in sch.get_child_blocks(sch.get_sblock("root")):
                if "meta_schedule.auto_tensorize" in sch.get(child).annotations:
                    loops = sch.get_loops(child)
                    if loops and SERIAL_ANNOTATION not in sch.get(loops[-1]).annotations:
                        sch.annotate(loops[-1], SERIAL_ANNOTATION, 1)
            return [sch]

        def clone(self):
            return SerialAroundIntrinsic()

    return SerialAroundIntrinsic


def SerialAroundIntrinsic():  # noqa: N802  (a rule object; its class needs TVM, made lazily)
    return _serial_rule_class()()
