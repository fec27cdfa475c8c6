"""Sessions on devices registered with a TVM RPC tracker.

The tracker hands out devices by key (`python -m tvm.exec.rpc_tracker`; each device runs
`python -m tvm.exec.rpc_server --tracker HOST:PORT --key KEY`). TVM's client retries for a minute
on a dead address and waits forever for a busy key; these wrappers fail fast with errors that
name the address and the keys that exist.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass
from typing import Any

from ..errors import DeviceError

TRACKER_ENV = ("TVM_TRACKER_HOST", "TVM_TRACKER_PORT")


def parse_tracker(text: str | None) -> tuple[str, int]:
    """'HOST:PORT' or '[IPV6]:PORT' (or $TVM_TRACKER_HOST/$TVM_TRACKER_PORT when None)
    -> (host, port)."""
    if text is None:
        host, port = (os.environ.get(name) for name in TRACKER_ENV)
        if not host or not port:
            raise DeviceError("No RPC tracker given: pass --rpc-tracker HOST:PORT, or set "
                              "TVM_TRACKER_HOST and TVM_TRACKER_PORT.")
        text = f"{host}:{port}"
    host, sep, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):  # an IPv6 literal: [::1]:9190
        host = host[1:-1]
    if not sep or not host or not port.isdigit():
        raise DeviceError(f"RPC tracker address '{text}' is malformed: write HOST:PORT, "
                          "e.g. --rpc-tracker 127.0.0.1:9190 (an IPv6 address in brackets: "
                          "[::1]:9190).")
    if not 0 < int(port) < 65536:
        raise DeviceError(f"RPC tracker address '{text}' has port {port}, which does not "
                          "exist: a port is 1 to 65535 (a tracker's default is 9190).")
    return host, int(port)


def is_loopback(host: str) -> bool:
    """Whether `host` is reachable from this machine only."""
    return host in ("localhost", "::1") or host.startswith("127.")


def address_text(address: tuple[str, int]) -> str:
    """(host, port) as HOST:PORT, an IPv6 host in brackets."""
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


HANDSHAKE_TIMEOUT_S = 5.0  # a tracker answers at once; this only bounds a silent peer


def _not_a_tracker(address: tuple[str, int], what: str) -> DeviceError:
    return DeviceError(
        f"{address_text(address)} is not a TVM RPC tracker: {what}. Check the address and "
        "port (`qcompile tracker` listens on 127.0.0.1:9190 by default): it may be a device's "
        "RPC server or another service.")


def _tracker_session_class():
    """TVM's TrackerSession with a timeout on its socket, so that a peer that accepts the
    connection and never answers (another service on that port) is an error, not a hang."""
    import struct

    from tvm.rpc import base
    from tvm.rpc.client import TrackerSession

    class TimedTrackerSession(TrackerSession):
        def __init__(self, addr, timeout: float):
            self._timeout = timeout
            super().__init__(addr)

        def _connect(self):
            self._sock = socket.create_connection(self._addr, timeout=self._timeout)
            try:
                self._sock.sendall(struct.pack("<i", base.RPC_TRACKER_MAGIC))
                reply = base.recvall(self._sock, 4)
            except OSError:
                self.close()
                raise _not_a_tracker(self._addr, "it accepted the connection but did not "
                                     f"answer TVM's tracker handshake within {self._timeout:g} "
                                     "s") from None
            if struct.unpack("<i", reply)[0] != base.RPC_TRACKER_MAGIC:
                self.close()
                raise _not_a_tracker(self._addr, "it answered TVM's tracker handshake with "
                                     f"something else ({reply!r})")

    return TimedTrackerSession


def connect_tracker(address: tuple[str, int], timeout: float = HANDSHAKE_TIMEOUT_S):
    """A tvm.rpc.TrackerSession whose socket times out after `timeout` s, or a DeviceError
    saying which address failed and why."""
    try:
        return _tracker_session_class()(tuple(address), timeout)
    except DeviceError:
        raise
    except (OSError, RuntimeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        if isinstance(exc, socket.timeout):
            reason = f"no connection within {timeout:g} s"
        raise DeviceError(
            f"Cannot reach the RPC tracker at {address_text(address)} "
            f"({reason or type(exc).__name__}). Check the address, and that a tracker runs "
            f"there (`qcompile tracker --port {address[1]}` on that machine).") from None


def summary(tracker, address: tuple[str, int]) -> dict[str, Any]:
    """The tracker's summary ({"queue_info": ..., "server_info": ...}), or a DeviceError when
    the peer does not answer like a tracker, or not in time."""
    try:
        value = tracker.summary()
        if not isinstance(value, dict) or not isinstance(value.get("queue_info"), dict):
            raise ValueError(f"unexpected answer {str(value)[:80]!r}")
        return value
    except (OSError, RuntimeError, ValueError, TypeError, KeyError) as exc:
        what = ("it did not answer a summary request in time"
                if isinstance(exc, socket.timeout) else
                f"its answer to a summary request is not a tracker's ({exc})")
        raise _not_a_tracker(address, what) from None


def tracker_keys(tracker, address: tuple[str, int]) -> dict[str, dict[str, int]]:
    """{key: {"free": n, "pending": n}} as the tracker reports them."""
    return {key: dict(info) for key, info in summary(tracker, address)["queue_info"].items()}


def device_info(session) -> dict[str, Any]:
    """What a device says about itself: {"emulated": True, ...} for qcompile's emulated device,
    {} for a plain TVM RPC server (a real phone or board)."""
    import json

    try:
        describe = session.get_function("qcompile.device_info")
    except (AttributeError, RuntimeError):
        return {}
    return json.loads(describe())


@dataclass(frozen=True)
class KeyStatus:
    """The devices registered under one key: `total` servers, of which `free` are idle."""

    key: str
    total: int
    free: int
    pending: int  # requests waiting for a free device

    @property
    def busy(self) -> int:
        return max(self.total - self.free, 0)


@dataclass(frozen=True)
class TrackerStatus:
    address: tuple[str, int]
    servers: tuple[tuple[str, str], ...]  # (address, key) of every registered device
    keys: tuple[KeyStatus, ...]

    def describe(self) -> str:
        host, port = self.address
        if not self.keys:
            return (f"No devices are registered at the tracker {host}:{port}. Start one on the "
                    f"device with `python -m tvm.exec.rpc_server --tracker {host}:{port} --key "
                    f"KEY`, or an emulated one here with `qcompile device emulate "
                    f"--rpc-tracker {host}:{port}`.")
        width = max(len("key"), *(len(k.key) for k in self.keys))
        lines = [f"Devices at the tracker {host}:{port}:", "",
                 f"{'key':<{width}}  total  free  busy  waiting"]
        lines += [f"{k.key:<{width}}  {k.total:>5}  {k.free:>4}  {k.busy:>4}  {k.pending:>7}"
                  for k in self.keys]
        lines += ["", "servers:"]
        lines += [f"  {addr:<22} {key}" for addr, key in sorted(self.servers, key=lambda s: s[1])]
        return "\n".join(lines)


def tracker_status(address: tuple[str, int]) -> TrackerStatus:
    """Every key at the tracker with its total, free, busy and waiting counts."""
    tracker = connect_tracker(address)
    try:
        info = summary(tracker, address)
    finally:
        tracker.close()
    servers = []
    totals: dict[str, int] = {}
    for item in info.get("server_info", ()):
        key = item["key"].split(":", 1)[-1]  # 'server:arm64-emu' -> 'arm64-emu'
        addr = ":".join(str(part) for part in item.get("addr", ("?", "?")))
        servers.append((addr, key))
        totals[key] = totals.get(key, 0) + 1
    keys = []
    for key, queue in sorted(info["queue_info"].items()):
        total = totals.get(key, 0)
        if total or queue.get("pending", 0):
            keys.append(KeyStatus(key, total, queue.get("free", 0), queue.get("pending", 0)))
    return TrackerStatus(address, tuple(servers), tuple(keys))


def start_tracker(host: str = "127.0.0.1", port: int = 9190, quiet: bool = True):
    """Start `python -m tvm.exec.rpc_tracker` on exactly HOST:PORT in its own process group.

    The subprocess.Popen is returned once the tracker accepts connections.
    """
    import time

    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise DeviceError(f"Cannot start a tracker on {host}:{port}: {exc.strerror}. Another "
                              "tracker may already run there (see `qcompile devices "
                              f"--rpc-tracker {host}:{port}`), or pick another --port.") from None
    output = subprocess.DEVNULL if quiet else None
    process = subprocess.Popen(
        [sys.executable, "-m", "tvm.exec.rpc_tracker", "--host", host, "--port", str(port),
         "--port-end", str(port + 1)] + (["--silent"] if quiet else []),
        stdout=output, stderr=output, stdin=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 60
    while time.time() < deadline:
        if process.poll() is not None:
            raise DeviceError(f"The tracker on {host}:{port} exited at start "
                              f"(code {process.returncode}).")
        try:
            with socket.create_connection((host if host != "0.0.0.0" else "127.0.0.1", port),
                                          timeout=1):
                return process
        except OSError:
            time.sleep(0.2)
    process.kill()
    raise DeviceError(f"The tracker on {host}:{port} did not start within 60 s.")


def request_session(address: tuple[str, int], key: str, timeout: float = 60.0,
                    session_timeout: float = 0) -> Any:
    """An RPC session on a device registered under `key`, waiting at most `timeout` s."""
    tracker = connect_tracker(address)
    host, port = address
    keys = tracker_keys(tracker, address)
    if key not in keys:
        known = ", ".join(sorted(keys)) or "none"
        raise DeviceError(f"No device is registered under key '{key}' at the tracker "
                          f"{host}:{port}. Keys registered there: {known}. Start a device with "
                          f"`python -m tvm.exec.rpc_server --tracker {host}:{port} --key {key}`.")
    result: dict[str, Any] = {}
    tracker._sock.settimeout(None)  # waiting for a busy device: bounded by the join below

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
