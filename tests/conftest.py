"""Shared fixtures: a model file on disk, and a real RPC tracker with a host device."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import onnx
import pytest

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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_process(args: list[str]) -> subprocess.Popen:
    """Start a helper in its own process group, so that the test can stop all of it."""
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


def stop_process(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def wait_for_key(port: int, key: str, timeout: float = 60.0) -> None:
    from tvm import rpc

    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            info = rpc.connect_tracker("127.0.0.1", port).summary()["queue_info"]
            if info.get(key, {}).get("free", 0) > 0:
                return
        except (OSError, RuntimeError):
            pass
        time.sleep(0.5)
    raise TimeoutError(f"no device registered under {key} at 127.0.0.1:{port}")


@pytest.fixture(scope="session")
def host_device():
    """A TVM RPC tracker on loopback with one RPC server of this machine under 'host-test'."""
    port = free_port()
    tracker = start_process([sys.executable, "-m", "tvm.exec.rpc_tracker", "--host",
                             "127.0.0.1", "--port", str(port), "--port-end", str(port + 1)])
    server_port = free_port()
    server = start_process([sys.executable, "-m", "tvm.exec.rpc_server", "--host", "127.0.0.1",
                            "--port", str(server_port), "--port-end", str(server_port + 50),
                            "--tracker", f"127.0.0.1:{port}", "--key", "host-test"])
    try:
        wait_for_key(port, "host-test")
        yield {"tracker": f"127.0.0.1:{port}", "key": "host-test", "pids": (tracker.pid,
                                                                           server.pid)}
    finally:
        stop_process(server)
        stop_process(tracker)
