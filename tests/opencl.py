"""Check the OpenCL kernels of a GPU build on this machine's CPU, through pocl (qcompile.devices.pocl:
the TVM wheel has no OpenCL runtime, and this machine has no GPU). Each kernel of a GPU build is
checked on its own: the scheduled kernel (thread bindings, shared and local memory, unrolling:
what a schedule can get wrong) runs on pocl, and the same kernel before scheduling, compiled
for the CPU with LLVM, gives the expected values, from the same random contents of every buffer.

pocl's CPU device has no `cl_khr_fp16`: fp16 kernels run with `half` widened to `float` (their
buffers in float32 too), so their schedule is checked, not their fp16 rounding; the expected
values come from the fp16 kernel on the CPU, and the comparison allows fp16's precision.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qcompile.devices.pocl import SIGNATURE, Program, describe, random_arrays


@dataclass
class KernelCheck:
    name: str
    kernels: int                 # OpenCL kernels the function became
    integer_error: int | None    # the largest difference in an integer buffer (None: none)
    float_error: float | None    # the largest difference in a float buffer, relative to its
                                 # largest expected value (None: none)


def opencl_source(func, device: str) -> str:
    """The OpenCL C of one scheduled kernel function."""
    import tvm

    target = tvm.target.Target({"kind": "opencl", "device": device}, host={"kind": "llvm"})
    executable = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}),
                             target=target)
    return executable.mod.imports[0].inspect_source()


def random_buffers(func, seed: int) -> dict[str, np.ndarray]:
    """Random contents for every buffer parameter of `func`, by name."""
    return random_arrays([(p.name, [int(d) for d in p.shape], str(p.dtype))
                          for p in func.params], seed)


def run_on_cpu(func, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every buffer after `func` (unscheduled) ran on the CPU, compiled with LLVM."""
    import tvm

    func = func.with_attr("global_symbol", "main")
    if func.attrs is not None and "target" in func.attrs:
        func = func.without_attr("target")
    executable = tvm.compile(tvm.IRModule({"main": func}), target=tvm.target.Target("llvm"))
    names = [p.name for p in func.params]
    tensors = [tvm.runtime.tensor(arrays[n].copy(), tvm.cpu()) for n in names]
    executable["main"](*tensors)
    return {n: t.numpy() for n, t in zip(names, tensors)}


def check_kernel(name: str, fused, scheduled, device: str, seed: int = 0) -> KernelCheck:
    """Run kernel `name` of a GPU build on pocl and compare it with the CPU."""
    source = opencl_source(scheduled, device)
    arrays = random_buffers(fused, seed)
    want = run_on_cpu(fused, arrays)
    got = Program(source, describe(scheduled)).run(arrays)
    integer_error, float_error = None, None
    for buffer, expected in want.items():
        actual = got[buffer]
        if expected.dtype.kind in "iu":
            error = int(np.abs(expected.astype(np.int64) - actual.astype(np.int64)).max())
            integer_error = max(integer_error or 0, error)
        else:
            expected = expected.astype(np.float32)
            scale = float(np.abs(expected).max()) or 1.0
            error = float(np.abs(expected - actual).max()) / scale
            float_error = max(float_error or 0.0, error)
    return KernelCheck(name, len(SIGNATURE.findall(source)), integer_error, float_error)
