"""Static int8 quantization: integer kernels against a numpy reference of the same integer
arithmetic, written here from the definitions (not from qcompile's code); calibration methods
and their errors; bad calibration data."""

import json

import numpy as np
import pytest

import qcompile
from onnx import TensorProto, helper

from models import (conv_relu, conv_upsample, depthwise_grouped, embedding_matmul, gemm_matmul,
                    lstm_cell, make_model, onnxruntime_outputs, random_inputs,
                    residual_pool_concat)
from qcompile.cli import main
from qcompile.errors import InputError
from qcompile.quantize import QuantConfig


def calibration(model, count=16, seed=1):
    return [random_inputs(model, seed=seed + i) for i in range(count)]


# -- the numpy reference: affine uint8/int8 activations, symmetric per-channel int8 weights --
RANGES = {"uint8": (0, 255), "int8": (-128, 127), "uint16": (0, 65535), "int16": (-32768, 32767)}


def quantize_ref(x, qp):
    lo, hi = RANGES[qp["dtype"]]
    q = np.round(x / np.float32(qp["scale"])) + np.float32(qp["zero_point"])
    return np.clip(q, lo, hi).astype(np.int64)


def weights_ref(w, axis):
    moved = np.moveaxis(np.abs(w), axis, 0).reshape(w.shape[axis], -1)
    scales = (moved.max(axis=1) / 127.0).astype(np.float32)
    scales = np.where(scales > 0, scales, np.float32(1))
    shape = [1] * w.ndim
    shape[axis] = -1
    return np.clip(np.round(w / scales.reshape(shape)), -127, 127).astype(np.int64), scales


def conv_ref(xc, w, stride, pad, groups):
    """Integer NCHW conv of centered activations xc (zero padding = the real zero)."""
    n, c, h, wd = xc.shape
    o, cg, kh, kw = w.shape
    xp = np.pad(xc, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    windows = np.lib.stride_tricks.sliding_window_view(xp, (kh, kw), axis=(2, 3))
    windows = windows[:, :, ::stride, ::stride]  # n, c, oh, ow, kh, kw
    out = np.zeros((n, o, windows.shape[2], windows.shape[3]), np.int64)
    per_group = o // groups
    for oc in range(o):
        g = oc // per_group
        patch = windows[:, g * cg:(g + 1) * cg]
        out[:, oc] = np.einsum("ncyxij,cij->nyx", patch, w[oc])
    return out


def requantize_ref(acc, multiplier, qp, lo=None, hi=None):
    qmin, qmax = RANGES[qp["dtype"]]
    lo_q = qmin if lo is None else max(qmin, qp["zero_point"] + int(np.round(lo / qp["scale"])))
    hi_q = qmax if hi is None else min(qmax, qp["zero_point"] + int(np.round(hi / qp["scale"])))
    q = np.round(acc.astype(np.float32) * multiplier) + np.float32(qp["zero_point"])
    return np.clip(q, lo_q, hi_q).astype(np.int64)


def depthwise_grouped_ref(x, rows, init):
    """depthwise (3x3, padded) -> ReLU6 -> grouped 1x1 conv with bias, each layer's input
    quantized as the report says (8 or 16 bits), integers accumulated exactly: (the output,
    the grouped conv's int8 weights, its accumulator scales)."""
    dw = rows["depthwise"]
    s_x = np.float32(dw["input"]["scale"])
    wq1, s_w1 = weights_ref(init["dw"], 0)
    acc1 = conv_ref(quantize_ref(x, dw["input"]) - dw["input"]["zero_point"], wq1, 1, 1, 16)
    mid = dw["output"]
    m1 = ((s_x * s_w1) / np.float32(mid["scale"])).astype(np.float32)
    q1 = requantize_ref(acc1, m1[None, :, None, None], mid, lo=0.0, hi=6.0)
    wq2, s_w2 = weights_ref(init["gw"], 0)
    acc_scale2 = (np.float32(mid["scale"]) * s_w2).astype(np.float32)
    acc2 = conv_ref(q1 - mid["zero_point"], wq2, 1, 0, 4)
    acc2 += np.round(init["gb"] / acc_scale2).astype(np.int64)[None, :, None, None]
    return acc2.astype(np.float32) * acc_scale2[None, :, None, None], wq2, acc_scale2


def initializers(model):
    from onnx import numpy_helper

    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


def compile_int8(model, save_model, out, **config):
    config.setdefault("float_stem", False)  # these small models start with a 3-channel conv
    config.setdefault("bias_correction", False)  # the references below do not model it
    config.setdefault("weight_rounding", "nearest")  # nor GPTQ (test_rounding.py does)
    path = save_model(model)
    qcompile.compile(path, "host", out, quantize="int8", calibration=calibration(model),
                     quant_config=QuantConfig(**config))
    report = json.loads((out / "quantization.json").read_text())
    return qcompile.load(out), {row["layer"]: row for row in report["layers"]}, report


@pytest.mark.parametrize("activations", ["uint8", "int8"])
def test_conv_relu_matches_the_integer_reference(save_model, tmp_path, activations):
    model = conv_relu()
    loaded, rows, _ = compile_int8(model, save_model, tmp_path / "out", activations=activations)
    row = rows["conv"]
    assert row["precision"] == "int8" and row["output"] == "float"  # a graph output
    x = random_inputs(model, seed=99)["x"]
    init = initializers(model)
    s_x = np.float32(row["input"]["scale"])
    xq = quantize_ref(x, row["input"])
    wq, s_w = weights_ref(init["w"], 0)
    acc_scale = (s_x * s_w).astype(np.float32)
    acc = conv_ref(xq - row["input"]["zero_point"], wq, 2, 1, 1)
    acc += np.round(init["b"] / acc_scale).astype(np.int64)[None, :, None, None]
    expected = np.maximum(acc.astype(np.float32) * acc_scale[None, :, None, None], 0)
    actual = loaded.run({"x": x})["y"]
    # exact up to float rounding of one multiply: within one accumulator step
    np.testing.assert_allclose(actual, expected, rtol=0,
                               atol=float(acc_scale.max()) * 1.01)
    assert np.mean(actual == expected) > 0.99


def test_bias_correction_removes_the_mean_shift_of_weight_rounding(save_model, tmp_path):
    """With bias correction, the int32 bias is (b - (dequantized w - w) . E[x]) / (s_x s_w),
    E[x] the per-channel mean of the input over the calibration samples."""
    model = conv_relu()
    loaded, rows, _ = compile_int8(model, save_model, tmp_path / "out", bias_correction=True)
    row = rows["conv"]
    init = initializers(model)
    means = np.mean([f["x"].astype(np.float64).mean(axis=(0, 2, 3))
                     for f in calibration(model)], axis=0)
    wq, s_w = weights_ref(init["w"], 0)
    error = wq * s_w[:, None, None, None] - init["w"]
    shift = np.einsum("oikl,i->o", error, means)
    x = random_inputs(model, seed=99)["x"]
    s_x = np.float32(row["input"]["scale"])
    acc_scale = (s_x * s_w).astype(np.float32)
    acc = conv_ref(quantize_ref(x, row["input"]) - row["input"]["zero_point"], wq, 2, 1, 1)
    acc += np.round((init["b"] - shift) / acc_scale).astype(np.int64)[None, :, None, None]
    expected = np.maximum(acc.astype(np.float32) * acc_scale[None, :, None, None], 0)
    actual = loaded.run({"x": x})["y"]
    np.testing.assert_allclose(actual, expected, rtol=0, atol=float(acc_scale.max()) * 1.01)
    assert np.mean(actual == expected) > 0.99
    assert np.abs(shift / acc_scale).max() > 0.5  # the correction moves at least one channel


def test_depthwise_relu6_grouped_chain_requantizes_like_the_reference(save_model, tmp_path):
    model = depthwise_grouped()
    loaded, rows, report = compile_int8(model, save_model, tmp_path / "out")
    dw, gr = rows["depthwise"], rows["grouped"]
    assert dw["output"] != "float" and gr["output"] == "float" and "relu6" not in rows
    assert report["activations"] == "uint8"  # x86 host: VNNI multiplies u8 x s8
    assert gr["input"] == dw["output"]  # the int8 tensor flows from one kernel into the next
    x = random_inputs(model, seed=42)["x"]
    expected, wq2, acc_scale2 = depthwise_grouped_ref(x, rows, initializers(model))
    actual = loaded.run({"x": x})["y"]
    # one LSB of the intermediate int8 tensor may differ (float rounding at a .5 boundary)
    step = float(np.abs(wq2).sum(axis=(1, 2, 3)).max() * acc_scale2.max())
    np.testing.assert_allclose(actual, expected, rtol=0, atol=step)
    assert np.mean(np.isclose(actual, expected, rtol=0, atol=float(acc_scale2.max()))) > 0.98


def test_gemm_relu_matmul_matches_the_reference(save_model, tmp_path):
    model = gemm_matmul()
    loaded, rows, _ = compile_int8(model, save_model, tmp_path / "out")
    gemm = rows["gemm"]
    assert rows["matmul"]["precision"] == "int8" and rows["matmul"]["output"] == "float"
    init = initializers(model)
    x = random_inputs(model, seed=5)["x"]
    w1 = init["w1"].T  # Gemm transB
    wq1, s_w1 = weights_ref(w1, 1)
    s_x = np.float32(gemm["input"]["scale"])
    acc1 = (quantize_ref(x, gemm["input"]) - gemm["input"]["zero_point"]) @ wq1
    acc1 += np.round(init["b1"] / (s_x * s_w1).astype(np.float32)).astype(np.int64)
    mid = gemm["output"]
    q1 = requantize_ref(acc1, ((s_x * s_w1) / np.float32(mid["scale"])).astype(np.float32),
                        mid, lo=0.0)
    wq2, s_w2 = weights_ref(init["w2"], 1)
    acc_scale2 = (np.float32(mid["scale"]) * s_w2).astype(np.float32)
    logits = ((q1 - mid["zero_point"]) @ wq2).astype(np.float32) * acc_scale2
    e = np.exp(logits - logits.max(axis=-1, keepdims=True))
    expected = e / e.sum(axis=-1, keepdims=True)
    actual = loaded.run({"x": x})["y"]
    np.testing.assert_allclose(actual, expected, rtol=0, atol=2e-3)


def test_a_gate_split_between_int8_layers_is_realized(save_model, tmp_path):
    """An LSTM cell as exporters write it: the gates' Gemm is split into four (a tuple-valued
    op) whose fields feed float ops and the next int8 layer; the state outputs stay close to
    fp32."""
    model = lstm_cell()
    loaded, rows, report = compile_int8(model, save_model, tmp_path / "out")
    assert rows["gates"]["precision"] == "int8" and rows["proj"]["precision"] == "int8"
    for seed in (3, 4):
        feeds = random_inputs(model, seed=seed)
        expected = onnxruntime_outputs(model, feeds)
        actual = loaded.run(feeds)
        for name in ("h_next", "c_next"):
            a, e = actual[name].ravel(), expected[name].ravel()
            assert float(a @ e / (np.linalg.norm(a) * np.linalg.norm(e))) > 0.99, name


def test_a_conv_transpose_after_int8_convs_stays_float(save_model, tmp_path):
    """The packed int8 graph is NHWC; a ConvTranspose after it stays float (as a 1x1 conv and
    a reshuffle when its windows do not overlap, else in NCHW, the only layout TVM lowers it
    in), and the model stays close to fp32."""
    model = conv_upsample()
    loaded, rows, _ = compile_int8(model, save_model, tmp_path / "out")
    assert rows["conv2"]["precision"] == "int8"
    feeds = random_inputs(model, seed=3)
    a, e = loaded.run(feeds)["y"].ravel(), onnxruntime_outputs(model, feeds)["y"].ravel()
    assert float(a @ e / (np.linalg.norm(a) * np.linalg.norm(e))) > 0.99


@pytest.mark.parametrize("method", ["minmax", "percentile", "entropy", "mse"])
def test_methods_stay_close_to_fp32(save_model, tmp_path, method):
    model = residual_pool_concat()
    loaded, rows, report = compile_int8(model, save_model, tmp_path / "out", method=method)
    assert report["method"] == method
    feeds = random_inputs(model, seed=7)
    expected = onnxruntime_outputs(model, feeds)["y"]
    actual = loaded.run(feeds)["y"]
    cosine = float(np.dot(actual.ravel(), expected.ravel()) /
                   (np.linalg.norm(actual) * np.linalg.norm(expected)))
    assert cosine > 0.99, cosine
    assert report["outputs"][0]["cosine"] > 0.99
    assert rows["conv"]["error_vs_fp32"]["sqnr_db"] > 20


def test_constant_input_gets_a_valid_scale(save_model, tmp_path):
    model = conv_relu()
    zeros = [{"x": np.zeros((1, 3, 32, 32), np.float32)} for _ in range(2)]
    qcompile.compile(save_model(model), "host", tmp_path / "out", quantize="int8",
                     calibration=zeros, quant_config=QuantConfig(float_stem=False))
    report = json.loads((tmp_path / "out" / "quantization.json").read_text())
    scale = report["layers"][0]["input"]["scale"]
    assert np.isfinite(scale) and scale > 0
    out = qcompile.load(tmp_path / "out").run(zeros[0])["y"]
    assert np.all(np.isfinite(out))


def test_manifest_records_int8_layers_and_size(save_model, tmp_path):
    model = depthwise_grouped()
    path = save_model(model)
    fp32 = qcompile.compile(path, "host", tmp_path / "fp32")
    int8 = qcompile.compile(path, "host", tmp_path / "int8", quantize="int8",
                            calibration=calibration(model))
    assert [l["precision"] for l in int8.manifest.layers] == ["int8", "int8"]
    assert [l["precision"] for l in fp32.manifest.layers] == ["fp32", "fp32"]


@pytest.mark.parametrize("bad,message", [
    (lambda m: [{"y": np.zeros((1, 3, 32, 32), np.float32)}], "missing 'x'"),
    (lambda m: [{"x": np.zeros((1, 3, 16, 16), np.float32)}], "shape [1, 3, 16, 16]"),
    (lambda m: [{"x": np.full((1, 3, 32, 32), np.nan, np.float32)}], "NaN"),
    (lambda m: [{"x": np.zeros((1, 3, 32, 32), np.complex64)}], "dtype complex64"),
    (lambda m: [], "no samples"),
])
def test_bad_calibration_data_is_refused_before_work(save_model, tmp_path, bad, message):
    model = conv_relu()
    with pytest.raises(InputError) as err:
        qcompile.compile(save_model(model), "host", tmp_path / "out", quantize="int8",
                         calibration=bad(model))
    assert message in str(err.value)
    assert not (tmp_path / "out").exists()


def test_unknown_weight_rounding_is_refused(save_model, tmp_path, capsys):
    model = conv_relu()
    with pytest.raises(InputError, match="Unknown weight rounding 'best'.*gptq, nearest"):
        qcompile.compile(save_model(model), "host", tmp_path / "out", quantize="int8",
                         calibration=calibration(model),
                         quant_config=QuantConfig(weight_rounding="best"))
    with pytest.raises(SystemExit) as exit_info:  # argparse: exit 2 with the choices
        main(["compile", str(save_model(model)), "--quantize", "int8", "--weight-rounding",
              "best"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'best'" in capsys.readouterr().err


def test_too_few_samples_for_a_histogram_method(save_model, tmp_path):
    model = conv_relu()
    with pytest.raises(InputError) as err:
        qcompile.compile(save_model(model), "host", tmp_path / "out", quantize="int8",
                         calibration=calibration(model, count=3),
                         quant_config=QuantConfig(method="entropy"))
    assert "needs at least 8" in str(err.value)


def test_image_stem_stays_float_unless_asked(save_model, tmp_path):
    model = conv_relu()  # its conv reads a 3-channel model input: an image stem
    path = save_model(model)
    artifact = qcompile.compile(path, "host", tmp_path / "a", quantize="int8",
                                calibration=calibration(model))
    assert artifact.manifest.layers[0]["precision"] == "fp32"
    report = json.loads((tmp_path / "a" / "quantization.json").read_text())
    assert "first conv on the image" in report["layers"][0]["reason"]
    feeds = random_inputs(model)
    np.testing.assert_allclose(qcompile.load(tmp_path / "a").run(feeds)["y"],
                               onnxruntime_outputs(model, feeds)["y"], rtol=1e-4, atol=1e-4)
    assert main(["compile", str(path), "--quantize", "int8", "--int8-stem", "--calibration",
                 str(_npz(tmp_path, model)), "-o", str(tmp_path / "b")]) == 0
    assert json.loads((tmp_path / "b" / "model.json").read_text())["layers"][0][
        "precision"] == "int8"


def _npz(tmp_path, model):
    np.savez(tmp_path / "calib.npz", x=np.stack([f["x"] for f in calibration(model, 8)]))
    return tmp_path / "calib.npz"


def test_cli_quantizes_with_an_npz(save_model, tmp_path, capsys):
    model = conv_relu()
    samples = np.stack([f["x"] for f in calibration(model, 8)])  # [S, 1, 3, 32, 32]
    np.savez(tmp_path / "calib.npz", x=samples)
    assert main(["compile", str(save_model(model)), "--quantize", "int8", "--calibration",
                 str(tmp_path / "calib.npz"), "--calibration-method", "percentile",
                 "--int8-stem", "-o", str(tmp_path / "out")]) == 0
    report = json.loads((tmp_path / "out" / "quantization.json").read_text())
    assert report["method"] == "percentile" and report["calibration_samples"] == 8
    # [S, 3, 32, 32] (the input's rank, batch 1) is read as S samples too
    np.savez(tmp_path / "calib2.npz", x=samples[:, 0])
    assert main(["compile", str(tmp_path / "model.onnx"), "--quantize", "int8",
                 "--calibration", str(tmp_path / "calib2.npz"), "-o", str(tmp_path / "o2")]) == 0
    np.savez(tmp_path / "bad.npz", images=samples)
    assert main(["compile", str(tmp_path / "model.onnx"), "--quantize", "int8",
                 "--calibration", str(tmp_path / "bad.npz"), "-o", str(tmp_path / "o3")]) == 2
    assert "no array for input(s) 'x'" in capsys.readouterr().err


def test_rebuilt_model_in_the_same_directory_runs_its_new_code(save_model, tmp_path):
    """dlopen returns the library already loaded under a path: loading a rebuilt model.so
    from the same directory must not run the old one."""
    model = gemm_matmul()
    path = save_model(model)
    feeds = random_inputs(model, seed=1)
    outputs = []
    for mode in ("int8-weights", None):
        qcompile.compile(path, "host", tmp_path / "out", quantize=mode)
        with qcompile.load(tmp_path / "out") as loaded:
            outputs.append(loaded.run(feeds)["y"])
    assert not np.array_equal(outputs[0], outputs[1])
    np.testing.assert_allclose(outputs[1], onnxruntime_outputs(model, feeds)["y"], rtol=1e-4)


def test_a_report_that_cannot_measure_does_not_break_the_build(save_model, tmp_path,
                                                               monkeypatch, caplog):
    """The report's per-layer errors come from a second build with extra outputs; if that
    build fails, the model is still built, with a warning and a report without the errors."""
    import qcompile.quantize.static as quantize

    def fails(*args, **kwargs):
        raise RuntimeError("InternalError: Check failed: Var lv52 is not defined")

    monkeypatch.setattr(quantize, "layer_errors", fails)
    model = gemm_matmul()
    with caplog.at_level("WARNING"):
        loaded, rows, report = compile_int8(model, save_model, tmp_path / "out")
    assert "could not measure the layers' errors (InternalError: Check failed: Var lv52" \
        in caplog.text
    assert rows["gemm"]["precision"] == "int8" and rows["gemm"]["error_vs_fp32"] is None
    assert report["outputs"] == []
    feeds = random_inputs(model, seed=2)
    a, e = loaded.run(feeds)["y"].ravel(), onnxruntime_outputs(model, feeds)["y"].ravel()
    assert float(a @ e / (np.linalg.norm(a) * np.linalg.norm(e))) > 0.99


def table_ref(table, bits):
    """A table as stored: int8 with a symmetric scale per row, or 4 bits with an fp16 scale
    per 32 values of a row (max |value| / 7, codes in [-8, 7])."""
    if bits == 8:
        scales = np.abs(table).max(axis=1) / np.float32(127)
        return np.clip(np.round(table / scales[:, None]), -127, 127) * scales[:, None]
    groups = table.reshape(table.shape[0], -1, 32)
    scales = (np.abs(groups).max(axis=2, keepdims=True) / 7).astype(np.float16).astype(
        np.float32)
    return (np.clip(np.round(groups / scales), -8, 7) * scales).reshape(table.shape)


@pytest.mark.parametrize("quantize, tables", [("int8", "int8"), ("int8-weights", "int8"),
                                              ("int8", "int4")])
def test_a_lookup_table_is_stored_in_int8_or_int4(quantize, tables, save_model, tmp_path):
    """A Gather on a constant table (a word embedding) reads int8 rows times their scale, or
    4-bit groups times theirs: the compiled lookup equals the numpy reference of that storage,
    and the library shrinks by about the bytes saved; --tables fp32 keeps the table exact."""
    model = embedding_matmul()
    path = save_model(model)
    table = initializers(model)["table"]
    stored = table_ref(table, 8 if tables == "int8" else 4)
    feeds = random_inputs(model, seed=3)
    rows = np.abs(feeds["ids"]) * 37

    def build(out, **config):
        probe = make_model([helper.make_node("Abs", ["ids"], ["a"]),
                            helper.make_node("Mul", ["a", "step"], ["rows"]),
                            helper.make_node("Gather", ["table", "rows"], ["e"], axis=0)],
                           [("ids", [2, 6], TensorProto.INT64)], [("e", [2, 6, 64])],
                           [i for i in model.graph.initializer if i.name in ("table", "step")])
        qcompile.compile(save_model(probe), "host", out, quantize=quantize,
                         calibration=calibration(probe, 2) if quantize == "int8" else None,
                         quant_config=QuantConfig(**config))
        return qcompile.load(out).run(feeds)["e"], (out / "model.so").stat().st_size

    lookup, size = build(tmp_path / tables, tables=tables)
    np.testing.assert_allclose(lookup, stored[rows], rtol=1e-6, atol=0)
    assert not np.array_equal(lookup, table[rows])
    exact, fp32_size = build(tmp_path / "fp32", tables="fp32")
    np.testing.assert_array_equal(exact, table[rows])
    saved = (0.6 if tables == "int8" else 0.7) * table.nbytes
    assert fp32_size - size > saved, (size, fp32_size)

    qcompile.compile(path, "host", tmp_path / "whole", quantize=quantize,
                     calibration=calibration(model) if quantize == "int8" else None,
                     quant_config=QuantConfig(tables=tables))
    report = json.loads((tmp_path / "whole" / "quantization.json").read_text())
    assert [t["shape"] for t in report["tables"]] == [[256, 64]]
    assert report["tables"][0]["precision"] == ("int8" if tables == "int8" else "int4-g32")
    assert report["tables"][0]["sqnr_db"] > (35 if tables == "int8" else 15)
