"""Running through a real TVM RPC tracker and server on loopback (this machine as device)."""

import numpy as np
import pytest

import qcompile
from conftest import compile_for_host, free_port
from models import assert_close, gemm_matmul, onnxruntime_outputs, random_inputs
from qcompile.cli import main
from qcompile.errors import DeviceError


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    return compile_for_host(tmp_path_factory.mktemp("rpc"), gemm_matmul())


def test_run_through_the_tracker(host_device, compiled):
    model = gemm_matmul()
    feeds = random_inputs(model)
    with qcompile.load(compiled, rpc_tracker=host_device["tracker"],
                       rpc_key=host_device["key"]) as loaded:
        assert loaded.where.startswith("host-test@127.0.0.1:")
        actual = loaded.run(feeds)
        assert_close(actual["y"], onnxruntime_outputs(model, feeds)["y"])
        latency = loaded.benchmark(feeds, repeat=3)
    assert 0 < latency.min_ms <= latency.median_ms <= latency.p90_ms


def test_cli_run_through_the_tracker(host_device, compiled, tmp_path, capsys):
    np.savez(tmp_path / "x.npz", **random_inputs(gemm_matmul()))
    assert main(["run", str(compiled), "--inputs", str(tmp_path / "x.npz"), "--rpc-tracker",
                 host_device["tracker"], "--rpc-key", host_device["key"], "--repeat", "3"]) == 0
    assert "latency on host-test@127.0.0.1" in capsys.readouterr().out


def test_unreachable_tracker_names_the_address(compiled):
    port = free_port()  # nothing listens there
    with pytest.raises(DeviceError) as err:
        qcompile.load(compiled, rpc_tracker=f"127.0.0.1:{port}", rpc_key="host-test")
    assert f"127.0.0.1:{port}" in str(err.value)


def test_unknown_key_lists_the_keys(host_device, compiled):
    with pytest.raises(DeviceError) as err:
        qcompile.load(compiled, rpc_tracker=host_device["tracker"], rpc_key="pixel-9")
    assert "'pixel-9'" in str(err.value) and "host-test" in str(err.value)


def test_malformed_tracker_address(compiled, capsys):
    assert main(["run", str(compiled), "--rpc-tracker", "localhost", "--rpc-key", "k"]) == 2
    assert "HOST:PORT" in capsys.readouterr().err
