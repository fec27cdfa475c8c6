"""The emulated ARM64 phone: cross-compiled .so files uploaded through a real tracker, loaded by
the aarch64 TVM runtime under qemu, run and compared with onnxruntime on this machine; tuning
measured on it; and the faults (busy keys, dead devices, missing qemu)."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import psutil
import pytest

import qcompile
from conftest import free_port, start_process, wait_for_key
from models import (NUMERIC_MODELS, assert_close, conv_relu, gemm_matmul, onnxruntime_outputs,
                    packed_convnet, random_inputs)
from qcompile.cli import main
from qcompile.errors import DeviceError
from qcompile.devices.processes import stop_process_group
from qcompile.devices.tracker import parse_tracker, request_session, tracker_status

CASES = [(name, "arm64-dotprod") for name in sorted(NUMERIC_MODELS)] + [
    ("residual_pool_concat", "arm64"), ("depthwise_grouped", "arm64-i8mm")]


@pytest.mark.parametrize("name,target", CASES)
def test_emulated_device_matches_onnxruntime(arm64_device, name, target, save_model, tmp_path):
    model = NUMERIC_MODELS[name]()
    qcompile.compile(save_model(model), target, tmp_path / "out")
    feeds = random_inputs(model)
    expected = onnxruntime_outputs(model, feeds)
    with qcompile.load(tmp_path / "out", rpc_tracker=arm64_device["tracker"],
                       rpc_key=arm64_device["key"]) as loaded:
        assert loaded.emulated and loaded.device_info["machine"] == "aarch64"
        actual = loaded.run(feeds)
    for out_name, value in expected.items():
        assert actual[out_name].dtype == value.dtype
        assert_close(actual[out_name], value)


def _outputs_on_device(device, artifacts, feeds) -> list:
    """Each build's output "y" for `feeds`, run on the emulated phone."""
    outputs = []
    for artifact in artifacts:
        with qcompile.load(artifact.directory, rpc_tracker=device["tracker"],
                           rpc_key=device["key"]) as loaded:
            outputs.append(loaded.run(feeds)["y"])
    return outputs


@pytest.mark.parametrize("target,instruction,model", [
    ("arm64-dotprod", "sdot", packed_convnet), ("arm64-i8mm", "smmla", packed_convnet),
    ("arm64-dotprod", "sdot", gemm_matmul)])
def test_packed_int8_kernels_on_the_device_match_unpacked_kernels(arm64_device, save_model,
                                                                 tmp_path, target, instruction,
                                                                 model):
    """arm64-dotprod packs int8 weights for sdot, arm64-i8mm for smmla (and sdot where pixels
    do not pair up); arm64 (neither) keeps TVM's kernels. All builds of the same quantized
    model give the same integers on the (emulated, -cpu max) phone. gemm_matmul's 10-output
    MatMul is packed with zero columns up to 12."""
    from test_int8_kernels import compile_int8, instruction_counts

    path = save_model(model())
    packed = compile_int8(path, target, tmp_path / "packed", model)
    plain = compile_int8(path, "arm64", tmp_path / "plain", model)
    assert instruction_counts(packed.library, "aarch64-linux-gnu-objdump")[instruction] > 0
    feeds = random_inputs(model(), seed=3)
    assert np.array_equal(*_outputs_on_device(arm64_device, (packed, plain), feeds))


def test_auto_times_each_layer_on_the_device(arm64_device, save_model, tmp_path):
    """--quantize auto for arm64-dotprod with a tracker: every layer's int8 and fp32 kernels
    are cross-built and timed on the (emulated) phone before the precision search."""
    model = packed_convnet()
    out = tmp_path / "auto"
    qcompile.compile(save_model(model), "arm64-dotprod", out, quantize="auto",
                     calibration=[random_inputs(model, seed=i) for i in range(8)],
                     accuracy_budget=0.9, metric="cosine", rpc_tracker=arm64_device["tracker"],
                     rpc_key=arm64_device["key"])
    search = json.loads((out / "search.json").read_text())
    assert search["latency_measured_on"] == \
        f"arm64-dotprod, device 'arm64-emu' at {arm64_device['tracker']}"
    rows = search["sensitivity"]
    assert len(rows) == 4 and all(r["int8_us"] > 0 and r["fallback_us"] > 0 for r in rows)


def _run_on_device(device_fixture, library, inputs) -> list:
    """Run a Relax VM library's "main" on the emulated phone: its outputs as numpy arrays. The
    session is released before this returns (the VM and the session reference each other: left
    to the garbage collector, the device stayed busy for the next test's minute of waiting)."""
    import gc

    import tvm
    from tvm import relax

    session = request_session(parse_tracker(device_fixture["tracker"]), device_fixture["key"])
    try:
        session.upload(str(library))
        device = session.cpu()
        vm = relax.VirtualMachine(session.load_module(library.name), device)
        vm.set_input("main", *[tvm.runtime.tensor(x, device) for x in inputs])
        vm.invoke_stateful("main")
        return [value.numpy() for value in vm.get_outputs("main")]
    finally:
        vm = device = session = None
        gc.collect()


@pytest.mark.parametrize("target", ["arm64-dotprod", "arm64-i8mm"])
def test_depthwise_kernels_match_numpy_on_the_device(arm64_device, tmp_path, target):
    """Int8 depthwise convs (test_int8_kernels.DEPTHWISE_CASES), legalized and scheduled as
    qcompile builds them for the target (4 taps per sdot), run on the emulated phone: exactly
    the integer sums of their definition."""
    import tvm
    from tvm.support import cc

    from test_int8_kernels import depthwise_module, instruction_counts
    from qcompile.lower import lower
    from qcompile.targets import load_target

    mod, images, expected = depthwise_module("int8", seed=1)
    target = load_target(target).with_compiler()
    executable = tvm.compile(lower(mod, target), target.to_tvm(), relax_pipeline=None)
    library = tmp_path / "depthwise.so"
    executable.export_library(str(library), fcompile=cc.cross_compiler(target.cc))
    assert instruction_counts(library, "aarch64-linux-gnu-objdump")["sdot"] > 0

    for value, want in zip(_run_on_device(arm64_device, library, images), expected):
        assert np.array_equal(value, want)


def test_smmla_kernel_matches_numpy_on_the_device(arm64_device, tmp_path):
    """An int8 matmul and a 3x3 conv, legalized and scheduled the way qcompile builds them
    for arm64-i8mm (packed 2x8 weight blocks, two rows per smmla), run on the emulated phone:
    exactly numpy's integer products."""
    import tvm
    from tvm import relax
    from tvm.support import cc

    from test_int8_kernels import instruction_counts
    from qcompile.lower import lower
    from qcompile.targets import load_target

    rng = np.random.default_rng(0)
    x = rng.integers(-128, 128, (6, 64)).astype("int8")
    w = rng.integers(-128, 128, (64, 32)).astype("int8")
    image = rng.integers(-128, 128, (1, 10, 12, 16)).astype("int8")  # NHWC
    kernel = rng.integers(-128, 128, (8, 3, 3, 16)).astype("int8")   # OHWI
    bb = relax.BlockBuilder()
    xv = relax.Var("x", relax.TensorType(x.shape, "int8"))
    iv = relax.Var("image", relax.TensorType(image.shape, "int8"))
    with bb.function("main", [xv, iv]):
        with bb.dataflow():
            mm = bb.emit(relax.op.matmul(xv, relax.const(w), out_dtype="int32"))
            conv = bb.emit(relax.op.nn.conv2d(iv, relax.const(kernel), padding=[1, 1, 1, 1],
                                              data_layout="NHWC", kernel_layout="OHWI",
                                              out_dtype="int32"))
            out = bb.emit_output(relax.Tuple([mm, conv]))
        bb.emit_func_output(out)
    target = load_target("arm64-i8mm").with_compiler()
    executable = tvm.compile(lower(bb.get(), target), target.to_tvm(), relax_pipeline=None)
    library = tmp_path / "smmla.so"
    executable.export_library(str(library), fcompile=cc.cross_compiler(target.cc))
    assert instruction_counts(library, "aarch64-linux-gnu-objdump")["smmla"] > 0

    got_mm, got_conv = _run_on_device(arm64_device, library, [x, image])
    assert np.array_equal(got_mm, x.astype(np.int32) @ w.astype(np.int32))
    padded = np.pad(image.astype(np.int32), [(0, 0), (1, 1), (1, 1), (0, 0)])
    expected = np.zeros((1, 10, 12, 8), np.int32)
    for r in range(3):
        for c in range(3):
            expected += np.einsum("nhwi,oi->nhwo", padded[:, r:r + 10, c:c + 12],
                                  kernel[:, r, c].astype(np.int32))
    assert np.array_equal(got_conv, expected)


def test_cli_run_labels_emulated_timings(arm64_device, save_model, tmp_path, capsys):
    model = gemm_matmul()
    assert main(["compile", str(save_model(model)), "--target", "arm64", "-o",
                 str(tmp_path / "out")]) == 0
    np.savez(tmp_path / "x.npz", **random_inputs(model))
    assert main(["run", str(tmp_path / "out"), "--inputs", str(tmp_path / "x.npz"),
                 "--output", str(tmp_path / "y.npz"), "--rpc-tracker", arm64_device["tracker"],
                 "--rpc-key", "arm64-emu", "--repeat", "2"]) == 0
    out = capsys.readouterr().out
    assert "EMULATED latency on arm64-emu@" in out and "not the phone's speed" in out
    with np.load(tmp_path / "y.npz") as saved:
        expected = onnxruntime_outputs(model, random_inputs(model))["y"]
        assert_close(saved["y"], expected)


def test_devices_lists_keys_and_counts(arm64_device, host_device, capsys):
    for key in ("arm64-emu", "host-test"):  # a session the test before held is given back
        wait_for_key(arm64_device["tracker"], key)  # to the tracker after a moment
    assert main(["devices", "--rpc-tracker", arm64_device["tracker"]]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines()
            if line.startswith(("arm64-emu ", "host-test "))}
    assert rows["arm64-emu"][:3] == ["1", "1", "0"]  # total, free, busy
    assert rows["host-test"][:3] == ["1", "1", "0"]


def test_busy_key_times_out_naming_the_key(arm64_device):
    address = parse_tracker(arm64_device["tracker"])
    held = request_session(address, "arm64-emu")  # the only device under the key
    try:
        status = {k.key: k for k in tracker_status(address).keys}
        assert status["arm64-emu"].busy == 1
        start = time.time()
        with pytest.raises(DeviceError) as err:
            request_session(address, "arm64-emu", timeout=2)
        assert time.time() - start < 10
        assert "'arm64-emu'" in str(err.value) and "busy" in str(err.value)
    finally:
        del held
        import gc

        gc.collect()
    wait_for_key(arm64_device["tracker"], "arm64-emu")


def test_tune_over_rpc_then_compile_applies_the_log(arm64_device, save_model, tmp_path):
    model = conv_relu()
    path = save_model(model)
    log = qcompile.tune(path, "arm64-dotprod", tmp_path / "log", trials=16,
                        rpc_tracker=arm64_device["tracker"], rpc_key="arm64-emu")
    assert log.emulated
    assert (tmp_path / "log" / "database_tuning_record.json").is_file()
    # the conv, and the transposes to and from NHWC around it (one trial each: no reduction)
    [task] = [t for t in log.tasks if "conv2d" in t.name]
    assert len(log.tasks) == 3 and task.records >= 16 and task.best_us > 0
    assert "EMULATED" in log.describe()

    artifact = qcompile.compile(path, "arm64-dotprod", tmp_path / "out",
                                tuning_log=tmp_path / "log")
    assert artifact.manifest.kernels["tuned"] == artifact.manifest.kernels["total"] == 3
    feeds = random_inputs(model)
    with qcompile.load(tmp_path / "out", rpc_tracker=arm64_device["tracker"],
                       rpc_key="arm64-emu") as loaded:
        assert_close(loaded.run(feeds)["y"], onnxruntime_outputs(model, feeds)["y"])


@pytest.mark.slow
@pytest.mark.parametrize("target,instruction", [("arm64-dotprod", "sdot"),
                                                ("arm64-i8mm", "smmla")])
def test_int8_kernels_tuned_over_rpc_build_and_match(arm64_device, save_model, tmp_path, target,
                                                     instruction):
    """An int8 model tuned over RPC on the emulated phone: every searched candidate of its
    packed kernels builds and runs (schedules/cpu/search_space.py; TVM's default space gave many
    that fail to build), and arm64-i8mm's smmla kernel is searched too (MetaSchedule had no
    rule that emits smmla). Built with only the searched records (our default schedules'
    records dropped), the model uses the instruction and gives exactly the integers of the
    untuned build on the (emulated, -cpu max) phone."""
    from test_int8_kernels import compile_int8, instruction_counts
    from qcompile.tuning_log import RECORDS_FILE

    path = save_model(packed_convnet())
    calibration = [random_inputs(packed_convnet(), seed=10 + i) for i in range(8)]
    log_dir = tmp_path / "log"
    log = qcompile.tune(path, target, log_dir, trials=8, quantize="int8",
                        calibration=calibration, rpc_tracker=arm64_device["tracker"],
                        rpc_key=arm64_device["key"])
    lines = (log_dir / RECORDS_FILE).read_text().splitlines()
    # (workload, trace, seconds) per record; MetaSchedule's record: [workload, [trace, secs, ..]]
    records = [(w, json.dumps(r[0]), min(r[1])) for w, r in map(json.loads, lines)]
    # our default schedules sample nothing; a searched candidate's trace always samples
    searched_workloads = {w for w, trace, _ in records if "Sample" in trace}
    keep = [i for i, (w, trace, _) in enumerate(records)
            if "Sample" in trace or w not in searched_workloads]
    # the kernels packed for the dot product (the packed depthwise conv's search is generic)
    packed = {w for w, trace, _ in records
              if "qcompile_packed_conv2d" in trace or "qcompile_packed_matmul" in trace}
    kept = [records[i] for i in keep]
    ran = sum(w in packed and secs < 1e9 for w, _, secs in kept)  # a failure is 1e10 s
    failed = sum(w in packed and secs >= 1e9 for w, _, secs in kept)
    smmla = sum("qcompile_smmla" in trace and secs < 1e9 for _, trace, secs in kept)
    # packed_convnet: 3 packed kernels (2 convs, the Gemm; on i8mm 1 smmla + 2 sdot), each with
    # our default schedule measured first and up to 7 searched candidates
    assert len(packed) == 3 and len(records) - len(kept) >= 3, (packed, len(records), len(kept))
    assert ran >= 15 and failed <= 1, (ran, failed)
    assert (smmla >= 4) == (instruction == "smmla"), smmla
    assert all(task.records >= 1 for task in log.tasks)
    (log_dir / RECORDS_FILE).write_text("".join(lines[i] + "\n" for i in keep))

    tuned = qcompile.compile(path, target, tmp_path / "tuned", quantize="int8",
                             calibration=calibration, tuning_log=log_dir)
    assert tuned.manifest.kernels["tuned"] == tuned.manifest.kernels["total"]
    assert instruction_counts(tuned.library, "aarch64-linux-gnu-objdump")[instruction] > 0
    untuned = compile_int8(path, target, tmp_path / "untuned")
    feeds = random_inputs(packed_convnet(), seed=3)
    assert np.array_equal(*_outputs_on_device(arm64_device, (tuned, untuned), feeds))


@pytest.mark.slow
def test_a_killed_tune_resumes_from_what_it_measured(arm64_device, save_model, tmp_path):
    """`qcompile tune` over RPC killed (SIGKILL) after its first measurements: running it
    again keeps those records and measures only the rest of the budget."""
    from qcompile.tuning_log import RECORDS_FILE

    path = save_model(conv_relu())
    log = tmp_path / "log"
    args = [sys.executable, "-m", "qcompile", "tune", str(path), "--target", "arm64-dotprod",
            "--trials", "24", "--log", str(log), "--rpc-tracker", arm64_device["tracker"],
            "--rpc-key", arm64_device["key"]]
    process = start_process(args)
    try:
        deadline = time.time() + 400
        while time.time() < deadline and process.poll() is None:
            records = log / RECORDS_FILE
            if records.is_file() and records.read_text().count("\n") >= 1:
                break
            time.sleep(0.5)
    finally:
        os.killpg(process.pid, signal.SIGKILL)  # no chance to clean up
        process.wait()
    assert process.returncode != 0, "the tune finished before it could be interrupted"
    measured = (log / RECORDS_FILE).read_text().count("\n")
    assert 1 <= measured < 24
    wait_for_key(arm64_device["tracker"], arm64_device["key"])
    resumed = qcompile.tune(path, "arm64-dotprod", log, trials=24,
                            rpc_tracker=arm64_device["tracker"], rpc_key=arm64_device["key"])
    # the conv, tuned first (the most operations), and the transposes to and from NHWC
    [task] = [t for t in resumed.tasks if "conv2d" in t.name]
    assert task.records >= measured and task.new_trials <= 24 - measured
    assert task.records == measured + task.new_trials


def test_tune_without_a_device_under_the_key(arm64_device, save_model, tmp_path):
    with pytest.raises(DeviceError) as err:
        qcompile.tune(save_model(conv_relu()), "arm64", tmp_path / "log", trials=2,
                      rpc_tracker=arm64_device["tracker"], rpc_key="pixel-9")
    assert "'pixel-9'" in str(err.value) and "arm64-emu" in str(err.value)
    assert not (tmp_path / "log").exists()  # nothing written before a device is found


def _newest_qemu_descendant(pid: int) -> psutil.Process:
    procs = [p for p in psutil.Process(pid).children(recursive=True)
             if "qemu" in " ".join(p.cmdline())]
    return max(procs, key=lambda p: p.create_time())


def test_device_death_is_a_clear_error_and_the_device_comes_back(tracker, host_device,
                                                                  save_model, tmp_path):
    """`qcompile device emulate` supervises its device: a session worker killed mid-session
    gives the client a DeviceError, the tracker and other devices keep working, and the
    device registers again."""
    model = gemm_matmul()
    feeds = random_inputs(model)
    qcompile.compile(save_model(model), "arm64", tmp_path / "arm")
    qcompile.compile(tmp_path / "model.onnx", "host", tmp_path / "host")
    output = open(tmp_path / "emulate.log", "w")
    cli = start_process([sys.executable, "-m", "qcompile", "device", "emulate", "--rpc-tracker",
                         tracker, "--rpc-key", "arm64-crash", "--port", str(free_port())],
                        stdout=output, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 180  # wait for the command to say that its device is ready
        while "registered under key 'arm64-crash'" not in (tmp_path / "emulate.log").read_text():
            assert time.time() < deadline and cli.poll() is None, \
                (tmp_path / "emulate.log").read_text()
            time.sleep(0.5)
        loaded = qcompile.load(tmp_path / "arm", rpc_tracker=tracker, rpc_key="arm64-crash")
        loaded.run(feeds)
        _newest_qemu_descendant(cli.pid).kill()  # the worker serving this session
        with pytest.raises(DeviceError) as err:
            loaded.run(feeds)
        assert "arm64-crash" in str(err.value) and "failed during the session" in str(err.value)
        loaded.close()

        # The tracker answers and the other device works.
        with qcompile.load(tmp_path / "host", rpc_tracker=tracker, rpc_key="host-test") as other:
            assert_close(other.run(feeds)["y"], onnxruntime_outputs(model, feeds)["y"])

        # The supervisor notices that the server stopped serving and starts it again.
        try:
            wait_for_key(tracker, "arm64-crash", timeout=180)
        except TimeoutError:
            pytest.fail("the device did not come back:\n" + (tmp_path / "emulate.log").read_text())
        with qcompile.load(tmp_path / "arm", rpc_tracker=tracker,
                           rpc_key="arm64-crash") as again:
            assert_close(again.run(feeds)["y"], onnxruntime_outputs(model, feeds)["y"])
    finally:
        group = [p.pid for p in psutil.Process(cli.pid).children(recursive=True)]
        stop_process_group(cli)  # SIGTERM: the command stops its own devices
    assert not [pid for pid in group if psutil.pid_exists(pid)
                and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]


def test_missing_qemu_names_the_debian_package(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert main(["device", "emulate", "--rpc-tracker", "127.0.0.1:9"]) == 2
    assert "qemu-user-static" in capsys.readouterr().err


def test_emulate_with_unreachable_tracker_names_the_address(arm64_device, capsys):
    port = free_port()
    assert main(["device", "emulate", "--rpc-tracker", f"127.0.0.1:{port}"]) == 2
    assert f"127.0.0.1:{port}" in capsys.readouterr().err


def test_tracker_command_serves_and_refuses_a_busy_port(tmp_path):
    port = free_port()
    proc = start_process([sys.executable, "-m", "qcompile", "tracker", "--port", str(port)])
    try:
        deadline = time.time() + 60
        while True:
            try:
                status = tracker_status(("127.0.0.1", port))
                break
            except DeviceError:
                assert time.time() < deadline and proc.poll() is None
                time.sleep(0.3)
        assert status.keys == () and "No devices are registered" in status.describe()
        second = start_process([sys.executable, "-m", "qcompile", "tracker", "--port",
                                str(port)], stderr=open(tmp_path / "err", "w"))
        assert second.wait(timeout=60) == 2
        assert "Another tracker may already run there" in (tmp_path / "err").read_text()
    finally:
        stop_process_group(proc)
    assert proc.returncode is not None
