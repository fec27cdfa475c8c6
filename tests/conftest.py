"""Shared fixtures: a model file on disk, a real RPC tracker, a host device (x86 RPC server)
and an emulated ARM64 device (qemu), all stopped by the fixtures that start them."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import onnx
import pytest

from qcompile.devices.processes import stop_process_group

sys.path.insert(0, str(Path(__file__).parent))


def compile_for_host(directory: Path, model: onnx.ModelProto) -> Path:
    """Save `model` in `directory`, compile it for the host; the OUT_DIR."""
    import qcompile

    onnx.save(model, str(directory / "model.onnx"))
    qcompile.compile(directory / "model.onnx", "host", directory / "out")
    return directory / "out"


@pytest.fixture
def save_model(tmp_path):
    def save(model: onnx.ModelProto, name: str = "model.onnx") -> Path:
        path = tmp_path / name
        onnx.save(model, str(path))
        return path

    return save


# this machine's CPU without its name: no shipped tuning log applies, about 2 s a build
GENERIC_TARGET = 'description = "any CPU, unnamed"\nrpc_key = "generic"\n[target]\nkind = "llvm"\n'


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_process(args: list[str], **kwargs) -> subprocess.Popen:
    """Start a helper in its own process group, so that the test can stop all of it."""
    kwargs.setdefault("stdout", subprocess.DEVNULL)
    kwargs.setdefault("stderr", subprocess.DEVNULL)
    return subprocess.Popen(args, start_new_session=True, **kwargs)


def wait_for_key(tracker: str, key: str, timeout: float = 60.0) -> None:
    """Wait until the tracker has a free device under `key`."""
    from qcompile.errors import DeviceError
    from qcompile.devices.tracker import parse_tracker, tracker_status

    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            keys = {k.key: k for k in tracker_status(parse_tracker(tracker)).keys}
            if key in keys and keys[key].free > 0:
                return
        except DeviceError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"no free device under {key} at {tracker}")


@pytest.fixture(scope="session")
def tracker():
    """A real TVM RPC tracker on loopback: its address as HOST:PORT."""
    from qcompile.devices.tracker import start_tracker

    port = free_port()
    process = start_tracker("127.0.0.1", port)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        stop_process_group(process)


@pytest.fixture(scope="session")
def host_device(tracker):
    """One RPC server of this machine (x86) registered under 'host-test'."""
    server_port = free_port()
    server = start_process([sys.executable, "-m", "tvm.exec.rpc_server", "--host", "127.0.0.1",
                            "--port", str(server_port), "--port-end", str(server_port + 50),
                            "--tracker", tracker, "--key", "host-test"])
    try:
        wait_for_key(tracker, "host-test")
        yield {"tracker": tracker, "key": "host-test", "pid": server.pid}
    finally:
        stop_process_group(server)


@pytest.fixture(scope="session")
def arm64_device(tracker):
    """An emulated ARM64 device (qemu, max CPU) registered under 'arm64-emu'.

    The first use on a machine builds the Debian userland (about 30 s; cached afterwards).
    """
    from qcompile.devices import emulator
    from qcompile.devices.tracker import parse_tracker

    device = emulator.start(parse_tracker(tracker), "arm64-emu")
    try:
        yield {"tracker": tracker, "key": "arm64-emu", "device": device}
    finally:
        device.stop()


EMULATED_FIXTURES = {"arm64_device"}


def pytest_collection_modifyitems(items):
    """Mark by what a test needs: `emulated` (the emulated ARM64 device), `gpu` (OpenCL
    kernels run on pocl); `-m "not emulated"` leaves those out."""
    for item in items:
        if EMULATED_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.emulated)
        if item.module.__name__ in ("test_gpu_kernels", "test_gpu_tune"):
            item.add_marker(pytest.mark.gpu)
