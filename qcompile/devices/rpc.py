"""The devices registered under a key at an RPC tracker: candidates measured on all of them,
failing fast (not waiting forever) when none is left."""

from __future__ import annotations

from ..errors import DeviceError
from .base import RUN_TIMEOUT_S, Device


class RpcDevice(Device):
    """Every device under `key` at the tracker `address`."""

    def __init__(self, address: tuple[str, int], key: str):
        from .tracker import device_info, request_session

        self.address, self.key = address, key
        self.count = self.available()
        if self.count == 0:
            raise DeviceError(self._none_left("No device is registered"))
        session = request_session(address, key, timeout=RUN_TIMEOUT_S)
        self.emulated = bool(device_info(session).get("emulated"))
        del session
        host, port = address
        self.where = f"{self.count} device(s) '{key}' at {host}:{port}"

    def available(self) -> int:
        count, known = registered_devices(self.address, self.key)
        self._known = ", ".join(known) or "none"
        return count

    def _none_left(self, what: str) -> str:
        (host, port), key = self.address, self.key
        return (f"{what} under key '{key}' at the tracker {host}:{port}, so nothing can "
                f"measure the candidates. Keys registered there: {self._known}. Start or "
                f"reconnect the device (`python -m tvm.exec.rpc_server --tracker {host}:{port} "
                f"--key {key}`, or `qcompile device emulate` for the emulated one) and run the "
                "same tune again: it resumes from the records in the log.")

    def runner(self):
        from tvm.s_tir import meta_schedule as ms

        host, port = self.address
        config = ms.runner.RPCConfig(tracker_host=host, tracker_port=port, tracker_key=self.key,
                                     session_priority=1, session_timeout_sec=RUN_TIMEOUT_S)
        return ms.runner.RPCRunner(rpc_config=config, evaluator_config=self.evaluator(),
                                   max_workers=self.count, f_create_session=create_session)

    def check_alive(self) -> None:
        if self.available() == 0:
            raise DeviceError(self._none_left("Every device dropped out: none is left"))

    def load(self, directory):
        from ..runtime import load

        host, port = self.address
        return load(directory, rpc_tracker=f"{host}:{port}", rpc_key=self.key)


def registered_devices(address: tuple[str, int], key: str) -> tuple[int, list[str]]:
    """(devices registered under `key` at the tracker, every key registered there)"""
    from .tracker import tracker_status

    status = {k.key: k for k in tracker_status(address).keys}
    return (status[key].total if key in status else 0), sorted(status)


def create_session(rpc_config):
    """MetaSchedule's session for one candidate, failing at once when the tracker has no device
    under the key: its own request would wait for one forever, so a tune whose devices died
    would hang instead of stopping."""
    from tvm.s_tir.meta_schedule.runner.rpc_runner import default_create_session

    address = (rpc_config.tracker_host, rpc_config.tracker_port)
    key = rpc_config.tracker_key
    if registered_devices(address, key)[0] == 0:
        raise DeviceError(f"no device is registered under key '{key}' at the tracker "
                          f"{address[0]}:{address[1]}")
    return default_create_session(rpc_config)


__all__ = ["RpcDevice", "create_session", "registered_devices"]
