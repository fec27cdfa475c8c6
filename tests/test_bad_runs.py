"""Bad runs, outputs and addresses: each gets one paragraph naming the problem and the fix, exit
code 2 (argparse's own exit 2 for out-of-range numbers), no traceback, and nothing stale or
half-written on disk. A peer that accepts connections and never answers is an error within
seconds, not a hang (those cases run qcompile in a subprocess with a timeout)."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import threading
import time
import zipfile

import numpy as np
import pytest

import qcompile
from conftest import GENERIC_TARGET, free_port
from models import conv_relu, random_inputs
from qcompile.cli import main


def _error(capsys, argv, code: int = 2) -> str:
    assert main(argv) == code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """conv_relu saved, a generic target file, and a build of it for this machine."""
    import onnx

    work = tmp_path_factory.mktemp("bad-runs")
    onnx.save(conv_relu(), str(work / "model.onnx"))
    (work / "generic.toml").write_text(GENERIC_TARGET)
    qcompile.compile(work / "model.onnx", work / "generic.toml", work / "out")
    np.savez(work / "calib.npz", x=np.stack([random_inputs(conv_relu(), seed=i)["x"]
                                             for i in range(4)]))
    return work


def _compile_args(work, out) -> list[str]:
    return ["compile", str(work / "model.onnx"), "--target", str(work / "generic.toml"),
            "-o", str(out)]


@pytest.mark.parametrize("make, message", [
    (lambda tmp: tmp.joinpath("afile").write_text("x") and tmp / "afile", "is a file"),
    (lambda tmp: "/dev/null/out", "'/dev/null' is a file"),
    (lambda tmp: "/proc/qcompile-out", "cannot be written"),
])
def test_an_output_directory_that_cannot_be_written_is_refused_before_any_work(
        work, tmp_path, capsys, caplog, make, message):
    out = make(tmp_path)
    with caplog.at_level("INFO", logger="qcompile"):
        err = _error(capsys, _compile_args(work, out))
    assert message in err and str(out) in err and "-o" in err
    assert "importing" not in caplog.text  # refused before the model was read


def test_a_reused_output_directory_keeps_no_report_of_the_earlier_build(work, tmp_path, capsys):
    """int8 then fp32 into one OUT_DIR: the int8 build's report goes with it; inspect shows
    the new build; files of the user's own are kept."""
    out = tmp_path / "out"
    calibration = [random_inputs(conv_relu(), seed=i) for i in range(4)]
    qcompile.compile(work / "model.onnx", work / "generic.toml", out, quantize="int8",
                     calibration=calibration)
    assert (out / "quantization.json").is_file()
    (out / "notes.txt").write_text("mine")
    assert main(_compile_args(work, out)) == 0
    assert not (out / "quantization.json").exists()
    assert (out / "notes.txt").read_text() == "mine"
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "quantization:" not in shown and "fp32" in shown
    assert not list(tmp_path.glob(".qcompile-*"))  # nothing staged is left behind


def test_a_build_killed_while_linking_leaves_the_earlier_build_whole(work, tmp_path):
    """SIGKILL to compile (and its linker) mid-link: OUT_DIR keeps the earlier build byte for
    byte; the staging directory left behind goes with the next build."""
    import os
    import signal

    out = tmp_path / "out"
    shutil.copytree(work / "out", out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    linker = tmp_path / "slow-g++"
    linker.write_text('#!/bin/sh\nsleep 60\nexec g++ "$@"\n')
    linker.chmod(0o755)
    process = subprocess.Popen([sys.executable, "-m", "qcompile", *_compile_args(work, out),
                                "--cc", str(linker)], start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not list(tmp_path.glob(f".qcompile-{process.pid}-*")):
            assert process.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
        time.sleep(1)  # the linker runs
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    left = list(tmp_path.glob(f".qcompile-{process.pid}-*"))
    assert len(left) == 1
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert main(_compile_args(work, out)) == 0
    assert not left[0].exists()


def _edited(work, tmp_path, edit) -> str:
    copy = tmp_path / "edited"
    shutil.copytree(work / "out", copy)
    manifest = json.loads((copy / "model.json").read_text())
    edit(manifest)
    (copy / "model.json").write_text(json.dumps(manifest))
    return str(copy)


@pytest.mark.parametrize("edit", [
    lambda m: m["inputs"][0].update(shape=[1, 3, 16, 16]),
    lambda m: m["inputs"][0].update(dtype="float16"),
], ids=["shape", "dtype"])
def test_a_manifest_that_disagrees_with_the_library_is_refused_when_it_runs(
        work, tmp_path, capsys, edit):
    err = _error(capsys, ["run", _edited(work, tmp_path, edit), "--repeat", "1"])
    assert "model.json does not describe" in err and "Compile again" in err


def test_random_inputs_too_big_for_memory_are_refused(work, tmp_path, capsys):
    path = _edited(work, tmp_path, lambda m: m["inputs"][0].update(
        shape=[1, 3, 1_000_000, 1_000_000]))
    err = _error(capsys, ["run", path])
    assert "do not fit in memory" in err and "--input-shape" in err


def test_an_inputs_file_claiming_a_huge_array_is_refused_from_its_header(work, tmp_path,
                                                                        capsys):
    header = b"{'descr': '<f4', 'fortran_order': False, 'shape': (1000000000000,), }"
    header += b" " * (118 - len(header)) + b"\n"
    with zipfile.ZipFile(tmp_path / "huge.npz", "w") as z:
        z.writestr("x.npy", b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header
                   + b"\0" * 16)
    err = _error(capsys, ["run", str(work / "out"), "--inputs", str(tmp_path / "huge.npz")])
    assert "claims shape [1000000000000]" in err and "the file is damaged" in err


@pytest.mark.parametrize("repeat", ["0", "-3", "many"])
def test_repeat_must_be_a_positive_count(work, capsys, repeat):
    with pytest.raises(SystemExit) as exit_info:
        main(["run", str(work / "out"), "--repeat", repeat])
    assert exit_info.value.code == 2
    assert "--repeat" in capsys.readouterr().err


def test_an_output_file_that_cannot_be_written_is_refused_before_the_run(work, capsys):
    err = _error(capsys, ["run", str(work / "out"), "--output", "/dev/null/y.npz"])
    assert "--output '/dev/null/y.npz' cannot be written" in err
    assert "output y" not in capsys.readouterr().out


def test_outputs_are_saved_under_exactly_the_name_given(work, tmp_path, capsys):
    path = tmp_path / "result.bin"
    assert main(["run", str(work / "out"), "--output", str(path), "--repeat", "1"]) == 0
    assert f"saved outputs to {path}\n" in capsys.readouterr().out
    with np.load(path) as saved:
        assert saved["y"].shape == (1, 16, 16, 16)
    assert not (tmp_path / "result.bin.npz").exists()


@pytest.mark.parametrize("name", ["model.json", "quantization.json"])
def test_inspect_of_a_report_cut_short_names_the_file(work, tmp_path, capsys, name):
    copy = tmp_path / "out"
    shutil.copytree(work / "out", copy)
    text = (copy / "model.json").read_text()
    (copy / name).write_text(text[: len(text) // 2])
    err = _error(capsys, ["inspect", str(copy)])
    assert f"{copy / name}' is not valid JSON" in err and "Compile again" in err


def test_an_unexpected_error_is_one_line_asking_for_a_report(monkeypatch, capsys):
    """A bug in qcompile (here: listing targets fails) exits with code 1, not 2, with one
    line; -v adds the traceback."""
    import qcompile.targets

    def broken():
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(qcompile.targets, "list_targets", broken)
    err = _error(capsys, ["targets"], code=1)
    assert "internal error in qcompile: ZeroDivisionError: division by zero" in err
    assert "please report it" in err and len(err.strip().splitlines()) == 1
    assert main(["-v", "targets"]) == 1
    assert "Traceback" in capsys.readouterr().err


@pytest.fixture(scope="module")
def silent_peer():
    """A TCP server on loopback that accepts connections and never says anything."""
    server = socket.create_server(("127.0.0.1", 0))
    held = []
    stop = threading.Event()

    def accept():
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.getsockname()[1]}"
    finally:
        stop.set()
        thread.join()
        for connection in held:
            connection.close()
        server.close()


def _qcompile(args: list[str], timeout: float = 120) -> tuple[int, str, float]:
    start = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "qcompile", *args], capture_output=True,
                            text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    return result.returncode, result.stderr, time.monotonic() - start


@pytest.mark.parametrize("verb", ["devices", "run", "tune", "auto", "emulate"])
def test_a_peer_that_is_not_a_tracker_is_an_error_not_a_hang(work, silent_peer, verb):
    args = {"devices": ["devices", "--rpc-tracker", silent_peer],
            "run": ["run", str(work / "out"), "--rpc-tracker", silent_peer, "--rpc-key", "k"],
            "tune": ["tune", str(work / "model.onnx"), "--log", str(work / "never"),
                     "--rpc-tracker", silent_peer, "--rpc-key", "k"],
            "auto": [*_compile_args(work, work / "never"), "--quantize", "auto",
                     "--calibration", str(work / "calib.npz"), "--accuracy-budget", "0.9",
                     "--rpc-tracker", silent_peer, "--rpc-key", "k"],
            "emulate": ["device", "emulate", "--rpc-tracker", silent_peer]}[verb]
    code, err, seconds = _qcompile(args)
    assert code == 2 and "Traceback" not in err
    assert f"{silent_peer} is not a TVM RPC tracker" in err
    assert seconds < 60
    assert not (work / "never").exists()


@pytest.mark.parametrize("address, message", [
    ("127.0.0.1:99999", "has port 99999, which does not exist"),
    ("127.0.0.1:0", "has port 0, which does not exist"),
    ("localhost", "malformed: write HOST:PORT"),
])
def test_tracker_addresses_out_of_range_are_refused(capsys, address, message):
    assert message in _error(capsys, ["devices", "--rpc-tracker", address])


def test_ipv6_tracker_addresses_are_understood(capsys):
    from qcompile.devices.tracker import parse_tracker

    assert parse_tracker("[::1]:9190") == ("::1", 9190)
    port = free_port()  # nothing listens there
    err = _error(capsys, ["devices", "--rpc-tracker", f"[::1]:{port}"])
    assert f"Cannot reach the RPC tracker at [::1]:{port}" in err


@pytest.mark.parametrize("args", [["tracker", "--port", "70000"],
                                  ["device", "emulate", "--port", "0"]])
def test_listening_ports_out_of_range_are_refused(capsys, args):
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    assert "--port" in capsys.readouterr().err


@pytest.mark.parametrize("args", [["tracker", "--help"], ["device", "emulate", "--help"]])
def test_help_of_what_listens_explains_the_exposure(capsys, args):
    with pytest.raises(SystemExit):
        main(args)
    text = " ".join(capsys.readouterr().out.split())
    assert "no authentication" in text and "not a sandbox" in text
    assert "127.0.0.1" in text and "--host" in text
