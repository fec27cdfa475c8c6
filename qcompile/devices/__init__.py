"""Where qcompile measures and runs: one Device protocol (base.py) for this machine, the
devices under a key at an RPC tracker (a phone, a board, the emulated ARM64 device), and pocl
(an OpenCL implementation for this CPU, standing in for a phone's GPU).

    device_for(target, rpc, pocl)   the device that measures `target`'s candidates and kernels
    builder.py                      candidates built here, linked with the target's compiler
    timing.py                       kernels built and timed like candidates
    tracker.py                      RPC tracker sessions that fail fast, its status; starting one
    emulator.py                     the emulated ARM64 device (qemu user mode)
    processes.py                    helper processes stopped by process group

Tuning (tune.py), layer timing (layer_latency.py) and running (Device.load, runtime.py) take a
Device; this is the only place that decides which kind.
"""

from __future__ import annotations

from ..errors import DeviceError, InputError
from ..targets import Target
from .base import Device
from .local import LocalDevice


def check_choice(target: Target, rpc: tuple[tuple[str, int], str] | None = None,
                 pocl: bool = False) -> None:
    """Refuse a choice of devices that cannot measure `target` (before anything else is
    checked or done)."""
    if pocl and target.kind != "opencl":
        raise InputError(f"--pocl measures OpenCL (GPU) candidates, and target "
                         f"'{target.name}' is a CPU ({target.kind}).")
    if pocl and rpc is not None:
        raise InputError("Measure on the devices at the tracker or on pocl, not both: "
                         "drop --pocl or --rpc-tracker.")


def device_for(target: Target, rpc: tuple[tuple[str, int], str] | None = None,
               pocl: bool = False) -> Device:
    """Where `target`'s candidates are measured: the devices under the key at the tracker
    (`rpc`: ((host, port), key)), pocl for an OpenCL target (`pocl`), or this machine."""
    check_choice(target, rpc, pocl)
    if pocl:
        from .pocl import PoclDevice

        return PoclDevice()
    if rpc is not None:
        from .rpc import RpcDevice

        return RpcDevice(*rpc)
    if target.cc is not None or target.kind != "llvm":
        raise DeviceError(
            f"Target '{target.name}' cannot be measured on this machine: pass "
            "--rpc-tracker HOST:PORT and --rpc-key KEY of a device"
            + (" (or --pocl: the whole flow on an OpenCL implementation for this CPU, "
               "whose timings are not the GPU's)." if target.kind == "opencl" else "."))
    return LocalDevice()


__all__ = ["Device", "LocalDevice", "check_choice", "device_for"]
