"""The emulated-phone section of the benchmark: correctness and instruction mix, never speed.

EfficientNet-Lite0 int8 is built for the ARM64 targets (same calibration photos as the host
rows), each library's dot-product instructions are counted in its disassembly, and the library
runs on an ARM64 device emulated by qemu (a TVM RPC server behind a tracker on loopback) on a
few held-out photos, against onnxruntime fp32 on this machine. Timings under emulation mean
nothing, so none are taken.
"""

from __future__ import annotations

import socket
import sys
import time
from pathlib import Path

import numpy as np

TARGETS = ("arm64-dotprod", "arm64-i8mm")
INSTRUCTIONS = ("sdot", "udot", "smmla", "ummla")  # the ARM ones the tests count
OBJDUMP = "aarch64-linux-gnu-objdump"
PHOTOS = 8


def phone_rows(onnx_path: Path, work: Path, calibration: list[dict], held_out: list[dict],
               reference: np.ndarray) -> list[dict]:
    """One row per ARM64 target: instruction counts and top-1 agreement on the device."""
    import qcompile
    from qcompile.devices import emulator
    from test_int8_kernels import instruction_counts  # tests/ is on sys.path (bench/run.py)
    from qcompile.devices.processes import stop_process_group
    from qcompile.devices.tracker import start_tracker

    with socket.socket() as probe:  # a free port on loopback
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    tracker = start_tracker("127.0.0.1", port)
    rows = []
    try:
        for target in TARGETS:
            print(f"bench: efficientnet-lite0 / {target} on the emulated device ...",
                  file=sys.stderr, flush=True)
            started = time.perf_counter()
            artifact = qcompile.compile(onnx_path, target, work / target, quantize="int8",
                                        calibration=calibration)
            compile_s = time.perf_counter() - started
            counts = instruction_counts(artifact.library, OBJDUMP)
            key = f"bench-{target}"
            device = emulator.start(("127.0.0.1", port), key, cpu="max")
            try:
                model = qcompile.load(artifact.directory, rpc_tracker=f"127.0.0.1:{port}",
                                      rpc_key=key, timeout=120)
                outputs = np.stack([next(iter(model.run(feed).values()))
                                    for feed in held_out[:PHOTOS]])
                where = model.where
            finally:
                device.stop()
            agree = float(np.mean(outputs.reshape(PHOTOS, -1).argmax(1)
                                  == reference[:PHOTOS].reshape(PHOTOS, -1).argmax(1)))
            rows.append({"model": "efficientnet-lite0", "target": target, "ran_on": where,
                         "photos": PHOTOS, "top1_agreement": agree, "compile_s": compile_s,
                         "size_bytes": artifact.manifest.library_bytes,
                         **{name: counts[name] for name in INSTRUCTIONS}})
    finally:
        stop_process_group(tracker)
    return rows


def print_rows(rows: list[dict]) -> None:
    print("\nEmulated phone (qemu, `-cpu max`; correctness and instruction mix only, no "
          "timings):\n")
    header = "| model | target | top-1 agree (photos) | " + " | ".join(INSTRUCTIONS) + \
        " | size MB | compile s |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for r in rows:
        print(f"| {r['model']} | {r['target']} | {r['top1_agreement']:.3f} ({r['photos']}) | "
              + " | ".join(str(r[name]) for name in INSTRUCTIONS)
              + f" | {r['size_bytes'] / 1e6:.1f} | {r['compile_s']:.0f} |")
