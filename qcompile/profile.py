"""`qcompile profile`: where a compiled model's time goes, kernel by kernel.

TVM 0.27's Relax VM has no profiler (no `profile=True`, no `tvm.runtime.profiling`), so the
kernels are timed here. The VM's instrument hook is called before every call the VM makes; for
each kernel call (a fused PrimFunc of the library) it times the kernel with the runtime's time
evaluator on the very arguments the call is about to get (the model's own intermediate tensors
for the given inputs), then lets the call run. A call's time is the median of `repeat`
repeats, each of back-to-back calls filling at least 1 ms: steady state, caches warm. Then the
model runs `repeat` more times with a hook that only reads the clock before and after each
kernel call: each kernel's time "in the model", where its weights and inputs come from
wherever the previous kernels left them (a layer whose weight no longer is in the core's
cache can take twice its warm time: EfficientNet-Lite0's late 1x1 convs in fp32 did, before
their weights were packed in panels). That time includes the hook's own call (a few
microseconds). The whole model is also timed as `qcompile run` times it; what it takes beyond
the in-model times' sum is the VM's own work (allocations, calls).

Per kernel: calls per run, time per run and its share of the kernels' total, precision,
operations (2 x MACs of its conv/matmul) and bytes (its arguments, read + written), GOPS, GB/s,
and its roofline verdict: the fraction of the attainable peak, min(compute peak, operations
per byte x memory bandwidth), that it reaches (memory-only for kernels without a conv/matmul).
Operations, precision and whether a tuning record scheduled the kernel come from the manifest
(kernel_facts.py); for builds made before it, precision comes from the arguments' dtypes and
the operations and tuned columns are left out. Peaks are given, or measured once per machine,
target and TVM with micro-kernels compiled as qcompile compiles (a matmul per precision with
its default schedule, a 64 MB add) and cached in the cache directory; the output says which.

Kernel names are TVM's, made of the ops fused into them: they do not name the model's layers,
so the profile is per kernel, not per layer. Over RPC the hook cannot run: TVM's RPC does not
pass a function to the device, and its runtime offers no other way to time one kernel of a
remote library; profile says so instead of giving whole-model numbers.
"""

from __future__ import annotations

import json
import math
import statistics
import textwrap
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from .errors import InputError
from .kernel_facts import precision_of

MIN_REPEAT_MS = 1          # each timed repeat of a kernel: back-to-back calls for at least this
MATMUL = (256, 1024, 1024)  # the compute-peak micro-kernel: M x K x N
STREAM = 1 << 24           # the bandwidth micro-kernel: an add over 16M float32 (64 MB each way)
PEAK_NAMES = ("int8", "fp16", "fp32", "memory")  # memory in GB/s, the others in GOPS


@dataclass(frozen=True)
class KernelTime:
    """One kernel: per run `calls` calls taking `total_us` together."""

    name: str
    calls: int
    total_us: float
    share: float          # of the kernels' total per run
    precision: str
    bytes: int            # per call: its arguments, read + written
    ops: int | None       # per call: 2 x MACs of its conv/matmul; None: it has none (or unknown)
    tuned: bool | None    # a tuning-log record scheduled it; None: no log, or not recorded
    bound: str | None = None      # roofline: "compute" or "memory"; None: no peak to judge by
    of_peak: float | None = None  # the fraction of the attainable peak it reaches
    in_model_us: float | None = None  # per run, its calls timed as the model runs them

    @property
    def gops(self) -> float | None:
        return self.ops * self.calls / (self.total_us * 1e3) if self.ops and self.total_us else None

    @property
    def gbps(self) -> float | None:
        return self.bytes * self.calls / (self.total_us * 1e3) if self.total_us else None

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "gops": self.gops, "gbps": self.gbps}


@dataclass(frozen=True)
class Peaks:
    """Compute peaks (GOPS) per precision and the memory bandwidth (GB/s); `measured` names
    those measured with micro-kernels (the others were given), `note` says how and where."""

    gops: dict[str, float]
    gbps: float | None
    measured: tuple[str, ...] = ()
    note: str = ""

    def describe(self) -> str:
        values = [f"{name} {value:.0f} GOPS" for name, value in sorted(self.gops.items())]
        values += [f"memory {self.gbps:.1f} GB/s"] if self.gbps else []
        given = [n for n in (*self.gops, "memory") if n not in self.measured
                 and (n != "memory" or self.gbps)]
        how = [f"given: {', '.join(given)}"] if given else []
        how += [f"measured: {', '.join(self.measured)} ({self.note})"] if self.measured else []
        return f"peaks {', '.join(values)}; {'; '.join(how)}"


@dataclass(frozen=True)
class Profile:
    """A model's kernels, longest first, timed on `device`."""

    directory: str
    device: str
    kernels: tuple[KernelTime, ...]
    run_ms: float         # the whole model: median over `repeat`, as `qcompile run` measures it
    repeat: int
    peaks: Peaks | None
    tuning_log: str | None = None  # the build's; the tuned column is shown when it is known
    method: str = field(default=(
        "each kernel call timed in place by the runtime's time evaluator on its real arguments "
        "(through the Relax VM's instrument hook), median of the repeats, caches warm; in "
        "model: each call's wall time as the model runs, median over the runs"))

    @property
    def kernels_ms(self) -> float:
        return sum(k.total_us for k in self.kernels) / 1e3

    @property
    def in_model_ms(self) -> float:
        return sum(k.in_model_us or 0.0 for k in self.kernels) / 1e3

    def table(self, top: int = 15) -> str:
        tuned = self.tuning_log is not None and any(k.tuned is not None for k in self.kernels)
        head = (f"{'kernel':<44} {'calls':>5} {'ms/run':>8} {'in model':>8} {'share':>6} "
                f"{'prec':<5} "
                f"{'GOPS':>7} {'GB/s':>7}  {'roofline':<14}" + (" tuned" if tuned else ""))
        lines = [f"profile of {self.directory} on {self.device}", head]
        for k in self.kernels[:top]:
            name = k.name if len(k.name) <= 44 else k.name[:43] + "~"
            roof = f"{k.of_peak:.0%} {k.bound}" if k.of_peak is not None else "-"
            in_model = f"{k.in_model_us / 1e3:.3f}" if k.in_model_us is not None else "-"
            line = (f"{name:<44} {k.calls:>5} {k.total_us / 1e3:>8.3f} {in_model:>8} "
                    f"{k.share:>6.1%} {k.precision:<5} {_num(k.gops):>7} {_num(k.gbps):>7}  "
                    f"{roof:<14}")
            lines.append(line + (f" {'yes' if k.tuned else 'no'}" if tuned else ""))
        rest = self.kernels[top:]
        if rest:
            in_model = sum(k.in_model_us or 0.0 for k in rest) / 1e3
            lines.append(f"{f'({len(rest)} more kernels)':<44} {sum(k.calls for k in rest):>5} "
                         f"{sum(k.total_us for k in rest) / 1e3:>8.3f} {in_model:>8.3f} "
                         f"{sum(k.share for k in rest):>6.1%}")
        notes = [f"{len(self.kernels)} kernels: {self.kernels_ms:.3f} ms per run warm, "
                 f"{self.in_model_ms:.3f} ms in the model; the whole model {self.run_ms:.3f} "
                 f"ms (median of {self.repeat}, as `qcompile run` times it; beyond the "
                 "in-model sum, the VM's own work)",
                 f"times: {self.method}"]
        if self.peaks is not None:
            notes.append(self.peaks.describe() + "; a kernel whose data stays in cache between "
                         "its timed calls can pass the memory peak")
        if self.kernels and not any(k.ops for k in self.kernels):
            notes.append("no operation counts: the manifest has no kernel facts (built by an "
                         "older qcompile, or no conv/matmul); compile again for GOPS")
        return "\n".join(lines + [textwrap.fill(n, 100, subsequent_indent="  ") for n in notes])

    def to_json(self) -> dict[str, Any]:
        return {"model": self.directory, "device": self.device, "run_ms": self.run_ms,
                "kernels_ms": self.kernels_ms, "in_model_ms": self.in_model_ms,
                "repeat": self.repeat, "method": self.method,
                "tuning_log": self.tuning_log,
                "peaks": asdict(self.peaks) if self.peaks is not None else None,
                "kernels": [k.to_json() for k in self.kernels]}

    def save(self, path: str | Path) -> Path:
        from .paths import write_atomically

        write_atomically(path, json.dumps(self.to_json(), indent=2) + "\n")
        return Path(path)


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}" if value < 1000 else f"{value:.0f}"


def parse_peak(text: str) -> tuple[str, float]:
    """'int8=1400' -> ('int8', 1400.0): a --peak option."""
    name, sep, value = text.partition("=")
    try:
        number = float(value)
    except ValueError:
        number = -1.0
    if not sep or name not in PEAK_NAMES or not number > 0 or math.isinf(number):
        raise InputError(f"--peak '{text}' is not a peak: write NAME=VALUE with NAME one of "
                         f"{', '.join(PEAK_NAMES)} and a positive VALUE (GOPS; GB/s for memory), "
                         "e.g. --peak int8=1400 --peak memory=25.")
    return name, number


def profile(out_dir: str | Path, inputs: Mapping[str, Any] | None = None, *, repeat: int = 10,
            rpc_tracker: str | None = None, rpc_key: str | None = None,
            peaks: Mapping[str, float] | None = None, timeout: float = 60.0) -> Profile:
    """Time each kernel of OUT_DIR's model on `inputs` ({name: array}; None: random data of the
    model's shapes). `peaks`: {"int8"/"fp16"/"fp32": GOPS, "memory": GB/s}; the ones missing
    are measured here once and cached. `rpc_tracker`/`rpc_key`: on a device, which TVM 0.27's
    RPC cannot do (an InputError says so)."""
    import tvm

    from .runtime import load

    if repeat < 1:
        raise InputError(f"--repeat must be at least 1 (not {repeat}).")
    given = dict(parse_peak(f"{name}={value}") for name, value in (peaks or {}).items())
    with load(out_dir, rpc_tracker=rpc_tracker, rpc_key=rpc_key, timeout=timeout) as model:
        feeds = dict(inputs) if inputs is not None else _random_inputs(model.inputs)
        arrays = model.check_inputs(feeds)
        vm, device = model.new_vm()
        calls: list[tuple[str, float, list[str], int]] = []
        _install_hook(vm, device, calls, repeat, model)
        run_ms = model.benchmark(feeds, repeat=repeat).median_ms
        with model._device_errors():
            vm.set_input("main", *[tvm.runtime.tensor(a, device) for a in arrays])
            vm.invoke_stateful("main")
            in_model = _time_in_model(vm, repeat)
        artifact, where = model.artifact, model.where
    facts = artifact.manifest.kernels or {}
    rows = _rows(calls, facts.get("functions") or {}, facts.get("tuning_log") is not None)
    precisions = sorted({row[3] for row in rows if row[4]})
    found = _peaks(artifact.manifest.target, precisions, given)
    total = sum(row[2] for row in rows) or 1.0
    kernels = []
    for name, count, seconds, precision, ops, nbytes, tuned in rows:
        bound, of_peak = _roofline(ops, nbytes, seconds / count, precision, found)
        kernels.append(KernelTime(name, count, seconds * 1e6, seconds / total, precision,
                                  nbytes, ops, tuned, bound, of_peak,
                                  in_model.get(name, 0.0) * 1e6))
    kernels.sort(key=lambda k: -k.total_us)
    return Profile(str(artifact.directory), where, tuple(kernels), run_ms, repeat, found,
                   facts.get("tuning_log"))


def _random_inputs(specs) -> dict[str, np.ndarray]:
    """What `qcompile run` runs on without --inputs: seeded random data of the inputs' shapes."""
    rng = np.random.default_rng(0)
    return {s.name: (rng.standard_normal(s.shape) if "float" in s.dtype
                     else rng.integers(0, 2, s.shape)).astype(s.dtype) for s in specs}


def _is_kernel_call(name, args) -> bool:
    import tvm

    return not str(name).startswith("vm.builtin.") and bool(args) and \
        all(isinstance(a, tvm.runtime.Tensor) for a in args)


def _time_in_model(vm, repeat: int) -> dict[str, float]:
    """Per kernel, its calls' seconds per run as the model runs them in order (the clock read
    before and after each call), the median over `repeat` runs after one to warm up. `vm` has
    its inputs set."""
    started: list[float] = []
    run: dict[str, float] = {}

    def hook(_func, name, before, _result, *args):
        if _is_kernel_call(name, args):
            if before:
                started.append(time.perf_counter())
            else:
                seconds = time.perf_counter() - started.pop()
                run[str(name)] = run.get(str(name), 0.0) + seconds
        return 0

    vm.set_instrument(hook)
    runs: list[dict[str, float]] = []
    for _ in range(repeat + 1):
        run.clear()
        vm.invoke_stateful("main")
        runs.append(dict(run))
    runs = runs[1:]
    return {name: statistics.median(r.get(name, 0.0) for r in runs) for name in runs[0]}


def _install_hook(vm, device, calls: list, repeat: int, model) -> None:
    """Set `vm`'s instrument hook: each kernel call is timed on its arguments before it runs,
    and (kernel, seconds, argument dtypes, argument bytes) appended to `calls`."""

    def hook(func, name, before, _result, *args):
        if before and _is_kernel_call(name, args):
            # a new evaluator per call: TVM's keeps the call count it grew to reach
            # min_repeat_ms on one kernel and starts the next kernel from it (after a kernel
            # of a few nanoseconds, a 15 us kernel was called a million times per repeat)
            timer = vm.time_evaluator("invoke_closure", device, number=1, repeat=repeat,
                                      min_repeat_ms=MIN_REPEAT_MS)
            seconds = statistics.median(timer(func, *args).results)
            calls.append((str(name), seconds, [str(a.dtype) for a in args],
                          sum(math.prod(a.shape) * a.dtype.itemsize for a in args)))
        return 0  # run the call

    try:
        vm.set_instrument(hook)
    except (ValueError, RuntimeError) as exc:  # over RPC: "Cannot pass type ffi.Function ..."
        from .errors import last_line

        if model._session is None:
            raise
        raise InputError(
            f"The device {model.where} cannot be profiled kernel by kernel: TVM 0.27's Relax "
            "VM has no profiler, and the hook that times each kernel cannot run there (TVM's "
            f"RPC does not pass a function to the device: {last_line(str(exc))}). Profile a "
            "build of the model for this machine (--target host) here, and time the whole "
            f"model on the device with `qcompile run {model.artifact.directory} --rpc-tracker "
            "HOST:PORT --rpc-key KEY`.") from None


def _rows(calls, facts: Mapping[str, dict], logged: bool) -> list[tuple]:
    """Per kernel: (name, calls, seconds per run, precision, ops per call, bytes per call,
    tuned: None unless the build had a tuning log (`logged`))."""
    merged: dict[str, list] = {}
    for name, seconds, dtypes, nbytes in calls:
        entry = merged.setdefault(name, [0, 0.0, dtypes, nbytes])
        entry[0] += 1
        entry[1] += seconds
    rows = []
    for name, (count, seconds, dtypes, nbytes) in merged.items():
        fact = facts.get(name) or {}
        # without facts: the dtypes it reads (destination passing: the last argument is written)
        precision = fact.get("precision") or precision_of(dtypes[:-1] or dtypes)
        rows.append((name, count, seconds, precision, fact.get("ops"), nbytes,
                     fact.get("tuned") if logged else None))
    return rows


def _roofline(ops, nbytes, seconds, precision, peaks: Peaks) -> tuple[str | None, float | None]:
    """("compute" or "memory", the fraction of the attainable peak reached)."""
    if seconds <= 0 or not peaks.gbps:
        return None, None
    if not ops:
        return "memory", nbytes / seconds / 1e9 / peaks.gbps
    compute = peaks.gops.get(precision)
    if compute is None:
        return None, None
    memory = ops / nbytes * peaks.gbps  # GOPS the bandwidth allows at this intensity
    return ("compute" if compute <= memory else "memory"), ops / seconds / 1e9 / min(compute,
                                                                                    memory)


def _peaks(target: dict, precisions: list[str], given: dict[str, float]) -> Peaks:
    """The peaks the profile needs: given, else from the cache, else measured (and cached)."""
    import os
    import platform

    import tvm

    from .devices.emulator import cache_dir
    from .paths import write_atomically

    wanted = [p for p in precisions if p in PEAK_NAMES and p not in given]
    wanted += ["memory"] if "memory" not in given else []
    path = cache_dir() / "peaks.json"
    key = json.dumps({"machine": platform.node(), "cores": os.cpu_count(), "tvm": tvm.__version__,
                      "target": target.get("target"), "host": target.get("host")},
                     sort_keys=True)
    try:
        cache = json.loads(path.read_text()) if path.is_file() else {}
        entry = dict(cache.get(key) or {})
    except (OSError, ValueError, AttributeError):  # damaged: measured again, rewritten whole
        cache, entry = {}, {}
    missing = [name for name in wanted if name not in entry]
    if missing:
        entry.update(_measure(target, missing))
        entry["when"] = time.strftime("%Y-%m-%d %H:%M")
        cache[key] = entry
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomically(path, json.dumps(cache, indent=1) + "\n")
        except OSError:
            pass  # measured again next time
    values = {**{name: entry[name] for name in wanted}, **given}
    note = (f"micro-kernels compiled by qcompile for this target and run on this machine on "
            f"{entry.get('when')}: a {'x'.join(map(str, MATMUL))} matmul per precision with "
            f"qcompile's default schedule (tuned kernels may beat it), an add over "
            f"{STREAM * 4 >> 20} MB; cached in {path}, delete it to measure again")
    return Peaks({k: v for k, v in values.items() if k != "memory"}, values.get("memory"),
                 tuple(wanted), note if wanted else "")


def _measure(target_json: dict, names: list[str]) -> dict[str, float]:
    """Each peak in `names`, measured with a micro-kernel compiled for the target."""
    import tvm
    from tvm import relax

    from . import lower
    from .targets import Target

    target = Target(name=target_json["name"], description=target_json.get("description", ""),
                    target=target_json["target"], rpc_key=target_json.get("rpc_key", ""),
                    host=target_json.get("host"), os=target_json.get("os", "linux"))
    dot = lower.dot_product(target) if "int8" in names else None
    device = tvm.cpu(0)
    found = {}
    for name in names:
        bb = relax.BlockBuilder()
        m, k, n = MATMUL
        if name == "memory":
            x = relax.Var("x", relax.TensorType((STREAM,), "float32"))
            with bb.function("main", [x]):
                with bb.dataflow():
                    out = bb.emit_output(relax.op.add(x, relax.const(1.0, "float32")))
                bb.emit_func_output(out)
            data, work = np.zeros(STREAM, "float32"), 2 * 4 * STREAM
        else:
            act = {"int8": dot.activation_dtype if dot else "int8", "fp16": "float16",
                   "fp32": "float32"}[name]
            weight = relax.const(np.ones((k, n), "int8" if name == "int8" else act))
            x = relax.Var("x", relax.TensorType((m, k), act))
            with bb.function("main", [x]):
                with bb.dataflow():
                    out = bb.emit_output(relax.op.matmul(
                        x, weight, out_dtype="int32" if name == "int8" else "float32"))
                bb.emit_func_output(out)
            data, work = np.ones((m, k), act), 2 * m * k * n
        executable = tvm.compile(lower.lower(bb.get(), target), target.to_tvm(),
                                 relax_pipeline=None)
        vm = relax.VirtualMachine(executable, device)
        vm.set_input("main", tvm.runtime.tensor(data, device))
        seconds = min(vm.time_evaluator("invoke_stateful", device, number=1, repeat=5,
                                        min_repeat_ms=50)("main").results)
        found[name] = work / seconds / 1e9
    return found
