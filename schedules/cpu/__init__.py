"""CPU kernels (TVM's llvm target): x86 with AVX-512 VNNI, ARM with dot product and i8mm.

On a target with an integer dot-product instruction, the int8 graph is converted to NHWC and
its conv2d/matmul legalized onto weights packed for that instruction (packed_int8.py), so that
the innermost loop is the instruction. A float graph's convs go NHWC on every CPU; float and
depthwise convs get their weights HWIO (conv_weight_layout.py); a transposed conv whose
windows do not overlap becomes a 1x1 conv (conv_transpose.py). Default schedules tensorize
the packed kernels (int8_default.py), register-tile every other conv/matmul, vectorize pools
along the channels (windows.py) and run the rest row by row (float_default.py, rows.py);
MetaSchedule searches the int8 ones
in a space where every candidate builds (search_space.py). Exponentials, erf, tanh and the
activations made of them are computed in vector arithmetic (fast_math.py).
"""

from __future__ import annotations

import logging

from . import (conv_transpose, conv_weight_layout, fast_math, float_default, int8_default,
               search_space)
from .intrinsics import DotProduct, dot_product_for, register

log = logging.getLogger(__name__)


# The layouts of the packed int8 graph. ConvertLayout carries NHWC on to every op that takes
# it; TVM 0.27 lowers a conv2d_transpose only in NCHW, so it keeps NCHW (with a transpose on
# each side) rather than reach the VM unlowered.
PACKED_LAYOUTS = {"relax.nn.conv2d": ["NHWC", "OHWI"],
                  "relax.nn.conv2d_transpose": ["NCHW", "IOHW"]}


def fuse(mod, tvm_target, packed_layout: bool | None = None):
    """The model legalized to TIR and fused: the kernels that are tuned and then built.
    `packed_layout`: convert to NHWC (True), or never (False); None: when `mod` has an int8
    conv and the target a dot-product instruction, or only float convs (NHWC puts a depthwise
    conv's channels in the vector lanes: EfficientNet-Lite0's depthwise convs ran 6-10 GOPS in
    NCHW, 50-80 in NHWC, and the whole float model 2x faster)."""
    import tvm
    from tvm import relax
    from tvm.relax.backend.cpu_generic import library_dispatch_passes

    from .packed_int4 import repack
    from .packed_int8 import conv_weight_dtypes

    dot = dot_product_for(tvm_target)
    if packed_layout is None:
        weights = conv_weight_dtypes(mod)
        packed_layout = (dot is not None and "int8" in weights) or \
            (bool(weights) and all("float" in w for w in weights))
    with tvm_target:
        passes = [relax.transform.FoldConstant(),
                  tvm.transform.module_pass(lambda m, _ctx: conv_transpose.rewrite(m),
                                            opt_level=0, name="ConvTransposeAsConv"),
                  relax.transform.FoldConstant()]
        if packed_layout:
            passes += [relax.transform.ConvertLayout(PACKED_LAYOUTS),
                       relax.transform.FoldConstant(),
                       tvm.transform.module_pass(lambda m, _ctx: conv_weight_layout.rewrite(m),
                                                 opt_level=0, name="ConvWeightsHWIO"),
                       relax.transform.FoldConstant()]
        if dot is not None:
            passes.append(tvm.transform.module_pass(lambda m, _ctx: repack(m, dot),
                                                    opt_level=0, name="PackInt4Weights"))
        passes.append(tvm.transform.module_pass(lambda m, _ctx: fast_math.rewrite(m),
                                                opt_level=0, name="FastMath"))
        passes += library_dispatch_passes(tvm_target)
        passes += [relax.transform.LegalizeOps(
                       _legalize_map(dot, float_default.lanes_of(tvm_target))),
                   relax.transform.AnnotateTIROpPattern(),
                   relax.transform.FoldConstant(),
                   relax.transform.FuseOps(),
                   relax.transform.FuseTIR()]
        return tvm.transform.Sequential(passes)(mod)


def _legalize_map(dot, lanes: int):
    """LegalizeOps overrides: int8 conv2d/matmul packed for `dot` (if any), float matmuls and
    convs on weight panels of the vector tile's width for `lanes` (packed_float.py); TVM's
    own legalization for the rest."""
    from .packed_float import legalize_conv2d, legalize_matmul
    from .packed_int8 import default_legalize, legalize_map

    overrides = legalize_map(dot) if dot is not None else {}
    int8_matmul = overrides.get("relax.matmul", default_legalize)
    int8_conv2d = overrides.get("relax.nn.conv2d", default_legalize)
    overrides["relax.matmul"] = lambda bb, call: legalize_matmul(bb, call, int8_matmul, lanes)
    overrides["relax.nn.conv2d"] = lambda bb, call: legalize_conv2d(bb, call, int8_conv2d,
                                                                    lanes)
    return overrides


def apply(mod, tvm_target):
    """Our default schedule for every kernel without one: the packed int8 kernels, then the
    rest. (Call inside `with tvm_target:`.)"""
    dot = dot_product_for(tvm_target)
    if dot is not None:
        mod = int8_default.apply(mod, dot)
    return float_default.apply(mod, float_default.lanes_of(tvm_target))


def default(kernel, tvm_target):
    """The Schedule `apply` gives the kernel (an IRModule with "main"), or None when it has
    none worth measuring (no conv/matmul block to tile)."""
    func = kernel["main"]
    dot = dot_product_for(tvm_target)
    if dot is not None:
        register()  # the int8 default tensorizes with our intrinsics
        sch = int8_default.schedule(func, dot)
        if sch is not None:
            return sch
    found = float_default.schedule(func, float_default.lanes_of(tvm_target))
    return found[0] if found is not None and found[1] == "float" else None


def space(kernel, tvm_target):
    return search_space.space(kernel, tvm_target)


def finalize(mod, tvm_target):
    """TVM's passes from scheduled kernels to the VM's code. RewriteDataflowReshape (a kernel
    that only reshapes becomes a view) fails inside TVM on some kernels of lengths known only
    at run time (its index analysis cannot prove a division); the module is then finalized
    without it: those reshapes stay copies."""
    import tvm
    from tvm.relax.backend.cpu_generic.pipeline import dataflow_lower_passes, finalize_passes

    from ...tvm_noise import quiet

    with tvm_target:
        passes = dataflow_lower_passes(tvm_target) + finalize_passes(tvm_target)
        try:
            with quiet():  # a failed pass leaves TVM's builder warning behind
                return tvm.transform.Sequential(passes)(mod)
        except tvm.error.InternalError as exc:
            if "RewriteDataflowReshape" not in str(exc):
                raise
            log.info("reshape kernels stay copies: TVM's RewriteDataflowReshape failed on "
                     "this module (%s)", str(exc).strip().splitlines()[0][:160])
        return tvm.transform.Sequential([p for p in passes if
                                         p.info.name != "RewriteDataflowReshape"])(mod)


def check(executable) -> None:
    """No known code-generation defect to refuse on the CPU."""


def schedule_counts(attrs) -> dict[str, int]:
    """How many kernels (their attrs) have our default schedules, by kind."""
    from .. import SCHEDULE_ATTR

    return {"int8_default_schedules": sum(1 for a in attrs
                                          if a.get(SCHEDULE_ATTR) == int8_default.PACKED),
            "float_default_schedules": sum(1 for a in attrs if a.get(SCHEDULE_ATTR) in
                                           float_default.KINDS)}


__all__ = ["DotProduct", "apply", "check", "default", "dot_product_for", "finalize", "fuse",
           "schedule_counts", "space"]
