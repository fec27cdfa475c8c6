"""Default schedules for OpenCL GPU targets (Mali, Adreno): TVM's dlight rules, minus the two
found to compute wrong results.

TVM's default GPU pipelines schedule each fused kernel with the first dlight rule that applies:
`gpu.Matmul, gpu.GEMV, gpu.Reduction, gpu.GeneralReduction, gpu.Fallback` (generic OpenCL), or
the Adreno texture rules then `gpu.Reduction, gpu.GeneralReduction, gpu.Fallback` (Adreno).

`gpu.Reduction` is left out here. Run on an OpenCL device (pocl on the CPU, in the tests), its
schedule of a grouped 1x1 conv (TVM 0.27.0.post1: `group_conv2d_nchw` with 4 input channels per
group, plus the fused requantize epilogue) returns wrong values in most outputs, in fp32 and
int8 alike (max error 85-96% of the largest output): its cross-thread partial sums live in
`local` memory and are read back across threads, and the write-back recovers the output index
from a different fusion of the spatial loops. `gpu.GeneralReduction` schedules the same kernels
correctly. `tests/test_gpu_kernels.py` runs every kernel of the test models on pocl against the
same kernel compiled for the CPU, so a rule that breaks is caught.

Adreno keeps TVM's choice of no `gpu.Matmul` and `gpu.GEMV`. Measured on pocl: with
Adreno's configuration, `gpu.Matmul` schedules 21 of EfficientNet-Lite0's 50 int8 kernels into
wrong results (whole int8 ranges off) and one into OpenCL that does not compile. It vectorizes
the int8 weight reads as 8-lane gathers, and TVM's OpenCL code generator assembles a gathered
`char8` by shifting its 8 bytes into one 32-bit int, losing half of them. With Mali's (generic)
configuration the same kernels are correct. So int8 convs and matmuls on Adreno get
`gpu.GeneralReduction` or `gpu.Fallback` (correct, not fast).
"""

from __future__ import annotations

import logging
import re

log = logging.getLogger(__name__)

SCHEDULE = "dlight"  # the manifest's name for these schedules
# What TVM 0.27's OpenCL code generator emits for an int8 vector gathered from non-contiguous
# addresses: its bytes shifted into one 32-bit int (CUDA's representation of char4). OpenCL C
# has real char vectors, so storing that int as one (vstore2/3/8) gives the lanes wrong values.
PACKED_INT8_GATHER = "(0x000000ff << "


def rules(tvm_target) -> list:
    """The dlight rules for `tvm_target`, in the order they are tried."""
    from tvm.s_tir import dlight as dl

    if "adreno" in tvm_target.keys:
        return [dl.adreno.Conv2d(), dl.adreno.LayoutTransform(), dl.adreno.Pool2D(),
                dl.gpu.GeneralReduction(), dl.gpu.Fallback()]
    return [dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.GeneralReduction(), dl.gpu.Fallback()]


def apply(mod, tvm_target):
    """`mod` with each unscheduled kernel (one that no tuning record scheduled) scheduled by
    the first rule that applies; `mod` itself is left as it was. A rule that fails on a kernel
    counts as not applying (TVM 0.27's `gpu.Matmul` asserts on some fused int8 convs of
    EfficientNet-Lite0: "There are some consumers of the cache-write stage that are not
    properly inlined"); a kernel that no rule schedules is an error naming it."""
    import tvm

    from ...relax_main import module_copy
    from .. import SCHEDULE_ATTR

    scheduled = module_copy(mod)
    for gvar, func in mod.functions.items():
        if not isinstance(func, tvm.tirx.PrimFunc) or \
                (func.attrs is not None and "tirx.is_scheduled" in func.attrs):
            continue
        scheduled[gvar] = schedule(func, tvm_target, gvar.name_hint).mod["main"] \
            .with_attr("tirx.is_scheduled", True).with_attr(SCHEDULE_ATTR, SCHEDULE)
    return scheduled


def codegen_defect(source: str) -> str | None:
    """Why the OpenCL C `source` computes wrong results (None: no known defect). Seen in
    MetaSchedule's GPU candidates for int8 convs (their shared-memory fetches of the padded
    input are vectorized gathers) and in dlight's gpu.Matmul with Adreno's configuration."""
    if PACKED_INT8_GATHER in source:
        kernels = sorted(set(re.findall(r"__kernel void (\w+)\(", source)))
        return ("TVM's OpenCL code generator packs a gathered int8 vector into one int, which "
                f"gives wrong values (kernels: {', '.join(kernels)})")
    return None


def schedule(func, tvm_target, name: str = "main"):
    """The tir Schedule of the kernel `func` by the first dlight rule that applies (what
    compile gives a GPU kernel without a tuning record; the tuner measures it as the kernel's
    first candidate). RuntimeError naming the kernel when no rule applies."""
    from ...errors import last_line

    failures = []
    for rule in rules(tvm_target):
        try:
            space = rule.apply(func, tvm_target, False)
        except Exception as exc:  # noqa: BLE001 - one rule's bug is not the build's
            why = last_line(str(exc), type(exc).__name__)[:200]
            failures.append(f"{type(rule).__name__}: {why}")
            log.debug("kernel %s: dlight rule %s failed; trying the next rule", name,
                      failures[-1])
            continue
        if space is None:
            continue
        return space[0] if isinstance(space, list) else space
    raise RuntimeError(f"No GPU schedule for kernel {name}: no dlight rule applies"
                       + (f" ({'; '.join(failures)})" if failures else ""))
