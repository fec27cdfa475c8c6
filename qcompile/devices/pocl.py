"""TVM's OpenCL kernels run without a GPU: on pocl, an OpenCL implementation for CPUs.

The TVM wheel has no OpenCL runtime and a build machine has no phone GPU, but the OpenCL C that
TVM generates for a kernel is plain OpenCL: pocl (`pocl-binary-distribution` on PyPI) compiles
and runs it through `pyopencl` (`pip install "qcompile[pocl]"`). A kernel function becomes one
or more OpenCL kernels, launched in program order with the grid and work-group sizes of its
thread-bound loops (`launches`).

Two uses: the tests check every kernel of a GPU build against the CPU, and `qcompile tune
--target mali --pocl` measures GPU candidates here (`Runner`), which runs the whole GPU tuning
flow (search, OpenCL build, measurement, tuning log, compile with the log) without a phone.
pocl's timings rank candidates for this CPU, not for the phone's GPU; a log measured on pocl
says so.

pocl's CPU device has no `cl_khr_fp16`: fp16 kernels run with `half` widened to `float`.
"""

from __future__ import annotations

import json
import logging
import re
import time
from pathlib import Path

import numpy as np

from ..errors import DeviceError
from .base import Device

SIGNATURE = re.compile(r"__kernel void (\w+)\(([^)]*)\)\s*\{")
POINTER = re.compile(r"__global (?:\w+ )*?(\w+)\* restrict (\w+)_ptr$")
SOURCE_FILE = "kernel.cl"        # beside a built GPU candidate: its OpenCL C
LAUNCHES_FILE = "launches.json"  # its parameters' names and its kernels' launch sizes


PROBE = "__kernel void probe(__global float* a) { a[get_global_id(0)] += 1.0f; }"


def available() -> str | None:
    """None when pocl can run kernels here; else why not, and what to install."""
    return _device()[1]


def _device():
    """(the first OpenCL device that builds a kernel, None), or (None, why none does).

    pocl-binary-distribution (PyPI) ships pocl 3.0 on LLVM 14, which does not know CPUs newer
    than it (AMD Zen 5, for one): it names them 'generic', and every build fails with
    "unknown target CPU 'generic'". Debian's pocl (pocl-opencl-icd) picks the nearest CPU it
    knows; pyopencl's loader lists it too, so the device that builds the probe is used."""
    try:
        import pyopencl as cl

        devices = [d for p in cl.get_platforms() for d in p.get_devices()]
    except Exception as exc:  # noqa: BLE001 - ImportError, or no OpenCL platform at all
        return None, (f"pocl is not usable here ({type(exc).__name__}: {exc}). Install it "
                      "with `pip install pyopencl pocl-binary-distribution` (or "
                      "qcompile[pocl]).")
    if not devices:
        return None, "pyopencl finds no OpenCL device. Install `pocl-binary-distribution`."
    failures = []
    for device in devices:
        if device.int_ptr not in _PROBED:
            _PROBED[device.int_ptr] = _probe(cl, device)
        if _PROBED[device.int_ptr] is None:
            return device, None
        failures.append(f"{device.platform.version.strip()} on {device.name}: "
                        f"{_PROBED[device.int_ptr]}")
    return None, ("No OpenCL device here builds a kernel (" + "; ".join(failures) + "). "
                  "pocl from PyPI (LLVM 14) does not know CPUs newer than 2022: install "
                  "Debian's pocl as well (`apt-get install pocl-opencl-icd`).")


_PROBED: dict[int, str | None] = {}  # device -> why it cannot build the probe (None: it can)


def _probe(cl, device) -> str | None:
    """None when `device` builds PROBE, else the compiler's error."""
    try:
        cl.Program(cl.Context([device]), PROBE).build()
        return None
    except Exception as exc:  # noqa: BLE001 - this device's compiler fails: try the next
        lines = str(exc).splitlines()
        return next((line.strip() for line in lines
                     if "error" in line.lower() and "clBuildProgram" not in line),
                    lines[0] if lines else type(exc).__name__)


def launches(func) -> list[dict[str, int]]:
    """{thread tag: extent} of each kernel the scheduled PrimFunc `func` launches, in program
    order: a kernel is an outermost thread-bound loop and the thread-bound loops inside it."""
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


def workspaces(func) -> list[tuple[str, list[int], str]]:
    """(name, shape, dtype) of the global buffers the scheduled `func` allocates: passed from
    one of its OpenCL kernels to the next (the host code allocates them)."""
    import tvm
    from tvm.s_tir import Schedule

    sch = Schedule(tvm.IRModule({"main": func}))
    found = []

    def walk(block):
        for buffer in sch.get(block).alloc_buffers:
            if buffer.scope() == "global":
                found.append((buffer.name, [int(d) for d in buffer.shape], str(buffer.dtype)))
        for child in sch.get_child_blocks(block):
            walk(child)

    walk(sch.get_sblock("root"))
    return found


def describe(func) -> dict:
    """What `Program` needs besides the OpenCL C to run the scheduled kernel function `func`."""
    return {"params": [p.name for p in func.params], "kernels": launches(func),
            "workspaces": workspaces(func)}


def write_candidate(directory: Path, source: str, scheduled_func) -> None:
    """Keep what `Program` needs beside a built GPU candidate: its OpenCL C `source` and
    describe(scheduled_func)."""
    directory = Path(directory)
    (directory / SOURCE_FILE).write_text(source)
    (directory / LAUNCHES_FILE).write_text(json.dumps(describe(scheduled_func)))


class Program:
    """The OpenCL kernels of one TVM kernel function, built for pocl."""

    def __init__(self, source: str, info: dict):
        import pyopencl as cl

        self.params = info["params"]  # the function's buffer parameters, in order
        self.workspaces = info["workspaces"]
        nests = info["kernels"]
        if "cl_khr_fp16" in source:
            source = _widen_half(source)
        self.kernels = SIGNATURE.findall(source)
        if len(self.kernels) != len(nests):
            raise ValueError(f"{len(self.kernels)} OpenCL kernels but {len(nests)} "
                             "thread-bound loop nests")
        self.nests = nests
        device, why = _device()
        if device is None:
            raise DeviceError(why)
        self.context = cl.Context([device])
        self.queue = cl.CommandQueue(self.context)
        self.program = cl.Program(self.context, source).build()
        self.handles = [cl.Kernel(self.program, name) for name, _ in self.kernels]

    @classmethod
    def of_candidate(cls, directory: str | Path) -> "Program":
        directory = Path(directory)
        return cls((directory / SOURCE_FILE).read_text(),
                   json.loads((directory / LAUNCHES_FILE).read_text()))

    def _buffers(self, arrays: dict[str, np.ndarray]) -> dict:
        import pyopencl as cl

        flags = cl.mem_flags.READ_WRITE | cl.mem_flags.COPY_HOST_PTR
        buffers = {n: cl.Buffer(self.context, flags, hostbuf=np.ascontiguousarray(a))
                   for n, a in arrays.items()}
        for name, shape, dtype in self.workspaces:
            size = int(np.prod(shape)) * np.dtype("float32" if dtype == "float16"
                                                  else dtype).itemsize
            buffers[name] = cl.Buffer(self.context, cl.mem_flags.READ_WRITE, max(size, 1))
        return buffers

    def _launch_all(self, buffers: dict) -> None:
        import pyopencl as cl

        for (name, params), tags, kernel in zip(self.kernels, self.nests, self.handles):
            args = []
            for param in params.split(","):
                match = POINTER.match(param.strip())
                if not match or match.group(2) not in buffers:
                    raise ValueError(f"kernel {name}: no buffer for its parameter "
                                     f"'{param.strip()}'")
                args.append(buffers[match.group(2)])
            kernel.set_args(*args)
            local = tuple(tags.get(f"threadIdx.{axis}", 1) for axis in "xyz")
            grid = tuple(tags.get(f"blockIdx.{axis}", 1) * local[i]
                         for i, axis in enumerate("xyz"))
            cl.enqueue_nd_range_kernel(self.queue, kernel, grid, local)

    def run(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Every buffer (by parameter name) after the kernels ran once, in order."""
        import pyopencl as cl

        host = _widened(arrays)
        buffers = self._buffers(host)
        self._launch_all(buffers)
        results = {}
        for n, a in host.items():
            results[n] = np.empty_like(a)
            cl.enqueue_copy(self.queue, results[n], buffers[n])
        self.queue.finish()
        return results

    def time(self, arrays: dict[str, np.ndarray], number: int, repeat: int) -> list[float]:
        """Mean seconds of one run of all the kernels, `repeat` times over `number` runs."""
        buffers = self._buffers(_widened(arrays))
        self._launch_all(buffers)  # warm-up: pocl compiles the kernels for the work-group size
        self.queue.finish()
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            for _ in range(number):
                self._launch_all(buffers)
            self.queue.finish()
            times.append((time.perf_counter() - start) / number)
        return times


def _widened(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """fp16 arrays as float32, as the kernels run with `half` widened (_widen_half)."""
    return {n: (a.astype(np.float32) if a.dtype == np.float16 else a) for n, a in arrays.items()}


def random_arrays(params, seed: int) -> dict[str, np.ndarray]:
    """Random contents for buffers [(name, shape, dtype)]: integers over their whole range
    (int32 within +-2000, as biases are), floats standard normal."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for name, shape, dtype in params:
        if dtype in ("int8", "uint8"):
            info = np.iinfo(dtype)
            arrays[name] = rng.integers(info.min, info.max + 1, shape).astype(dtype)
        elif dtype.startswith(("int", "uint")):
            arrays[name] = rng.integers(-2000, 2000, shape).astype(dtype)
        else:
            arrays[name] = rng.standard_normal(shape).astype(dtype)
    return arrays


def _widen_half(source: str) -> str:
    """fp16 OpenCL C with `half` as `float` (and without its check for cl_khr_fp16)."""
    source = re.sub(r"#ifdef cl_khr_fp16\n.*?#endif\n", "", source, flags=re.S)
    source = re.sub(r"\bconvert_half(\d*)", r"convert_float\1", source)
    return re.sub(r"\bhalf(\d*)\b", r"float\1", source)


def runner(number: int = 3, repeat: int = 1):
    """A MetaSchedule runner measuring GPU candidates on pocl, one after the other. The
    candidates must come from measure.builder (which keeps their OpenCL C and launches)."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir import meta_schedule as ms

    why = available()
    if why is not None:
        raise DeviceError(why)
    # pyopencl logs every program build that takes over half a second: each candidate's
    logging.getLogger("pyopencl").setLevel(logging.WARNING)

    @derived_object
    class Done(ms.runner.PyRunnerFuture):
        def __init__(self, result) -> None:
            super().__init__()
            self._result = result

        def done(self) -> bool:
            return True

        def result(self):
            return self._result

    @derived_object
    class PoclRunner(ms.runner.PyRunner):
        def run(self, runner_inputs):
            futures = []
            for item in runner_inputs:
                try:
                    program = Program.of_candidate(Path(item.artifact_path).parent)
                    params = [(name, [int(d) for d in info.shape], str(info.dtype))
                              for name, info in zip(program.params, item.args_info)]
                    seconds = program.time(random_arrays(params, 0), number, repeat)
                    result = ms.runner.RunnerResult(run_secs=seconds, error_msg=None)
                except Exception as exc:  # noqa: BLE001 - a failed candidate is a record
                    result = ms.runner.RunnerResult(
                        run_secs=None, error_msg=f"pocl: {type(exc).__name__}: {exc}")
                futures.append(Done(result))
            return futures

    return PoclRunner()



class PoclDevice(Device):
    """pocl on this machine's CPU, standing in for a phone's GPU: OpenCL kernels measured
    (timings that rank schedules for a CPU, not the GPU's); it runs kernels, not models."""

    where = "pocl (OpenCL on this CPU)"
    emulated = True
    stand_in = True

    def __init__(self) -> None:
        why = available()
        if why is not None:
            raise DeviceError(why)

    def runner(self):
        evaluator = self.evaluator()
        return runner(number=evaluator.number, repeat=evaluator.repeat)

    def load(self, directory):
        raise DeviceError("pocl measures single OpenCL kernels; it cannot run a whole model. "
                          "Run the model on a device with OpenCL through --rpc-tracker.")
