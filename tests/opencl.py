"""Run the OpenCL kernels of a GPU build on this machine's CPU, through pocl.

The TVM wheel has no OpenCL runtime, and this machine has no GPU. But the OpenCL C that TVM
generates for a kernel is plain OpenCL: pocl (`pocl-binary-distribution` on PyPI, an OpenCL
implementation for CPUs) compiles and runs it through `pyopencl`. Each kernel of a GPU build is
checked on its own: the scheduled kernel (thread bindings, shared and local memory, unrolling:
what a schedule can get wrong) runs on pocl, and the same kernel before scheduling, compiled
for the CPU with LLVM, gives the expected values, from the same random contents of every buffer.

pocl's CPU device has no `cl_khr_fp16`: fp16 kernels run with `half` widened to `float` (their
buffers in float32 too), so their schedule is checked, not their fp16 rounding; the expected
values come from the fp16 kernel on the CPU, and the comparison allows fp16's precision.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

SIGNATURE = re.compile(r"__kernel void (\w+)\(([^)]*)\)\s*\{")
POINTER = re.compile(r"__global (?:\w+ )*?(\w+)\* restrict (\w+)_ptr$")


@dataclass
class KernelCheck:
    name: str
    kernels: int                 # OpenCL kernels the function became
    integer_error: int | None    # the largest difference in an integer buffer (None: none)
    float_error: float | None    # the largest difference in a float buffer, relative to its
                                 # largest expected value (None: none)


def launches(func) -> list[dict[str, int]]:
    """{thread tag: extent} of each kernel `func` launches, in program order: a kernel is an
    outermost thread-bound loop and the thread-bound loops inside it."""
    import tvm
    from tvm import tirx
    from tvm.s_tir import Schedule

    sch = Schedule(tvm.IRModule({"main": func}))
    kernels: list[tuple[object, dict[str, int]]] = []

    def walk(block):
        loops = [sch.get(loop) for loop in sch.get_loops(block)]
        bound = [loop for loop in loops if loop.kind == tirx.ForKind.THREAD_BINDING]
        if not bound:
            for child in sch.get_child_blocks(block):
                walk(child)
            return
        for outer, tags in kernels:
            if outer.same_as(bound[0]):
                break
        else:
            tags = {}
            kernels.append((bound[0], tags))
        for loop in bound:
            tags[loop.thread_binding.thread_tag] = int(loop.extent)

    for child in sch.get_child_blocks(sch.get_sblock("root")):
        walk(child)
    return [tags for _, tags in kernels]


def opencl_source(func, device: str) -> str:
    """The OpenCL C of one scheduled kernel function."""
    import tvm

    target = tvm.target.Target({"kind": "opencl", "device": device}, host={"kind": "llvm"})
    executable = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}),
                             target=target)
    return executable.mod.imports[0].inspect_source()


def random_buffers(func, seed: int) -> dict[str, np.ndarray]:
    """Random contents for every buffer parameter of `func`, by name: integers over their
    whole range (int32 within +-2000, as biases are), floats standard normal."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for param in func.params:
        shape = [int(d) for d in param.shape]
        dtype = str(param.dtype)
        if dtype in ("int8", "uint8"):
            info = np.iinfo(dtype)
            arrays[param.name] = rng.integers(info.min, info.max + 1, shape).astype(dtype)
        elif dtype.startswith(("int", "uint")):
            arrays[param.name] = rng.integers(-2000, 2000, shape).astype(dtype)
        else:
            arrays[param.name] = rng.standard_normal(shape).astype(dtype)
    return arrays


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


def run_on_pocl(func, source: str, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every buffer after the scheduled `func`'s OpenCL kernels ran on pocl, in order."""
    import pyopencl as cl

    if "cl_khr_fp16" in source:
        source = _widen_half(source)
    context = cl.Context(cl.get_platforms()[0].get_devices())
    queue = cl.CommandQueue(context)
    program = cl.Program(context, source).build()
    host = {n: (a.astype(np.float32) if a.dtype == np.float16 else a) for n, a in arrays.items()}
    flags = cl.mem_flags.READ_WRITE | cl.mem_flags.COPY_HOST_PTR
    buffers = {n: cl.Buffer(context, flags, hostbuf=np.ascontiguousarray(a))
               for n, a in host.items()}
    kernels = SIGNATURE.findall(source)
    nests = launches(func)
    assert len(kernels) == len(nests), \
        f"{len(kernels)} OpenCL kernels but {len(nests)} thread-bound loop nests"
    for (name, params), tags in zip(kernels, nests):
        kernel = getattr(program, name)
        args = []
        for param in params.split(","):
            match = POINTER.match(param.strip())
            assert match and match.group(2) in buffers, \
                f"kernel {name}: no buffer for its parameter '{param.strip()}'"
            args.append(buffers[match.group(2)])
        kernel.set_args(*args)
        local = tuple(tags.get(f"threadIdx.{axis}", 1) for axis in "xyz")
        grid = tuple(tags.get(f"blockIdx.{axis}", 1) * local[i] for i, axis in enumerate("xyz"))
        cl.enqueue_nd_range_kernel(queue, kernel, grid, local)
    results = {}
    for n, a in host.items():
        results[n] = np.empty_like(a)
        cl.enqueue_copy(queue, results[n], buffers[n])
    queue.finish()
    return results


def _widen_half(source: str) -> str:
    """fp16 OpenCL C with `half` as `float` (and without its check for cl_khr_fp16)."""
    source = re.sub(r"#ifdef cl_khr_fp16\n.*?#endif\n", "", source, flags=re.S)
    source = re.sub(r"\bconvert_half(\d*)", r"convert_float\1", source)
    return re.sub(r"\bhalf(\d*)\b", r"float\1", source)


def check_kernel(name: str, fused, scheduled, device: str, seed: int = 0) -> KernelCheck:
    """Run kernel `name` of a GPU build on pocl and compare it with the CPU."""
    source = opencl_source(scheduled, device)
    arrays = random_buffers(fused, seed)
    want = run_on_cpu(fused, arrays)
    got = run_on_pocl(scheduled, source, arrays)
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
