"""Run stage: load OUT_DIR/model.so with the TVM runtime, here or on a device over RPC.

Inputs are checked against the manifest before anything runs. The VM is driven through
set_input / invoke_stateful / get_outputs, which works the same locally and over RPC (a tuple
returned by a remote call is an opaque handle).
"""

from __future__ import annotations

import logging
import statistics
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from .artifact import LIBRARY_FILE, MANIFEST_FILE, Artifact
from .errors import DeviceError, InputError, ModelError, QcompileError, last_line
from .specs import TensorSpec, check_shape, name_mismatch
from .targets import host_arch, manifest_arch, manifest_kind

log = logging.getLogger(__name__)

ALIGNMENT = 64  # bytes: the alignment TVM's kernels assume of every tensor


@dataclass(frozen=True)
class Latency:
    """Per-run latency in milliseconds over `repeat` measurements of `number` runs each."""

    mean_ms: float
    median_ms: float
    p90_ms: float
    min_ms: float
    repeat: int
    number: int  # runs per repeat; 0: as many as fill 50 ms
    device: str
    emulated: bool = False

    def describe(self) -> str:
        runs = (f"{self.repeat} x {self.number} runs" if self.number else
                f"{self.repeat} repeats of at least 50 ms each")
        text = (f"latency on {self.device}: mean {self.mean_ms:.3f} ms, median "
                f"{self.median_ms:.3f} ms, p90 {self.p90_ms:.3f} ms ({runs})")
        if self.emulated:
            text = ("EMULATED " + text + "\n(measured on an emulated device under qemu: "
                    "correct outputs, but these timings are not the phone's speed)")
        return text


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


class LoadedModel:
    """A compiled model loaded into a TVM VirtualMachine on some device."""

    def __init__(self, artifact: Artifact, vm, device, session=None, where: str = "local",
                 device_info: Mapping[str, Any] | None = None, library=None):
        self.artifact = artifact
        self.device_info = dict(device_info or {})
        self.emulated = bool(self.device_info.get("emulated"))
        self.manifest = artifact.manifest
        self._vm = vm
        self._device = device
        self._session = session
        self._library = library
        self._staged: dict[int, Any] = {}  # input index -> the tensor inputs are copied into
        self.where = where

    def close(self) -> None:
        """Release the VM and, for a device, end the RPC session (the device becomes free)."""
        import gc

        self._vm = self._device = self._session = self._library = None
        self._staged = {}
        gc.collect()  # the remote session ends when its last handle is freed

    def __enter__(self) -> "LoadedModel":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def new_vm(self):
        """(another VirtualMachine of the library on the same device, the device): for a run
        with an instrument hook, which a VM keeps once it is set."""
        from tvm import relax

        return relax.VirtualMachine(self._library, self._device), self._device

    @property
    def remote(self) -> bool:
        """Whether the model runs on a device reached through an RPC session."""
        return self._session is not None

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        return self.manifest.inputs

    @property
    def outputs(self) -> tuple[TensorSpec, ...]:
        return self.manifest.outputs

    def check_inputs(self, inputs: Mapping[str, Any]) -> list[np.ndarray]:
        """The inputs in manifest order, or an InputError naming what does not match."""
        problem = name_mismatch(self.inputs, inputs)
        if problem:
            raise InputError(f"Inputs do not match the compiled model ({problem}). It takes: "
                             f"{'; '.join(s.describe() for s in self.inputs)}.")
        arrays = []
        for spec in self.inputs:
            value = np.asarray(inputs[spec.name])
            check_shape(spec, value.shape)
            if str(value.dtype) != spec.dtype:
                raise InputError(f"Input '{spec.name}' has dtype {value.dtype}, but the model "
                                 f"takes {spec.dtype}. Convert it, e.g. "
                                 f"array.astype('{spec.dtype}').")
            arrays.append(np.ascontiguousarray(value))
        return arrays

    @contextmanager
    def _device_errors(self):
        """Remote failures become a DeviceError that says what happened to the device."""
        if self._session is None:
            try:
                yield
            except (RuntimeError, ValueError, TypeError, IndexError) as exc:  # TVM's checks
                where = self.artifact.directory
                raise ModelError(
                    f"The model in {where} failed when run on this machine "
                    f"({last_line(str(exc), type(exc).__name__)}): its {MANIFEST_FILE} does "
                    f"not describe the inputs and outputs {LIBRARY_FILE} takes (edited by "
                    f"hand, or copied from another build), or the library is damaged. "
                    f"Compile again into {where}.") from None
            return
        try:
            yield
        except QcompileError:
            raise
        except Exception as exc:  # TVMError/InternalError/OSError from the RPC layer
            lines = str(exc).strip().splitlines()
            raise DeviceError(
                f"The device {self.where} failed during the session "
                f"({lines[-1] if lines else type(exc).__name__}): it crashed, was stopped, or "
                "lost its connection. A crash when the model runs often means that the target "
                "uses instructions the device's CPU lacks (e.g. arm64-dotprod on a Cortex-A53). "
                "The tracker and other devices are not affected; once the device is back, "
                "run again for a new session.") from None

    def _set_inputs(self, arrays: list[np.ndarray]) -> None:
        """Give the VM the inputs (checked, in manifest order)."""
        import tvm

        if self._session is not None:
            tensors = [tvm.runtime.tensor(a, self._device) for a in arrays]
        else:
            tensors = [self._local_tensor(i, a) for i, a in enumerate(arrays)]
        self._vm.set_input("main", *tensors)

    def _local_tensor(self, index: int, array: np.ndarray):
        """Input `index` as a tensor on this machine: the array itself when TVM can take it
        without a copy (64-byte aligned and writable, as TVM's kernels assume), else a copy
        into a tensor kept for the input. Measured on EfficientNet-Lite0 int8 (2 threads): a
        new tensor per run cost 0.06 ms over a kept one, and a copy 0.08 ms over none."""
        import tvm

        if array.size and array.flags.writeable and array.ctypes.data % ALIGNMENT == 0:
            try:
                return tvm.runtime.from_dlpack(array)
            except (BufferError, RuntimeError, TypeError):  # a dtype DLPack cannot carry
                pass
        kept = self._staged.get(index)
        if kept is None or tuple(kept.shape) != array.shape or kept.dtype != str(array.dtype):
            kept = self._staged[index] = tvm.runtime.empty(array.shape, str(array.dtype),
                                                           self._device)
        kept.copyfrom(array)
        return kept

    def run(self, inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Run once; outputs by name, as numpy arrays."""
        arrays = self.check_inputs(inputs)
        with self._device_errors():
            self._set_inputs(arrays)
            self._vm.invoke_stateful("main")
            result = self._vm.get_outputs("main")
            values = list(result) if isinstance(result, (tuple, list)) else [result]
            return {spec.name: value.numpy() for spec, value in zip(self.outputs, values)}

    def benchmark(self, inputs: Mapping[str, Any], repeat: int = 20, number: int = 0,
                  warmup: int = 1) -> Latency:
        """Time the model with the runtime's time evaluator (on the device, for RPC).

        number=0 picks the runs per repeat so that each repeat lasts at least 50 ms.
        """
        if repeat < 1 or number < 0:
            raise InputError(f"repeat must be at least 1 (not {repeat}) and number at least 0 "
                             f"(not {number}).")
        arrays = self.check_inputs(inputs)
        with self._device_errors():
            self._set_inputs(arrays)
            for _ in range(warmup):
                self._vm.invoke_stateful("main")
            evaluator = self._vm.time_evaluator(
                "invoke_stateful", self._device, number=max(number, 1), repeat=repeat,
                min_repeat_ms=0 if number else 50)
            times = [t * 1e3 for t in evaluator("main").results]
        return Latency(mean_ms=statistics.fmean(times), median_ms=statistics.median(times),
                       p90_ms=_percentile(times, 90), min_ms=min(times), repeat=repeat,
                       number=number, device=self.where, emulated=self.emulated)


def _check_runs_here(artifact: Artifact) -> None:
    target = artifact.manifest.target
    name = target.get("name", "?")
    here = host_arch()
    advice = (f"Run it on the device through an RPC tracker: qcompile run {artifact.directory} "
              f"--rpc-tracker HOST:PORT --rpc-key {target.get('rpc_key', name)}.")
    if manifest_kind(target) != "llvm":
        raise DeviceError(f"'{artifact.directory}' was built for the {name} GPU "
                          f"({target['target'].get('kind')}), which this machine does not have. "
                          + advice)
    arch = manifest_arch(target)
    if arch != here:
        raise DeviceError(f"'{artifact.directory}' was built for target '{name}' ({arch}); this "
                          f"machine is {here}. " + advice)


def _device_for(target: dict[str, Any], session=None):
    import tvm

    devices = session if session is not None else tvm  # both have cpu() and cl()
    return devices.cl(0) if manifest_kind(target) == "opencl" else devices.cpu(0)


def _load_here(artifact: Artifact):
    """The library loaded into this process. dlopen hands back the library already loaded
    under the same path, so a model rebuilt into the same directory would run its old code:
    the library is loaded through a name made of its sha256 (same content, same library)."""
    import os
    import shutil
    import tempfile

    import tvm

    directory = Path(tempfile.mkdtemp(prefix="qcompile-load-"))
    alias = directory / f"model-{artifact.manifest.library_sha256[:24]}.so"
    try:
        try:
            os.link(artifact.library, alias)
        except OSError:  # another file system
            shutil.copyfile(artifact.library, alias)
        return tvm.runtime.load_module(str(alias))
    finally:
        shutil.rmtree(directory, ignore_errors=True)  # the loaded mapping stays valid


def load(out_dir: str | Path, rpc_tracker: str | None = None, rpc_key: str | None = None,
         timeout: float = 60.0) -> LoadedModel:
    """Load a compiled model here, or on a device under `rpc_key` at the tracker."""
    from tvm import relax

    from .devices.tracker import device_info, parse_tracker, request_session

    artifact = Artifact.open(out_dir)
    target = artifact.manifest.target
    if rpc_tracker is None and rpc_key is None:
        _check_runs_here(artifact)
        library = _load_here(artifact)
        device = _device_for(target)
        return LoadedModel(artifact, relax.VirtualMachine(library, device), device,
                           where="this machine", library=library)
    address = parse_tracker(rpc_tracker)
    key = rpc_key or target.get("rpc_key")
    session = request_session(address, key, timeout=timeout)
    try:
        session.upload(str(artifact.library))
        library = session.load_module(LIBRARY_FILE)
        device = _device_for(target, session)
        vm = relax.VirtualMachine(library, device)
        info = device_info(session)
    except Exception as exc:  # a TVMError or a socket error from the remote side
        raise DeviceError(f"The device under key '{key}' could not load {LIBRARY_FILE}: "
                          f"{str(exc).strip().splitlines()[-1] if str(exc).strip() else exc}. "
                          "Check that the device's TVM runtime matches the one that built it "
                          f"(TVM {artifact.manifest.versions.get('tvm')}) and that the target "
                          "fits the device's CPU.") from None
    host, port = address
    return LoadedModel(artifact, vm, device, session=session, where=f"{key}@{host}:{port}",
                       device_info=info, library=library)
