"""`qcompile profile`: every kernel the VM calls gets a row; shares add up; int8 kernels are
labelled int8; a conv kernel's operations are the conv's 2 x MACs computed from its shapes; the
roofline follows the peaks; JSON holds every row; bad input is one paragraph, exit code 2.
No assertion on a time (they drift 2x on a shared machine) beyond being positive."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

import qcompile
from models import conv_relu, packed_convnet, random_inputs
from qcompile.cli import main
from qcompile.errors import InputError
from qcompile.profile import profile

PEAKS = {"int8": 1000.0, "fp32": 200.0, "memory": 20.0}  # given, so nothing is measured
PEAK_ARGS = [arg for name, value in PEAKS.items() for arg in ("--peak", f"{name}={value}")]


def macs(model: onnx.ModelProto) -> dict[str, int]:
    """Each Conv's and Gemm's multiply-accumulates, from its weight's and output's shapes."""
    inferred = onnx.shape_inference.infer_shapes(model)
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in [*inferred.graph.value_info, *inferred.graph.output]}
    weights = {w.name: onnx.numpy_helper.to_array(w) for w in model.graph.initializer}
    found = {}
    for node in model.graph.node:
        if node.op_type in ("Conv", "Gemm"):
            weight = weights[node.input[1]]
            per_output = np.prod(weight.shape[1:])  # Conv: in/groups x kh x kw; Gemm: K
            found[node.name] = int(np.prod(shapes[node.output[0]]) * per_output)
    return found


@pytest.fixture(scope="module")
def int8_build(tmp_path_factory):
    work = tmp_path_factory.mktemp("profile-int8")
    onnx.save(packed_convnet(), str(work / "model.onnx"))
    calibration = [random_inputs(packed_convnet(), seed) for seed in range(4)]
    qcompile.compile(work / "model.onnx", "host", work / "out", quantize="int8",
                     calibration=calibration)
    return work / "out"


@pytest.fixture(scope="module")
def int8_profile(int8_build):
    return profile(int8_build, random_inputs(packed_convnet()), repeat=2, peaks=PEAKS)


@pytest.fixture(scope="module")
def fp32_build(tmp_path_factory):
    work = tmp_path_factory.mktemp("profile-fp32")
    onnx.save(conv_relu(), str(work / "model.onnx"))
    qcompile.compile(work / "model.onnx", "host", work / "out", tuning_log=False)
    return work / "out"


def test_every_kernel_has_a_row_and_the_shares_add_up(int8_build, int8_profile):
    functions = json.loads((int8_build / "model.json").read_text())["kernels"]["functions"]
    assert {k.name for k in int8_profile.kernels} == set(functions)
    assert len(int8_profile.kernels) == len(functions)  # one row per kernel
    assert sum(k.share for k in int8_profile.kernels) == pytest.approx(1.0, abs=1e-9)
    times = [k.total_us for k in int8_profile.kernels]
    assert times == sorted(times, reverse=True) and min(times) > 0
    for k in int8_profile.kernels:
        assert k.calls == 1 and k.bytes > 0 and 0 < k.share <= 1
        assert k.gbps == pytest.approx(k.bytes / (k.total_us * 1e3))
        assert k.in_model_us > 0  # each call timed again as the model runs it
    assert int8_profile.in_model_ms == pytest.approx(
        sum(k.in_model_us for k in int8_profile.kernels) / 1e3)
    assert int8_profile.run_ms > 0 and int8_profile.device == "this machine"


def test_int8_kernels_are_labelled_int8_and_count_their_convs_macs(int8_profile):
    expected = macs(packed_convnet())  # conv3x3, pointwise, depthwise, fc
    # the packed depthwise kernel computes each 3x3 window row's taps 4 at a time: 12 taps
    # per output, 3 of them on zero weights (counted: the instructions do them)
    expected["depthwise"] = expected["depthwise"] * 12 // 9
    counted = [k for k in int8_profile.kernels if k.ops]
    assert sorted(k.ops for k in counted) == sorted(2 * m for m in expected.values())
    assert {k.precision for k in counted} == {"int8"}
    conv = next(k for k in counted if k.ops == 2 * expected["conv3x3"])
    assert "conv2d" in conv.name
    assert conv.gops == pytest.approx(conv.ops / (conv.total_us * 1e3))
    quantize = next(k for k in int8_profile.kernels if k.name.startswith("fused_divide"))
    assert quantize.precision == "fp32" and quantize.ops is None  # reads the float input


def test_the_roofline_follows_the_given_peaks(int8_profile):
    assert int8_profile.peaks.measured == () and int8_profile.peaks.gbps == PEAKS["memory"]
    for k in int8_profile.kernels:
        if k.ops:
            attainable = min(PEAKS["int8"], k.ops / k.bytes * PEAKS["memory"])
            assert k.of_peak == pytest.approx(k.gops / attainable)
            assert k.bound == ("compute" if PEAKS["int8"] <= k.ops / k.bytes * PEAKS["memory"]
                               else "memory")
        else:
            assert k.bound == "memory" and k.of_peak == pytest.approx(k.gbps / PEAKS["memory"])


def test_fp32_conv_and_no_tuned_column_without_a_tuning_log(fp32_build, capsys):
    result = profile(fp32_build, repeat=2, peaks=PEAKS)
    # the conv, and the transposes to and from NHWC around it
    (conv,) = [k for k in result.kernels if "conv2d" in k.name]
    assert len(result.kernels) == 3 and conv.precision == "fp32"
    assert conv.ops == 2 * macs(conv_relu())["conv"]
    assert result.tuning_log is None and conv.tuned is None
    assert main(["profile", str(fp32_build), "--repeat", "1", *PEAK_ARGS]) == 0  # random inputs
    header = capsys.readouterr().out.splitlines()[1]
    assert "GOPS" in header and "tuned" not in header


def test_the_tuned_column_shows_the_records_the_manifest_names(int8_build, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(int8_build, copy)
    manifest = json.loads((copy / "model.json").read_text())
    manifest["kernels"]["tuning_log"] = "logs/host"
    name = sorted(manifest["kernels"]["functions"])[0]
    manifest["kernels"]["functions"][name]["tuned"] = True
    (copy / "model.json").write_text(json.dumps(manifest))
    result = profile(copy, repeat=1, peaks=PEAKS)
    assert {k.name: k.tuned for k in result.kernels}[name] is True
    assert sum(1 for k in result.kernels if k.tuned) == 1
    lines = result.table(top=20).splitlines()
    assert lines[1].endswith("tuned")
    assert [line.split()[-1] for line in lines[2:2 + len(result.kernels)]].count("yes") == 1


def test_a_build_without_kernel_facts_still_profiles(int8_build, tmp_path):
    copy = tmp_path / "old"
    shutil.copytree(int8_build, copy)
    manifest = json.loads((copy / "model.json").read_text())
    del manifest["kernels"]["functions"]
    (copy / "model.json").write_text(json.dumps(manifest))
    result = profile(copy, repeat=1, peaks=PEAKS)
    assert all(k.ops is None and k.tuned is None for k in result.kernels)
    packed = [k for k in result.kernels if "packed_conv2d" in k.name]
    assert packed and {k.precision for k in packed} == {"int8"}  # from its arguments' dtypes
    assert "no operation counts" in result.table()


def test_peaks_are_measured_once_and_cached(int8_build, tmp_path, monkeypatch):
    import qcompile.profile as profiling

    monkeypatch.setenv("QCOMPILE_CACHE_DIR", str(tmp_path))
    first = profile(int8_build, repeat=1, peaks={"memory": 20.0})
    assert first.peaks.measured == ("int8",) and first.peaks.gops["int8"] > 0
    assert (tmp_path / "peaks.json").is_file()
    assert "measured: int8" in first.table() and "given: memory" in first.table()

    def measure_again(*_args):
        raise AssertionError("measured again")

    monkeypatch.setattr(profiling, "_measure", measure_again)
    second = profile(int8_build, repeat=1, peaks={"memory": 20.0})
    assert second.peaks.gops == first.peaks.gops


def test_cli_prints_the_table_and_writes_every_row(int8_build, tmp_path, capsys):
    np.savez(tmp_path / "x.npz", **random_inputs(packed_convnet()))
    out = tmp_path / "profile.json"
    assert main(["profile", str(int8_build), "--inputs", str(tmp_path / "x.npz"), "--repeat",
                 "2", "--top", "3", "--json", str(out), *PEAK_ARGS]) == 0
    kernels = len(json.loads((int8_build / "model.json").read_text())["kernels"]["functions"])
    printed = capsys.readouterr().out
    assert "kernel" in printed and "GOPS" in printed and "in model" in printed
    assert f"({kernels - 3} more kernels)" in printed
    assert "given: int8, fp32, memory" in printed
    saved = json.loads(out.read_text())
    assert len(saved["kernels"]) == kernels >= 5 and saved["device"] == "this machine"
    assert sum(k["share"] for k in saved["kernels"]) == pytest.approx(1.0)
    assert {"name", "calls", "total_us", "precision", "ops", "bytes", "gops", "gbps",
            "bound", "of_peak", "tuned", "in_model_us"} <= set(saved["kernels"][0])
    assert saved["in_model_ms"] > 0


def _error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith("qcompile: error: ")
    return err


@pytest.mark.parametrize("feeds, message", [
    ({"x": np.zeros((1, 16, 10, 10), np.float32)}, "Input 'x' has shape [1, 16, 10, 10]"),
    ({"images": np.zeros((1, 16, 20, 20), np.float32)}, "missing 'x'"),
])
def test_inputs_that_do_not_match_are_refused(int8_build, tmp_path, capsys, feeds, message):
    np.savez(tmp_path / "bad.npz", **feeds)
    assert message in _error(capsys, ["profile", str(int8_build), "--inputs",
                                      str(tmp_path / "bad.npz")])


def test_bad_runs_are_refused(int8_build, tmp_path, capsys):
    assert "no model.json" in _error(capsys, ["profile", str(tmp_path)])
    assert "--json" in _error(capsys, ["profile", str(int8_build), "--json",
                                       str(tmp_path / "missing" / "p.json")])
    assert "is not a peak" in _error(capsys, ["profile", str(int8_build), "--peak", "int4=9"])
    with pytest.raises(SystemExit) as exit_info:
        main(["profile", str(int8_build), "--repeat", "0"])
    assert exit_info.value.code == 2
    with pytest.raises(InputError, match="at least 1"):
        profile(int8_build, repeat=0)
    with pytest.raises(InputError, match="dtype float64"):
        profile(int8_build, {"x": np.zeros((1, 16, 20, 20))})


@pytest.mark.slow
def test_a_device_over_rpc_is_refused_with_the_reason(host_device, fp32_build):
    with pytest.raises(InputError) as err:
        profile(fp32_build, rpc_tracker=host_device["tracker"], rpc_key=host_device["key"])
    assert "cannot be profiled kernel by kernel" in str(err.value)
    assert "qcompile run" in str(err.value)


def test_bench_saves_both_profiles_side_by_side(int8_build, tmp_path, monkeypatch):
    monkeypatch.setenv("QCOMPILE_CACHE_DIR", str(tmp_path / "cache"))
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    try:
        from run import profile_pair
    finally:
        sys.path.pop(0)
    onnx.save(packed_convnet(), str(tmp_path / "model.onnx"))
    text = profile_pair("small", tmp_path / "model.onnx", int8_build,
                        random_inputs(packed_convnet()), tmp_path / "profiles", threads=2,
                        runs=3)
    ort_trace = json.loads((tmp_path / "profiles" / "small-onnxruntime.json").read_text())
    assert any(e.get("cat") == "Node" for e in ort_trace)
    ours = json.loads((tmp_path / "profiles" / "small-qcompile.json").read_text())
    functions = json.loads((int8_build / "model.json").read_text())["kernels"]["functions"]
    assert len(ours["kernels"]) == len(functions) >= 5
    lines = text.splitlines()
    assert "qcompile kernels" in lines[0] and "onnxruntime ops" in lines[0]
    assert len(lines) == 6 and all(" | " in line for line in lines)
    assert "Conv" in text and "fused_" in text
