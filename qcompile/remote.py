"""Sessions on devices registered with a TVM RPC tracker.

The tracker hands out devices by key (`python -m tvm.exec.rpc_tracker`; each device runs
`python -m tvm.exec.rpc_server --tracker HOST:PORT --key KEY`). TVM's client retries for a minute
on a dead address and waits forever for a busy key; these wrappers fail fast with errors that
name the address and the keys that exist.
"""

from __future__ import annotations

import os
import socket
import threading
from typing import Any

from .errors import DeviceError

TRACKER_ENV = ("TVM_TRACKER_HOST", "TVM_TRACKER_PORT")


def parse_tracker(text: str | None) -> tuple[str, int]:
    """'HOST:PORT' (or $TVM_TRACKER_HOST/$TVM_TRACKER_PORT when None) -> (host, port)."""
    if text is None:
        host, port = (os.environ.get(name) for name in TRACKER_ENV)
        if not host or not port:
            raise DeviceError("No RPC tracker given: pass --rpc-tracker HOST:PORT, or set "
                              "TVM_TRACKER_HOST and TVM_TRACKER_PORT.")
        text = f"{host}:{port}"
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise DeviceError(f"RPC tracker address '{text}' is malformed: write HOST:PORT, "
                          "e.g. --rpc-tracker 127.0.0.1:9190.")
    return host, int(port)


def connect_tracker(address: tuple[str, int], timeout: float = 5.0):
    """A tvm.rpc.TrackerSession, or a DeviceError saying which address failed and why."""
    from tvm import rpc

    host, port = address
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
        return rpc.connect_tracker(host, port)
    except (OSError, RuntimeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise DeviceError(
            f"Cannot reach the RPC tracker at {host}:{port} ({reason or type(exc).__name__}). "
            "Check the address, and that a tracker runs there: "
            f"`python -m tvm.exec.rpc_tracker --host 0.0.0.0 --port {port}`.") from None


def tracker_keys(tracker) -> dict[str, dict[str, int]]:
    """{key: {"free": n, "pending": n}} as the tracker reports them."""
    return {key: dict(info) for key, info in tracker.summary()["queue_info"].items()}


def request_session(address: tuple[str, int], key: str, timeout: float = 60.0,
                    session_timeout: float = 0) -> Any:
    """An RPC session on a device registered under `key`, waiting at most `timeout` s."""
    tracker = connect_tracker(address)
    host, port = address
    keys = tracker_keys(tracker)
    if key not in keys:
        known = ", ".join(sorted(keys)) or "none"
        raise DeviceError(f"No device is registered under key '{key}' at the tracker "
                          f"{host}:{port}. Keys registered there: {known}. Start a device with "
                          f"`python -m tvm.exec.rpc_server --tracker {host}:{port} --key {key}`.")
    result: dict[str, Any] = {}

    def ask() -> None:
        try:
            result["session"] = tracker.request(key, priority=1, session_timeout=session_timeout,
                                                max_retry=1)
        except Exception as exc:  # the RPC layer raises RuntimeError/TVMError/OSError
            result["error"] = exc

    worker = threading.Thread(target=ask, daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        tracker.close()
        raise DeviceError(f"No device under key '{key}' at {host}:{port} became free within "
                          f"{timeout:.0f} s: all of them are busy. Try again later, or add "
                          "devices under that key.")
    if "error" in result:
        raise DeviceError(f"The tracker at {host}:{port} could not open a session on a device "
                          f"under key '{key}': {result['error']}.")
    return result["session"]
