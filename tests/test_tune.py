"""Tuning on this machine (the host target): a quantized model's kernels tuned with MetaSchedule
into a log that says what it was measured for; a second run resumes from it; compile applies it
(explicitly, or the shipped one) with unchanged numerics; logs for another target or TVM are
refused (damaged ones: test_bad_logs.py). Tuning over RPC on the emulated phone is in
test_device.py."""

import json
import re
import shutil

import numpy as np
import pytest

import qcompile
from models import packed_convnet, random_inputs
from qcompile.cli import main
from qcompile.errors import InputError
from qcompile.devices import LocalDevice
from qcompile.tune import _record_threads
from qcompile.tuning_log import INFO_FILE, RECORDS_FILE, open_database, open_log

TRIALS = 4


def calibration():
    return [random_inputs(packed_convnet(), seed=10 + i) for i in range(8)]


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """packed_convnet in int8, tuned twice into the same log (the second run resumes)."""
    import io
    import contextlib

    work = tmp_path_factory.mktemp("tune")
    path = work / "model.onnx"
    import onnx

    onnx.save(packed_convnet(), str(path))
    first_progress = io.StringIO()
    with contextlib.redirect_stderr(first_progress):
        first = qcompile.tune(path, "host", work / "log", trials=TRIALS, quantize="int8",
                              calibration=calibration())
    second = qcompile.tune(path, "host", work / "log", trials=TRIALS, quantize="int8",
                           calibration=calibration())
    return {"path": path, "log": work / "log", "first": first, "second": second,
            "progress": first_progress.getvalue()}


def test_tune_records_every_kernel_and_what_it_was_measured_for(tuned):
    first = tuned["first"]
    assert len(first.tasks) >= 6  # convs, Gemm, pooling, requantize kernels
    # no layout changes around the int8 kernels: only the input's (NCHW -> NHWC) and the one
    # before the flatten (requantize clamps used to be clips, which ConvertLayout wraps in two)
    assert sum("transpose" in t.name for t in first.tasks) <= 2
    convs = [t for t in first.tasks if "packed_conv2d" in t.name]
    assert len(convs) == 2 and all(t.best_us and t.gops for t in convs)
    # our default schedule of each conv/matmul kernel was measured as its first candidate
    assert all(t.default_us is not None and t.best_us <= t.default_us for t in convs)
    assert all(t.default_us is None for t in first.tasks if "conv2d" not in t.name
               and "matmul" not in t.name and "depthwise" not in t.name)
    assert all(t.records >= 1 for t in first.tasks)
    assert sum(t.new_trials for t in first.tasks) == sum(t.records for t in first.tasks)
    info = json.loads((tuned["log"] / INFO_FILE).read_text())
    assert info["target"] == "host" and info["tvm"] and info["module_equality"]
    # measured on the thread count this process's runtime runs models with
    threads = LocalDevice().threads()
    assert info["measured_threads"] == threads >= 1
    # a line per batch: kernel, trials done / budget, best latency, GOPS, ETA
    assert f"/{TRIALS} trials, best " in tuned["progress"] and "GOPS" in tuned["progress"]
    table = first.describe()
    assert "new measurement" in table and "GOPS" in table and str(tuned["log"]) in table
    assert f"on this machine with {threads} thread(s)" in table


def test_tuning_with_another_thread_count_than_the_log_warns(tuned, tmp_path, caplog):
    log = tmp_path / "log"
    shutil.copytree(tuned["log"], log)
    threads = LocalDevice().threads()
    info = json.loads((log / INFO_FILE).read_text())
    (log / INFO_FILE).write_text(json.dumps({**info, "measured_threads": threads + 1}))
    with caplog.at_level("WARNING", logger="qcompile"):
        where = _record_threads(log, LocalDevice(), open_database(log))
    assert where == f"this machine with {threads} thread(s)"
    assert f"measured with {threads + 1} thread(s), and this run measures with {threads}" \
        in caplog.text and f"TVM_NUM_THREADS={threads + 1}" in caplog.text
    assert json.loads((log / INFO_FILE).read_text())["measured_threads"] == threads


def test_a_second_tune_resumes_from_the_log(tuned):
    first, second = tuned["first"], tuned["second"]
    done = {t.name for t in first.tasks if t.records >= TRIALS or "packed" not in t.name
            and "conv2d" not in t.name and "mean" not in t.name}
    again = {t.name: t for t in second.tasks}
    assert all(again[name].new_trials == 0 for name in done)
    assert sum(t.new_trials for t in second.tasks) < sum(t.new_trials for t in first.tasks)
    assert all(again[t.name].records >= t.records for t in first.tasks)  # nothing lost
    assert "reused" in second.describe()


def test_compile_applies_the_log_with_identical_numerics(tuned, tmp_path):
    tuned_build = qcompile.compile(tuned["path"], "host", tmp_path / "tuned", quantize="int8",
                                   calibration=calibration(), tuning_log=tuned["log"])
    kernels = tuned_build.manifest.kernels
    assert kernels["tuned"] == kernels["total"] and kernels["tuning_log"] == str(tuned["log"])
    plain = qcompile.compile(tuned["path"], "host", tmp_path / "plain", quantize="int8",
                             calibration=calibration())
    assert plain.manifest.kernels["tuned"] == 0
    for seed in range(3):
        feeds = random_inputs(packed_convnet(), seed=seed)
        with qcompile.load(tuned_build.directory) as a, qcompile.load(plain.directory) as b:
            assert np.array_equal(a.run(feeds)["y"], b.run(feeds)["y"])


def test_a_one_trial_tune_records_the_default_schedules_and_compile_replays_them(tuned,
                                                                                 tmp_path):
    """With one trial per kernel, each conv/matmul kernel's record is our default schedule
    (measured, not searched): compile replays those traces and computes the same integers."""
    log = qcompile.tune(tuned["path"], "host", tmp_path / "one", trials=1, quantize="int8",
                        calibration=calibration())
    convs = [t for t in log.tasks if "packed_conv2d" in t.name]
    assert convs and all(t.records == 1 and t.default_us == t.best_us for t in convs)
    replayed = qcompile.compile(tuned["path"], "host", tmp_path / "replayed", quantize="int8",
                                calibration=calibration(), tuning_log=log.directory)
    kernels = replayed.manifest.kernels
    assert kernels["tuned"] == kernels["total"] and kernels["int8_default_schedules"] == 0
    plain = qcompile.compile(tuned["path"], "host", tmp_path / "plain", quantize="int8",
                             calibration=calibration(), tuning_log=False)
    feeds = random_inputs(packed_convnet(), seed=1)
    with qcompile.load(replayed.directory) as a, qcompile.load(plain.directory) as b:
        assert np.array_equal(a.run(feeds)["y"], b.run(feeds)["y"])


def test_a_pruned_log_keeps_the_best_record_of_every_kernel(tuned, tmp_path):
    """What ships in tuning_logs/ is pruned to the best records: it still tunes every kernel."""
    from qcompile.tuning_log import prune

    kept = prune(tuned["log"], tmp_path / "pruned", keep=1)
    assert kept == sum(1 for t in tuned["second"].tasks if t.best_us is not None)
    for line in (tmp_path / "pruned" / RECORDS_FILE).read_text().splitlines():
        run_secs = json.loads(line)[1][1]  # [workload, [trace, run_secs, ...]]
        assert run_secs and max(float(t) for t in run_secs) < 1e9  # no failed run ships
    artifact = qcompile.compile(tuned["path"], "host", tmp_path / "out", quantize="int8",
                                calibration=calibration(), tuning_log=tmp_path / "pruned")
    assert artifact.manifest.kernels["tuned"] == artifact.manifest.kernels["total"]
    # the candidates pruning dropped still count: tuning on the pruned log (as on a shipped
    # one) measures no more than on the full log
    info = json.loads((tmp_path / "pruned" / INFO_FILE).read_text())
    assert sum(info["pruned_trials"].values()) > 0
    again = qcompile.tune(tuned["path"], "host", tmp_path / "pruned", trials=TRIALS,
                          quantize="int8", calibration=calibration())
    full = {t.name: t for t in tuned["second"].tasks}
    assert all(t.new_trials <= max(0, TRIALS - full[t.name].records) for t in again.tasks)
    assert any(full[t.name].records >= TRIALS > t.records for t in again.tasks)


def test_a_dropped_kernel_leaves_the_log_and_is_tuned_again(tuned, tmp_path):
    """prune(drop=...) (bench/tuned_vs_default.py --drop-slower: records that lost to a newer
    default schedule): the kernel has no record left, its default runs, and a tune on the
    pruned log searches it again while the other kernels keep their records."""
    from qcompile.tuning_log import open_database, prune, workload_key

    keys = sorted({workload_key(r.workload.mod)
                   for r in open_database(tuned["log"]).get_all_tuning_records()})
    dropped = keys[0]
    prune(tuned["log"], tmp_path / "pruned", keep=1, drop=frozenset([dropped]))
    left = {workload_key(r.workload.mod)
            for r in open_database(tmp_path / "pruned").get_all_tuning_records()}
    assert left == set(keys) - {dropped}
    info = json.loads((tmp_path / "pruned" / INFO_FILE).read_text())
    assert dropped not in info["pruned_trials"]
    artifact = qcompile.compile(tuned["path"], "host", tmp_path / "out", quantize="int8",
                                calibration=calibration(), tuning_log=tmp_path / "pruned")
    assert artifact.manifest.kernels["tuned"] == artifact.manifest.kernels["total"] - 1


def test_records_that_do_not_replay_leave_the_build_working(tuned, tmp_path):
    """Records keyed by anchor block can match a kernel they cannot be replayed on (here the
    fp32 model's pooling matches the int8 one's, whose epilogue differs): TVM's pass would
    fail the whole build; the kernel keeps its default code and the outputs stay right."""
    from models import assert_close, onnxruntime_outputs

    artifact = qcompile.compile(tuned["path"], "host", tmp_path / "fp32",
                                tuning_log=tuned["log"])
    feeds = random_inputs(packed_convnet(), seed=4)
    with qcompile.load(artifact.directory) as loaded:
        assert_close(loaded.run(feeds)["y"], onnxruntime_outputs(packed_convnet(), feeds)["y"])


def test_reuse_log_copies_the_records_that_apply_into_a_new_log(tuned, tmp_path):
    """--reuse-log: the same int8 model tuned into a new log, reusing the first one: the
    records that replay are copied under this model's kernels (with the candidates the first
    log had), the new log loads, and little is left to search."""
    from qcompile.tuning_log import open_database

    again = qcompile.tune(tuned["path"], "host", tmp_path / "new", trials=TRIALS,
                          quantize="int8", calibration=calibration(), reuse_log=tuned["log"])
    full = {t.name: t for t in tuned["second"].tasks}
    reused = [t for t in again.tasks if full[t.name].best_us is not None]
    assert reused and all(t.records >= 1 for t in reused)
    assert sum(t.new_trials for t in again.tasks) < sum(t.new_trials for t in tuned["first"].tasks)
    assert open_database(tmp_path / "new").get_all_tuning_records()


def test_records_apply_to_the_same_convs_calibrated_differently(tuned, tmp_path):
    """Records are keyed by each kernel's conv/matmul, not by the requantization constants
    that the calibration data decides: another calibration still finds the tuned convs."""
    other = [{"x": 0.5 * f["x"]} for f in calibration()]
    artifact = qcompile.compile(tuned["path"], "host", tmp_path / "out", quantize="int8",
                                calibration=other, tuning_log=tuned["log"])
    assert artifact.manifest.kernels["tuned"] >= 4


def test_compile_uses_the_shipped_log_when_it_fits(tuned, tmp_path, monkeypatch, caplog):
    import qcompile.tuning_log as tuning_log

    shipped = tmp_path / "shipped"
    shutil.copytree(tuned["log"], shipped / "host")
    monkeypatch.setattr(tuning_log, "shipped_dir", lambda: shipped)
    with caplog.at_level("INFO", logger="qcompile"):
        artifact = qcompile.compile(tuned["path"], "host", tmp_path / "out", quantize="int8",
                                    calibration=calibration())
    assert artifact.manifest.kernels["tuning_log"] == str(shipped / "host")
    assert artifact.manifest.kernels["tuned"] == artifact.manifest.kernels["total"]
    assert "using the shipped tuning log" in caplog.text
    # a shipped log measured with another TVM is skipped, saying why
    info = json.loads((shipped / "host" / INFO_FILE).read_text())
    (shipped / "host" / INFO_FILE).write_text(json.dumps({**info, "tvm": "0.19.0"}))
    with caplog.at_level("INFO", logger="qcompile"):
        artifact = qcompile.compile(tuned["path"], "host", tmp_path / "out2", quantize="int8",
                                    calibration=calibration())
    assert artifact.manifest.kernels["tuning_log"] is None
    assert "TVM 0.19.0" in caplog.text


def test_a_log_from_another_tvm_or_target_is_refused(tuned, tmp_path):
    log = tmp_path / "log"
    shutil.copytree(tuned["log"], log)
    with pytest.raises(InputError) as err:
        qcompile.compile(tuned["path"], "arm64-dotprod", tmp_path / "out", quantize="int8",
                         calibration=calibration(), tuning_log=log)
    assert "does not fit target 'arm64-dotprod'" in str(err.value)
    assert "'host'" in str(err.value)
    info = json.loads((log / INFO_FILE).read_text())
    (log / INFO_FILE).write_text(json.dumps({**info, "tvm": "0.19.0"}))
    with pytest.raises(InputError, match="measured with TVM 0.19.0"):
        qcompile.compile(tuned["path"], "host", tmp_path / "out", tuning_log=log)
    with pytest.raises(InputError, match="belongs to another target or TVM"):
        qcompile.tune(tuned["path"], "host", log, trials=1)



def test_cli_refuses_a_log_of_another_tvm_or_a_broken_one(tuned, tmp_path, capsys):
    log = tmp_path / "log"
    shutil.copytree(tuned["log"], log)
    info = json.loads((log / INFO_FILE).read_text())
    (log / INFO_FILE).write_text(json.dumps({**info, "tvm": "0.19.0"}))
    args = ["compile", str(tuned["path"]), "-o", str(tmp_path / "out"), "--tuning-log", str(log)]
    assert main(args) == 2
    assert "measured with TVM 0.19.0" in capsys.readouterr().err
    (log / INFO_FILE).write_text("{not json")
    assert main(args) == 2
    err = capsys.readouterr().err
    assert INFO_FILE in err and "is not valid JSON" in err


def test_cli_tune_refuses_a_reuse_log_of_another_tvm_or_not_a_log(tuned, tmp_path, capsys):
    log = tmp_path / "old"
    shutil.copytree(tuned["log"], log)
    info = json.loads((log / INFO_FILE).read_text())
    (log / INFO_FILE).write_text(json.dumps({**info, "tvm": "0.19.0"}))
    base = ["tune", str(tuned["path"]), "--log", str(tmp_path / "new"), "--trials", "1"]
    assert main([*base, "--reuse-log", str(log)]) == 2
    assert "measured with TVM 0.19.0" in capsys.readouterr().err
    assert main([*base, "--reuse-log", str(tmp_path / "missing")]) == 2
    assert "is not a tuning log" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()  # refused before any work


def test_cli_tune_refuses_auto_and_explains(tuned, capsys):
    code = main(["tune", str(tuned["path"]), "--quantize", "auto"])
    assert code == 2
    assert "--precision-rules" in capsys.readouterr().err
    code = main(["tune", str(tuned["path"]), "--quantize", "int8"])
    assert code == 2 and "--calibration" in capsys.readouterr().err


def _conv_then(residual: bool):
    """A 1x1 conv of 16 channels, then ReLU; with `residual`, the input is added first (the
    add fuses into the conv's kernel: the same anchor, another epilogue)."""
    from onnx import helper

    from models import _w, make_model

    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv")]
    if residual:
        nodes.append(helper.make_node("Add", ["c", "x"], ["s"], name="add"))
    nodes.append(helper.make_node("Relu", ["s" if residual else "c"], ["y"], name="relu"))
    return make_model(nodes, [("x", [1, 16, 8, 8])], [("y", [1, 16, 8, 8])],
                      [_w("w", (16, 16, 1, 1), 31, 0.2), _w("b", (16,), 32)])


@pytest.mark.slow  # a tune or two of a minute: the slow tier
def test_a_kernel_fused_differently_from_the_logs_is_left_untuned_and_said(save_model,
                                                                           tmp_path, caplog):
    """A log tuned on conv+ReLU, then a model whose same conv has a residual add fused in:
    MetaSchedule would file the new kernel's records under the logged one (records are keyed
    by anchor) and break the log's loading. It is skipped with a warning naming the way out;
    the log still loads."""
    import logging

    from qcompile.tuning_log import open_database

    log_dir = tmp_path / "log"
    for residual in (False, True):
        model = _conv_then(residual)
        path = save_model(model, f"model{int(residual)}.onnx")
        calibration = [random_inputs(model, seed=i) for i in range(4)]
        with caplog.at_level(logging.WARNING, logger="qcompile"):
            result = qcompile.tune(path, "host", log_dir, trials=1, quantize="int8",
                                   calibration=calibration)
    skipped = [r.getMessage() for r in caplog.records if "is not tuned" in r.getMessage()]
    assert len(skipped) == 1
    assert "differently fused kernel" in skipped[0] and f"--reuse-log {log_dir}" in skipped[0]
    name = skipped[0].split()[1]
    assert [t.new_trials for t in result.tasks if t.name == name] == [0]
    assert open_database(log_dir).get_all_tuning_records()  # still loads


def test_a_model_with_nothing_to_tune_is_refused_without_leaving_a_log(save_model, tmp_path,
                                                                       capsys):
    from onnx import helper

    from models import make_model

    path = save_model(make_model([helper.make_node("Identity", ["x"], ["y"], name="same")],
                                 [("x", [1, 4, 4])], [("y", [1, 4, 4])]))
    with pytest.raises(InputError, match="has no kernel to tune for host.*Compile it directly"):
        qcompile.tune(path, "host", tmp_path / "log", trials=1)
    assert not (tmp_path / "log").exists()
    assert main(["tune", str(path), "--target", "host", "--log", str(tmp_path / "log"),
                 "--trials", "1"]) == 2
    assert "has no kernel to tune" in capsys.readouterr().err


@pytest.mark.slow  # a tune or two of a minute: the slow tier
def test_tunes_work_whatever_handlers_are_on_metaschedules_logger(save_model, tmp_path):
    """Handlers the application attached to MetaSchedule's logger, one unnamed (pytest's log
    capture attaches such a one to every logger that does not propagate) and one named: two
    tunes in a row both work, and the handlers are still attached and hear the tune."""
    import io
    import logging

    from models import conv_relu

    logger = logging.getLogger("tvm.s_tir.meta_schedule")
    unnamed, named = logging.StreamHandler(io.StringIO()), logging.StreamHandler(io.StringIO())
    named.set_name("application")
    logger.addHandler(unnamed)
    logger.addHandler(named)
    try:
        path = save_model(conv_relu())
        for directory in ("first", "second"):
            assert qcompile.tune(path, "host", tmp_path / directory, trials=1).tasks
            assert unnamed in logger.handlers and named in logger.handlers
    finally:
        logger.removeHandler(unnamed)
        logger.removeHandler(named)


def test_a_tune_failing_inside_tvm_says_so_in_one_paragraph(save_model, tmp_path, capsys):
    """MetaSchedule cannot make its logs/ folder (a file is in the way): the tune fails with
    qcompile's error, exit code 1 (not the input's fault), naming the log and the file that
    keeps the traceback; no traceback is printed."""
    from models import conv_relu

    from qcompile.errors import TuneFailed
    from qcompile.tune import FAILURE_FILE

    path = save_model(conv_relu())
    log_dir = tmp_path / "log"
    log_dir.mkdir()
    (log_dir / "logs").write_text("not a folder")
    with pytest.raises(TuneFailed, match=r"Tuning failed inside TVM.*FileExistsError.*keeps "
                                         r"the 0 record\(s\)"):
        qcompile.tune(path, "host", log_dir, trials=1)
    assert "FileExistsError" in (log_dir / FAILURE_FILE).read_text()
    assert main(["tune", str(path), "--target", "host", "--log", str(log_dir),
                 "--trials", "1"]) == 1
    err = capsys.readouterr().err
    assert str(log_dir / FAILURE_FILE) in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    (log_dir / "logs").unlink()  # out of the way: the next run tunes, and the note goes
    assert qcompile.tune(path, "host", log_dir, trials=1).tasks
    assert not (log_dir / FAILURE_FILE).exists()


@pytest.mark.slow
def test_devices_that_die_mid_tune_stop_it_with_a_clear_error(tracker, save_model, tmp_path):
    """The only device under the key dies after the first batch: the next batch fails to run,
    the tracker has no device left, and the tune stops with a DeviceError naming the key and
    the tracker; the records measured before stay in the log."""
    import sys
    import threading
    import time

    from conftest import free_port, start_process, wait_for_key
    from models import conv_relu
    from qcompile.errors import DeviceError
    from qcompile.devices.processes import stop_process_group

    key = "dying-host"
    port = free_port()
    server = start_process([sys.executable, "-m", "tvm.exec.rpc_server", "--host", "127.0.0.1",
                            "--port", str(port), "--port-end", str(port + 50), "--tracker",
                            tracker, "--key", key])
    path = save_model(conv_relu())
    log = tmp_path / "log"
    outcome = {}

    def tune():
        try:
            qcompile.tune(path, "host", log, trials=64, rpc_tracker=tracker, rpc_key=key)
        except Exception as exc:  # noqa: BLE001 - the test inspects it
            outcome["error"] = exc

    try:
        wait_for_key(tracker, key)
        thread = threading.Thread(target=tune)
        thread.start()
        deadline = time.time() + 300
        while time.time() < deadline and not (
                (log / RECORDS_FILE).is_file() and (log / RECORDS_FILE).read_text()):
            time.sleep(0.5)
    finally:
        stop_process_group(server)
    measured = (log / RECORDS_FILE).read_text().count("\n")
    thread.join(timeout=400)
    assert not thread.is_alive()
    error = outcome.get("error")
    assert isinstance(error, DeviceError), error
    assert f"'{key}'" in str(error) and tracker in str(error) and "resumes" in str(error)
    assert (log / RECORDS_FILE).read_text().count("\n") >= measured > 0


@pytest.mark.slow  # a tune or two of a minute: the slow tier
def test_ctrl_c_stops_the_tune_after_its_batch_and_it_resumes(save_model, tmp_path):
    """Ctrl-C during `qcompile tune` (MetaSchedule alone takes it for a failed build and goes
    on): the batch being measured is finished and kept, the command exits with 130 and says
    how to resume."""
    import signal
    import subprocess
    import sys
    import time

    from models import conv_relu

    path = save_model(conv_relu())
    log = tmp_path / "log"
    process = subprocess.Popen([sys.executable, "-m", "qcompile", "tune", str(path), "--trials",
                                "64", "--log", str(log)], stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None and not (
            (log / RECORDS_FILE).is_file() and (log / RECORDS_FILE).read_text()):
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=300)
    assert process.returncode == 130, err[-2000:]
    assert "Run the same command again to continue" in err
    measured = (log / RECORDS_FILE).read_text().count("\n")
    assert 0 < measured < 64
    info = json.loads((log / INFO_FILE).read_text())
    assert info["tuning_seconds"] > 0


def test_layer_latency_times_a_kernel_with_its_record_in_the_log(tuned, tmp_path, caplog):
    """--quantize auto times each layer with the schedule the build will give it: a kernel
    with a record in the tuning log the build applies is timed with that record, where the
    record replays on the cut-out layer's kernel (whose output is dequantized, not
    requantized: a trace naming the whole model's epilogue blocks may not). A log of one
    trial per kernel, so that its records (the default schedules) are the same every run."""
    import onnx

    from qcompile import layer_latency
    from qcompile.quantize.onnx_view import weighted_layers
    from qcompile.targets import load_target

    one = qcompile.tune(tuned["path"], "host", tmp_path / "one", trials=1, quantize="int8",
                        calibration=calibration())
    model = onnx.load(str(tuned["path"]))
    with caplog.at_level("INFO", logger="qcompile"):
        timed = layer_latency.measure(model, weighted_layers(model), load_target("host"),
                                      tuning_log=open_log(one.directory))
    assert all(v.int8_us and v.fallback_us for v in timed.values()), timed
    found = re.search(r"\((\d+) of (\d+) kernels with their record", caplog.text)
    assert found and int(found.group(1)) >= 1, caplog.text


def test_an_exact_log_keeps_only_kernels_whose_results_do_not_depend_on_the_schedule(
        tuned, tmp_path):
    """prune(exact=True), as the shipped logs are made: the kernels that sum in floating point
    (the global average pool of packed_convnet's int8 build) are left out, every integer
    kernel keeps its records, and a build with the log computes bit for bit what the untuned
    build computes."""
    from qcompile.tuning_log import open_log, prune, sums_in_float, workload_key

    def workloads(directory):
        records = open_log(directory).database().get_all_tuning_records()
        return {workload_key(r.workload.mod): r.workload.mod for r in records}

    full = workloads(tuned["log"])
    floats = {key for key, mod in full.items() if sums_in_float(mod)}
    assert floats and len(floats) < len(full)
    prune(tuned["log"], tmp_path / "exact", keep=1, exact=True)
    assert set(workloads(tmp_path / "exact")) == set(full) - floats
    info = json.loads((tmp_path / "exact" / INFO_FILE).read_text())
    assert not floats & set(info["default_schedules_us"]) and not floats & set(
        info["pruned_trials"])
    exact = qcompile.compile(tuned["path"], "host", tmp_path / "tuned", quantize="int8",
                             calibration=calibration(), tuning_log=tmp_path / "exact")
    assert 0 < exact.manifest.kernels["tuned"] < exact.manifest.kernels["total"]
    plain = qcompile.compile(tuned["path"], "host", tmp_path / "plain", quantize="int8",
                             calibration=calibration(), tuning_log=False)
    for seed in range(3):
        feeds = random_inputs(packed_convnet(), seed=seed)
        with qcompile.load(exact.directory) as a, qcompile.load(plain.directory) as b:
            assert np.array_equal(a.run(feeds)["y"], b.run(feeds)["y"])
