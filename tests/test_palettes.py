"""Palette weights (lut4): compiled kernels against a numpy reference of the same integer
arithmetic written here from the definition (each weight its group's scale times its
palette entry), the table lookup and the dot-product instruction in the code, on the host and
on the emulated phone; a rule that asks for palettes on a layer that has no such kernel."""

import json

import numpy as np
import pytest
from onnx import numpy_helper

import qcompile
from models import conv_relu, random_inputs
from qcompile.cli import main
from qcompile.quantize import QuantConfig
from qcompile.quantize.palettes import quantize_palette
from qcompile.quantize.rules import PrecisionRules
from test_int4 import RANGES, TARGETS, matmul_model, pointwise_model
from test_int8_kernels import instruction_counts

PALETTES = PrecisionRules.from_dict({"defaults": {"precision": "lut4"}})


def lut4_ref(x, w, b, qp, group):
    """y = s_x * sum_g s[g, n] * sum_{k in g} (q(x) - z_x) * p[c[k, n]] + b: codes c, palette
    p and scales s of the layer's palette weight, the int32 sums exact."""
    k, n = w.shape
    gw = quantize_palette(w, group)
    values = gw.palette.astype(np.int64)[gw.codes]            # [K padded, N]
    lo, hi = RANGES[qp["dtype"]]
    xq = np.clip(np.round(x / np.float32(qp["scale"])) + qp["zero_point"], lo, hi)
    xc = np.zeros((x.shape[0], values.shape[0]), np.int64)
    xc[:, :k] = xq.astype(np.int64) - qp["zero_point"]
    acc = np.einsum("mgk,gkn->mgn", xc.reshape(x.shape[0], -1, group),
                    values.reshape(-1, group, n))
    y = np.einsum("mgn,gn->mn", acc.astype(np.float64), gw.scales.astype(np.float64))
    return (y * np.float32(qp["scale"]) + b).astype(np.float32)


def compile_palettes(model, target, out, save_model, group=32):
    calibration = [random_inputs(model, seed=10 + i) for i in range(8)]
    artifact = qcompile.compile(save_model(model), target, out, quantize="int8",
                                calibration=calibration,
                                quant_config=QuantConfig(rules=PALETTES, group_size=group,
                                                         weight_rounding="nearest",
                                                         bias_correction=False))
    row = json.loads((out / "quantization.json").read_text())["layers"][0]
    assert row["precision"] == f"lut4-g{group}", row
    return artifact, row


@pytest.mark.parametrize("target_of, instruction", TARGETS)
@pytest.mark.parametrize("rows, k, n, group", [(1, 576, 40, 64), (3, 100, 48, 32)])
def test_lut4_matches_the_integer_reference(rows, k, n, group, save_model, tmp_path, target_of,
                                            instruction):
    """One row (a decoded token's kernel) and several (tiles of rows), reductions that are not
    whole groups, outputs that do not fill the instruction's blocks."""
    model = matmul_model(k, n, rows=rows)
    init = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    artifact, row = compile_palettes(model, target_of(tmp_path), tmp_path / "out", save_model,
                                     group)
    groups = -(-k // group)  # codes (the reduction padded to whole groups), fp16 scales, table
    stored = groups * group * n // 2 + 2 * groups * n + 16
    assert row["weight_rounding"] == "nearest"
    assert row["palette"] == quantize_palette(init["w"], group).palette.tolist()
    assert row["weight_bits"] == pytest.approx(8 * stored / (k * n))
    with qcompile.load(artifact.directory) as loaded:
        for seed in range(2):
            x = random_inputs(model, seed=seed)["x"]
            expected = lut4_ref(x, init["w"], init["b"], row["input"], group)
            np.testing.assert_allclose(loaded.run({"x": x})["y"], expected, rtol=2e-5,
                                       atol=2e-5 * np.abs(expected).max())
    if instruction():
        counts = instruction_counts(artifact.library)
        assert counts[instruction()] > 0 and counts["vpshufb"] > 0, counts


def test_lut4_pointwise_conv_matches_the_integer_reference(save_model, tmp_path):
    model = pointwise_model(1)
    init = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    artifact, row = compile_palettes(model, "host", tmp_path / "out", save_model)
    x = random_inputs(model, seed=3)["x"]
    with qcompile.load(artifact.directory) as loaded:
        got = loaded.run({"x": x})["y"]
    x_rows = x.transpose(0, 2, 3, 1).reshape(-1, x.shape[1])
    expected = lut4_ref(x_rows, init["w"][:, :, 0, 0].T, init["b"], row["input"], 32)
    expected = np.maximum(expected, 0).reshape(1, *x.shape[2:], -1).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(got, expected, rtol=2e-5, atol=2e-5 * np.abs(expected).max())


def test_bad_palette_options(save_model, tmp_path, capsys):
    """A palette rule on a layer with no 4-bit kernel, --palettes without 4-bit weights, and
    palettes without a calibrated input: one paragraph each, exit 2, no traceback."""
    rules = tmp_path / "rules.toml"
    rules.write_text('[[rule]]\nop = "Conv"\nprecision = "lut4"\n')
    conv = save_model(conv_relu())
    calibration = tmp_path / "conv.npz"
    np.savez(calibration, x=np.stack([random_inputs(conv_relu(), s)["x"] for s in range(4)]))
    matmul = save_model(matmul_model(64, 16), "matmul.onnx")
    int8 = ["--quantize", "int8", "--calibration", str(calibration)]
    cases = [
        (conv, [*int8, "--precision-rules", str(rules)], "to lut4, but 4-bit weights"),
        (conv, [*int8, "--palettes"], "give it with --weight-bits 4"),
        (matmul, ["--quantize", "int8-dynamic", "--weight-bits", "4", "--palettes"],
         "not in the dynamic mode"),
    ]
    for i, (path, extra, message) in enumerate(cases):
        code = main(["compile", str(path), "-o", str(tmp_path / f"o{i}"), *extra])
        err = capsys.readouterr().err
        assert code == 2 and message in err and "Traceback" not in err, (extra, err)


@pytest.mark.parametrize("target", ["arm64-dotprod", "arm64-i8mm"])
def test_arm64_lut4_uses_tbl_and_sdot(target, save_model, tmp_path):
    artifact, _ = compile_palettes(matmul_model(256, 64), target, tmp_path / "out", save_model)
    counts = instruction_counts(artifact.library, "aarch64-linux-gnu-objdump")
    assert counts["sdot"] > 0 and counts["tbl"] > 0, counts


@pytest.mark.slow
def test_lut4_on_the_device_matches_the_integer_reference(arm64_device, save_model, tmp_path):
    """The tbl + sdot kernel run on the emulated phone gives the reference's numbers."""
    k, n, group = 200, 36, 32
    model = matmul_model(k, n)
    init = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    artifact, row = compile_palettes(model, "arm64-dotprod", tmp_path / "out", save_model)
    x = random_inputs(model, seed=4)["x"]
    with qcompile.load(artifact.directory, rpc_tracker=arm64_device["tracker"],
                       rpc_key=arm64_device["key"]) as loaded:
        got = loaded.run({"x": x})["y"]
    expected = lut4_ref(x, init["w"], init["b"], row["input"], group)
    np.testing.assert_allclose(got, expected, rtol=2e-5, atol=2e-5 * np.abs(expected).max())
