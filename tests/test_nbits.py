"""4-bit weights without qcompile's own quantizer: models made by onnxruntime's
matmul_nbits_quantizer (MatMulNBits, and its QDQ form: DequantizeLinear with block_size on an
INT4/UINT4 constant) compile with their own codes; in float (W4A16) they compute what
onnxruntime computes in float, on calibrated int8 inputs (W4A8) what a numpy reference of the
integer arithmetic computes; weight-only 4-bit on a float model; the forms not taken are
refused in one paragraph."""

import copy
import json
import logging

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper

import qcompile
from models import random_inputs
from qcompile.cli import main
from test_int4 import RANGES, matmul_model, symmetric_codes
from test_int8_kernels import instruction_counts

QOPERATOR, QDQ = "QOperator", "QDQ"


def nbits_model(k: int, n: int, block: int, symmetric: bool, form: str, rows: int = 3,
                bits: int = 4) -> onnx.ModelProto:
    """matmul_model(k, n) quantized by onnxruntime's MatMulNBitsQuantizer."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    from onnxruntime.quantization.quant_utils import QuantFormat

    logging.getLogger("onnxruntime").setLevel(logging.ERROR)
    quantizer = MatMulNBitsQuantizer(matmul_model(k, n, rows), bits=bits, block_size=block,
                                     is_symmetric=symmetric,
                                     quant_format=getattr(QuantFormat, form))
    quantizer.process()
    model = quantizer.model.model
    ops = {node.op_type for node in model.graph.node}
    assert ("MatMulNBits" if form == QOPERATOR else "DequantizeLinear") in ops, ops
    return model


def onnxruntime_float(model: onnx.ModelProto, feeds: dict) -> np.ndarray:
    """onnxruntime in float arithmetic: with graph optimizations it would fuse the QDQ form
    into a MatMulNBits on int8 inputs (accuracy level 4)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    return session.run(["y"], feeds)[0]


def weight_and_bias(k: int, n: int, block: int, symmetric: bool, form: str):
    """The float weight [K, N] that the model's codes stand for, as onnxruntime computes it
    (the model on the K unit rows, less its output on a zero row), and the bias."""
    bias = onnxruntime_float(nbits_model(k, n, block, symmetric, form, rows=1),
                             {"x": np.zeros((1, k), np.float32)})[0]
    unit = onnxruntime_float(nbits_model(k, n, block, symmetric, form, rows=k),
                             {"x": np.eye(k, dtype=np.float32)})
    return (unit - bias).astype(np.float64), bias


CASES = [(576, 40, 128, False, QOPERATOR),   # 576 = 4.5 blocks of 128, zero points
         (96, 24, 32, True, QOPERATOR),      # no zero points (8)
         (100, 16, 32, False, QDQ),          # UINT4 with zero points, a partial block
         (64, 16, 32, True, QDQ)]            # INT4


@pytest.mark.parametrize("k, n, block, symmetric, form", CASES)
def test_w4a16_computes_what_onnxruntime_computes(k, n, block, symmetric, form, save_model,
                                                  tmp_path):
    model = nbits_model(k, n, block, symmetric, form)
    artifact = qcompile.compile(save_model(model), "host", tmp_path / "out")
    report = json.loads((tmp_path / "out" / "quantization.json").read_text())
    assert [row["precision"] for row in report["layers"]] == [f"int4-g{block}-weights"]
    # stored per group: `block` 4-bit codes (the last group padded), a float32 scale and,
    # with zero points, one byte
    groups = -(-k // block)
    bits = (4 * block + 32 + (0 if symmetric else 8)) * groups / k
    assert report["layers"][0]["weight_bits"] == pytest.approx(bits)
    with qcompile.load(artifact.directory) as loaded:
        for seed in range(3):
            feeds = random_inputs(model, seed)
            expected = onnxruntime_float(model, feeds)
            np.testing.assert_allclose(loaded.run(feeds)["y"], expected, rtol=1e-5,
                                       atol=1e-5 * np.abs(expected).max())


@pytest.mark.parametrize("k, n, block, symmetric, form", CASES[:3])
def test_w4a8_on_the_model_codes(k, n, block, symmetric, form, save_model, tmp_path):
    """--quantize int8 keeps the model's codes (not int8 rounded again) and quantizes their
    input: the integer sums are exact, so the output is the reference's within float
    rounding, and onnxruntime's float output within the input's rounding."""
    model = nbits_model(k, n, block, symmetric, form)
    calibration = [random_inputs(model, seed=10 + i) for i in range(8)]
    artifact = qcompile.compile(save_model(model), "host", tmp_path / "out", quantize="int8",
                                calibration=calibration)
    row = json.loads((tmp_path / "out" / "quantization.json").read_text())["layers"][0]
    assert row["precision"] == f"int4-g{block}" and row["weight_rounding"] == "given"
    w, b = weight_and_bias(k, n, block, symmetric, form)
    qp = row["input"]
    lo, hi = RANGES[qp["dtype"]]
    with qcompile.load(artifact.directory) as loaded:
        for seed in range(3):
            feeds = random_inputs(model, seed)
            x = feeds["x"]
            xq = np.clip(np.round(x / np.float32(qp["scale"])) + qp["zero_point"], lo, hi)
            expected = (xq - qp["zero_point"]) @ w * qp["scale"] + b
            got = loaded.run(feeds)["y"]
            np.testing.assert_allclose(got, expected, rtol=1e-4,
                                       atol=1e-4 * np.abs(expected).max())
            rounding = qp["scale"] / 2 * np.abs(w).sum(axis=0)
            assert np.all(np.abs(got - onnxruntime_float(model, feeds)) <= rounding + 1e-4)


def grouped_reference(x: np.ndarray, w: np.ndarray, group: int) -> np.ndarray:
    """x @ w with x quantized as the dynamic W4A8 kernel quantizes it at run time: each row's
    groups of `group` values (the last one padded with zeros) as int8 codes with the scale
    max |x| / 127, the products summed exactly."""
    f32 = np.float32
    k = x.shape[-1]
    padded = np.pad(x, [(0, 0), (0, -k % group)]).reshape(len(x), -1, group)
    scale = np.maximum(np.abs(padded).max(axis=-1, keepdims=True) / f32(127),
                       np.finfo(f32).tiny).astype(f32)
    codes = np.clip(np.round(padded / scale), -127, 127).astype(np.float64)
    w = np.pad(w, [(0, -k % group), (0, 0)]).reshape(-1, group, w.shape[1])
    return np.einsum("mg,mgk,gkn->mn", scale[..., 0].astype(np.float64), codes, w)


@pytest.mark.parametrize("k, n, block, symmetric, form", CASES[:3])
def test_w4a8_dynamic_on_the_model_codes(k, n, block, symmetric, form, save_model, tmp_path):
    """--quantize int8-dynamic keeps the model's codes and quantizes their input at run time
    per row and group (rows of very different ranges, and one channel far above the rest
    here): the output is the integer arithmetic's reference within float rounding."""
    model = nbits_model(k, n, block, symmetric, form, rows=4)
    artifact = qcompile.compile(save_model(model), "host", tmp_path / "out",
                                quantize="int8-dynamic")
    row = json.loads((tmp_path / "out" / "quantization.json").read_text())["layers"][0]
    assert row["precision"] == f"int4-g{block}-dynamic" and row["weight_rounding"] == "given"
    w, b = weight_and_bias(k, n, block, symmetric, form)
    with qcompile.load(artifact.directory) as loaded:
        for seed in range(3):
            x = random_inputs(model, seed)["x"] * np.array([[1e-3], [1.0], [30.0], [0.2]],
                                                           np.float32)
            x[:, 5] *= 50  # an outlier channel: one group's scale, not the row's
            expected = grouped_reference(x, w, block) + b
            got = loaded.run({"x": x})["y"]
            for r in range(len(x)):  # each row to its own magnitude
                err = np.abs(got[r] - expected[r]).max()
                assert err <= 1e-4 * np.abs(expected[r] - b).max() + 1e-5, (r, err)


def test_int8_weights_with_inputs_in_groups(save_model, tmp_path):
    """int8-dynamic with its inputs in groups (a language model's int8 layers): int8 codes,
    max |w| / 127 per group of 32 as fp16, the input quantized per row and group at run time
    on the 4-bit layers' kernel; a reduction that is not whole groups and outputs that are not
    whole vector blocks. The output is the integer arithmetic's reference."""
    k, n, group = 200, 36, 32
    model = matmul_model(k, n, rows=4)
    init = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    artifact = qcompile.compile(save_model(model), "host", tmp_path / "out",
                                quantize="int8-dynamic",
                                quant_config=qcompile.QuantConfig(input_groups=True))
    row = json.loads((tmp_path / "out" / "quantization.json").read_text())["layers"][0]
    assert row["precision"] == "int8-g32-dynamic", row
    groups = -(-k // group)  # per group and output: 32 codes, an fp16 scale, an int16 offset
    assert row["weight_bits"] == pytest.approx(8 * groups * (group + 2 + 2) / k, abs=0.01), row
    codes, scales = symmetric_codes(init["w"], group, bits=8)
    w8 = (codes * np.repeat(scales, group, axis=0)).astype(np.float64)[:k]
    x = random_inputs(model, 3)["x"] * np.array([[1e-3], [1.0], [30.0], [0.2]], np.float32)
    x[:, 7] *= 50  # an outlier channel
    with qcompile.load(artifact.directory) as loaded:
        got = loaded.run({"x": x})["y"]
    expected = grouped_reference(x, w8, group) + init["b"]
    for r in range(len(x)):
        assert np.abs(got[r] - expected[r]).max() <= \
            1e-4 * np.abs(expected[r] - init["b"]).max() + 1e-5, r


@pytest.mark.slow
@pytest.mark.parametrize("bits", [4, 8])
def test_w4a8_dynamic_on_the_device(bits, arm64_device, save_model, tmp_path):
    """On an ARM CPU with sdot, qcompile's own 4-bit codes of a float model (or 8-bit ones in
    groups) and int8 inputs quantized per row and group at run time (the int8 codes as they
    are: no uint8 offset) give the reference's numbers on the emulated phone."""
    k, n, group = 256, 36, 32
    model = matmul_model(k, n, rows=4)
    init = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    config = qcompile.QuantConfig(weight_bits=4) if bits == 4 else \
        qcompile.QuantConfig(input_groups=True)
    artifact = qcompile.compile(save_model(model), "arm64-dotprod", tmp_path / "out",
                                quantize="int8-dynamic", quant_config=config)
    assert instruction_counts(artifact.library, "aarch64-linux-gnu-objdump")["sdot"] > 0
    row = json.loads((tmp_path / "out" / "quantization.json").read_text())["layers"][0]
    assert row["precision"] == f"int{bits}-g32-dynamic"
    codes, scales = symmetric_codes(init["w"], group, bits)
    w4 = (codes * np.repeat(scales, group, axis=0)).astype(np.float64)
    x = random_inputs(model, 4)["x"] * np.array([[1e-3], [1.0], [30.0], [0.2]], np.float32)
    with qcompile.load(artifact.directory, rpc_tracker=arm64_device["tracker"],
                       rpc_key=arm64_device["key"]) as loaded:
        got = loaded.run({"x": x})["y"]
    expected = grouped_reference(x, w4, group) + init["b"]
    for r in range(len(x)):
        assert np.abs(got[r] - expected[r]).max() <= \
            1e-4 * np.abs(expected[r] - init["b"]).max() + 1e-5


def test_weight_only_4_bits_on_a_float_model(save_model, tmp_path):
    """--quantize int8-weights --weight-bits 4: symmetric codes, max |w| / 7 per group of 32
    as fp16, the input in float; the library holds 4.5 bits per weight."""
    k, n = 512, 256
    model = matmul_model(k, n)
    init = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    code = main(["compile", str(save_model(model)), "-o", str(tmp_path / "out"), "--quantize",
                 "int8-weights", "--weight-bits", "4"])
    assert code == 0
    row = json.loads((tmp_path / "out" / "quantization.json").read_text())["layers"][0]
    assert row["precision"] == "int4-g32-weights" and row["weight_bits"] == 4.5  # fp16 scales
    w = init["w"].reshape(-1, 32, n)
    scale = (np.abs(w).max(axis=1, keepdims=True) / 7).astype(np.float16).astype(np.float32)
    w4 = (np.clip(np.round(w / scale), -8, 7) * scale).reshape(k, n)
    with qcompile.load(tmp_path / "out") as loaded:
        x = random_inputs(model, 0)["x"]
        expected = x @ w4 + init["b"]
        np.testing.assert_allclose(loaded.run({"x": x})["y"], expected, rtol=1e-5,
                                   atol=1e-5 * np.abs(expected).max())
    float_bytes = k * n * 4
    assert (tmp_path / "out" / "model.so").stat().st_size < float_bytes * 0.2 + 100_000


def test_unsupported_4bit_forms_are_refused(save_model, tmp_path, capsys):
    eight = nbits_model(64, 16, 32, False, QOPERATOR, bits=8)
    odd = copy.deepcopy(nbits_model(64, 16, 32, False, QOPERATOR))
    node = next(n for n in odd.graph.node if n.op_type == "MatMulNBits")
    for attr in node.attribute:
        if attr.name == "block_size":
            attr.CopyFrom(helper.make_attribute("block_size", 24))
    reordered = copy.deepcopy(nbits_model(64, 16, 32, False, QOPERATOR))
    node = next(n for n in reordered.graph.node if n.op_type == "MatMulNBits")
    g_idx = (np.arange(64) // 32)[::-1].astype(np.int32)        # act-order: not k // block
    reordered.graph.initializer.append(onnx.numpy_helper.from_array(g_idx, "g_idx"))
    node.input.extend(["g_idx"])
    short = copy.deepcopy(nbits_model(64, 16, 32, True, QOPERATOR))
    scales = next(t for t in short.graph.initializer if t.name.endswith("scales"))
    scales.CopyFrom(onnx.numpy_helper.from_array(
        onnx.numpy_helper.to_array(scales).ravel()[:-1], scales.name))
    cases = [(eight, "has bits=8"), (odd, "block_size=24"),
             (reordered, "reorders its reduction with g_idx"),
             (short, "has 31 scales, not N * blocks = 32")]
    for model, message in cases:
        path = save_model(model)
        assert main(["compile", str(path), "-o", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err


def test_layers_the_4bit_model_left_in_float_stay_float(save_model, tmp_path, caplog):
    """onnxruntime's quantizer makes MatMuls 4-bit and leaves a Gemm in float: so does the
    build, and says nothing against it."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    from models import gemm_matmul

    logging.getLogger("onnxruntime").setLevel(logging.ERROR)
    quantizer = MatMulNBitsQuantizer(gemm_matmul(), bits=4, block_size=32)
    quantizer.process()
    model = quantizer.model.model
    with caplog.at_level(logging.WARNING, logger="qcompile"):
        artifact = qcompile.compile(save_model(model), "host", tmp_path / "out")
    report = json.loads((tmp_path / "out" / "quantization.json").read_text())
    assert sorted(row["precision"] for row in report["layers"]) == ["fp32", "int4-g32-weights"]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    with qcompile.load(artifact.directory) as loaded:
        feeds = random_inputs(model, 0)
        expected = onnxruntime_float(model, feeds)
        np.testing.assert_allclose(loaded.run(feeds)["y"], expected, rtol=1e-5,
                                   atol=1e-5 * np.abs(expected).max())


@pytest.mark.parametrize("quantize", ["int8-dynamic", "int8-weights"])
def test_calibration_rounds_the_4_bit_weights_by_gptq(quantize, save_model, tmp_path):
    """With calibration samples, W4A8 (run-time int8 inputs) and W4A16 round qcompile's own
    4-bit codes by GPTQ on the samples' input moments (the activations are not calibrated):
    the report says gptq, and on held-out inputs of the
    same distribution (correlated channels of unequal size, as a layer's inputs are) the
    output error against float is well below round to nearest's."""
    k, n = 256, 64
    model = matmul_model(k, n, rows=8)
    init = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    rng = np.random.default_rng(5)
    mix = rng.standard_normal((k, k)).astype(np.float32) * np.exp(rng.normal(0, 1, k))

    def sample():
        return {"x": ((rng.standard_normal((8, k)) @ mix) / np.sqrt(k)).astype(np.float32)}

    # GPTQ generalizes once the samples hold more rows than the reduction's length (512 > 256)
    samples, held_out = [sample() for _ in range(64)], [sample() for _ in range(8)]
    errors = {}
    for rounding, calibration in [("gptq", samples), ("nearest", None)]:
        out = tmp_path / rounding
        qcompile.compile(save_model(model, f"{rounding}.onnx"), "host", out, quantize=quantize,
                         calibration=calibration,
                         quant_config=qcompile.QuantConfig(weight_bits=4))
        row = json.loads((out / "quantization.json").read_text())["layers"][0]
        assert row["weight_rounding"] == rounding and row["precision"].startswith("int4-g32")
        with qcompile.load(out) as loaded:
            errors[rounding] = np.mean([
                np.square(loaded.run(s)["y"] - (s["x"] @ init["w"] + init["b"])).mean()
                for s in held_out])
    assert errors["gptq"] < 0.8 * errors["nearest"], errors  # 0.69 when written
