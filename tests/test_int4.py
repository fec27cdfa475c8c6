"""4-bit weights in groups (W4A8): the codes and their packing, the compiled kernels against a
numpy reference of the same integer arithmetic written here from the definitions, the
dot-product instruction in the code, GPTQ against round-to-nearest, and the options' errors."""

import json
import logging

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import qcompile
from models import _w, conv_relu, make_model, pointwise_chain, random_inputs
from qcompile.cli import main
from qcompile.quantize import QuantConfig
from qcompile.quantize.rules import PrecisionRules
from qcompile.quantize.weights import quantize_groups
from qcompile.schedules.cpu.packed_int4 import pack_codes, unpack_logical
from test_int8_kernels import host_has_avx2, host_x86_instruction, instruction_counts, x86_target

RANGES = {"uint8": (0, 255), "int8": (-128, 127)}

# (the target, the x86 instruction its 4-bit kernels multiply with): the host; and an AVX2 CPU
# where the host runs AVX2 but is not one (there the nibbles are unpacked to their values and
# multiplied by one vpmaddubsw each, where VNNI reads them as 16 times the value)
TARGETS = [pytest.param(lambda d: "host", host_x86_instruction, id="host"),
           pytest.param(lambda d: x86_target(d, "haswell"), lambda: "vpmaddubsw", id="avx2",
                        marks=pytest.mark.skipif(
                            not host_has_avx2() or host_x86_instruction() == "vpmaddubsw",
                            reason="the host is an AVX2 CPU already, or cannot run one"))]


def matmul_model(k: int, n: int, rows: int = 3, seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((k, n)) * 0.1).astype(np.float32)
    b = (rng.standard_normal(n) * 0.1).astype(np.float32)
    return make_model([helper.make_node("MatMul", ["x", "w"], ["h"], name="fc"),
                       helper.make_node("Add", ["h", "b"], ["y"], name="fc_bias")],
                      [("x", [rows, k])], [("y", [rows, n])],
                      [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])


def symmetric_codes(w, group, bits: int = 4):
    """(codes [K padded, N] in -8..7, scales [groups, N]) of qcompile's own 4-bit weights:
    c = round(w / s), s = max |w| over the group / 7 (as fp16), K padded with zero weights to
    whole groups; with `bits` 8: -128..127 and / 127."""
    k, n = w.shape
    qmax = (1 << (bits - 1)) - 1
    padded = -(-k // group) * group
    wp = np.zeros((padded, n), np.float32)
    wp[:k] = w
    bound = np.abs(wp.reshape(-1, group, n)).max(axis=1)
    s = np.where(bound > 0, bound / qmax, 1).astype(np.float16).astype(np.float32)
    return np.clip(np.round(wp / np.repeat(s, group, axis=0)), -qmax - 1,
                   qmax).astype(np.int64), s


def w4a8_ref(x, w, b, qp, group):
    """y = s_x * sum_g s[g, n] * sum_{k in g} (q(x) - z_x) * c[k, n] + b, with symmetric
    4-bit codes c = round(w / s), s = max |w| over the group / 7 (as fp16), K padded with
    zero weights to whole groups; the int32 sums exact."""
    k, n = w.shape
    codes, s = symmetric_codes(w, group)
    padded = codes.shape[0]
    lo, hi = RANGES[qp["dtype"]]
    xq = np.clip(np.round(x / np.float32(qp["scale"])) + qp["zero_point"], lo, hi)
    xc = np.zeros((x.shape[0], padded), np.int64)
    xc[:, :k] = xq.astype(np.int64) - qp["zero_point"]
    acc = np.einsum("mgk,gkn->mgn", xc.reshape(x.shape[0], -1, group),
                    codes.reshape(-1, group, n))
    y = np.einsum("mgn,gn->mn", acc.astype(np.float64), s.astype(np.float64))
    return (y * np.float32(qp["scale"]) + b).astype(np.float32)


def test_codes_groups_and_packing():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((576, 24)).astype(np.float32)   # 576 = 4.5 groups of 128
    gw = quantize_groups(w, 128)
    assert gw.codes.shape == (640, 24) and gw.scales.shape == (5, 24)
    assert gw.scales.dtype == np.float16 and gw.codes.max() <= 15
    assert np.all(gw.values()[576:] == 0)                    # the padding weighs nothing
    assert gw.sqnr_db > 18, gw.sqnr_db                         # 4 bits: about 20 dB
    assert np.array_equal(unpack_logical(gw.packed_pairs()), gw.codes.T)
    assert np.array_equal(gw.group_sums(), gw.values().reshape(5, 128, 24).sum(axis=1))
    codes = np.arange(32 * 16).reshape(32, 16) % 16          # [N, K]
    packed = pack_codes(codes, lanes=16, reduce=4)
    assert packed.shape == (2, 2, 16, 4)
    # byte (block 1 of row block 1, lane 5, r 3): k = 8 + 3 (low nibble), 8 + 4 + 3 (high),
    # each nibble the value c - 8 in two's complement, which is c ^ 8
    assert packed[1, 1, 5, 3] == (codes[21, 11] ^ 8) | ((codes[21, 15] ^ 8) << 4)
    low = (packed << 4).view(np.int8).astype(np.int32)       # the kernel reads 16 times the value
    high = (packed & 0xF0).view(np.int8).astype(np.int32)
    assert low[1, 1, 5, 3] == 16 * (codes[21, 11] - 8)
    assert high[1, 1, 5, 3] == 16 * (codes[21, 15] - 8)
    # for a `narrow` instruction (AVX2) the nibbles are the codes, read as c - 8
    packed = pack_codes(codes, lanes=16, reduce=4, centre=0)
    assert (packed[1, 1, 5, 3] & 15) - 8 == codes[21, 11] - 8
    assert (packed[1, 1, 5, 3] >> 4) - 8 == codes[21, 15] - 8


@pytest.mark.parametrize("target_of, instruction", TARGETS)
@pytest.mark.parametrize("k, n, group", [(100, 40, 32), (576, 64, 64), (256, 48, 128)])
def test_w4a8_matches_the_integer_reference(k, n, group, save_model, tmp_path, target_of,
                                            instruction):
    """Reduction lengths that are not whole groups (100, 576 with 128) and outputs that do not
    fill the instruction's blocks (40, 48 with 16 lanes)."""
    model = matmul_model(k, n)
    init = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    calibration = [random_inputs(model, seed=10 + i) for i in range(8)]
    artifact = qcompile.compile(save_model(model), target_of(tmp_path), tmp_path / "out",
                                quantize="int8", calibration=calibration,
                                quant_config=QuantConfig(weight_bits=4, group_size=group,
                                                         weight_rounding="nearest",
                                                         bias_correction=False))
    report = json.loads((tmp_path / "out" / "quantization.json").read_text())
    row = report["layers"][0]
    assert row["precision"] == f"int4-g{group}" and row["weight_rounding"] == "nearest"
    with qcompile.load(artifact.directory) as loaded:
        for seed in range(3):
            x = random_inputs(model, seed=seed)["x"]
            got = loaded.run({"x": x})["y"]
            expected = w4a8_ref(x, init["w"], init["b"], row["input"], group)
            np.testing.assert_allclose(got, expected, rtol=2e-5,
                                       atol=2e-5 * np.abs(expected).max())
    if instruction():
        assert instruction_counts(artifact.library)[instruction()] > 0
        assert artifact.manifest.kernels["int8_default_schedules"] == 1


def pointwise_model(stride: int, k: int = 80, n: int = 40) -> onnx.ModelProto:
    """A 1x1 conv with bias and ReLU of the given stride: K = 80 channels in, 2.5 groups of
    32; N = 40 channels out, 2.5 blocks of 16 lanes."""
    return make_model(
        [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="pointwise",
                          strides=[stride, stride]),
         helper.make_node("Relu", ["c"], ["y"], name="relu")],
        [("x", [1, k, 10, 10])], [("y", [1, n, 10 // stride, 10 // stride])],
        [_w("w", (n, k, 1, 1), 5, 0.1), _w("b", (n,), 6, 0.1)])


@pytest.mark.parametrize("target_of, instruction", TARGETS)
@pytest.mark.parametrize("stride", [1, 2])
def test_w4a8_pointwise_conv_matches_the_integer_reference(stride, save_model, tmp_path,
                                                           target_of, instruction):
    """A 1x1 conv runs on the 4-bit matmul kernel with its pixels as rows (NHWC): the
    reference's integers on every stride-th pixel, the output back in NCHW, ReLU applied."""
    model = pointwise_model(stride)
    init = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    calibration = [random_inputs(model, seed=10 + i) for i in range(8)]
    artifact = qcompile.compile(save_model(model), target_of(tmp_path), tmp_path / "out",
                                quantize="int8", calibration=calibration,
                                quant_config=QuantConfig(weight_bits=4, weight_rounding="nearest",
                                                         bias_correction=False))
    row = json.loads((tmp_path / "out" / "quantization.json").read_text())["layers"][0]
    assert row["precision"] == "int4-g32"
    with qcompile.load(artifact.directory) as loaded:
        for seed in range(2):
            x = random_inputs(model, seed=seed)["x"][:, :, ::stride, ::stride]
            got = loaded.run({"x": random_inputs(model, seed=seed)["x"]})["y"]
            x_rows = x.transpose(0, 2, 3, 1).reshape(-1, x.shape[1])
            expected = w4a8_ref(x_rows, init["w"][:, :, 0, 0].T, init["b"], row["input"], 32)
            expected = np.maximum(expected, 0).reshape(1, *x.shape[2:], -1).transpose(0, 3, 1, 2)
            np.testing.assert_allclose(got, expected, rtol=2e-5,
                                       atol=2e-5 * np.abs(expected).max())
    if instruction():
        assert instruction_counts(artifact.library)[instruction()] > 0
        assert artifact.manifest.kernels["int8_default_schedules"] == 1


def test_w4a16_pointwise_conv_widens_its_codes(save_model, tmp_path):
    """--quantize int8-weights --weight-bits 4 on a 1x1 conv: the float input times the
    weights as their 4-bit codes give them back (symmetric, max |w| / 7 per group of 32)."""
    model = pointwise_model(1)
    init = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    qcompile.compile(save_model(model), "host", tmp_path / "out", quantize="int8-weights",
                     quant_config=QuantConfig(weight_bits=4))
    codes, scales = symmetric_codes(init["w"][:, :, 0, 0].T, 32)
    w = (codes * np.repeat(scales, 32, axis=0))[:80]
    x = random_inputs(model, seed=3)["x"]
    expected = np.maximum(np.einsum("nkhw,kc->nchw", x, w) + init["b"][None, :, None, None], 0)
    with qcompile.load(tmp_path / "out") as loaded:
        got = loaded.run({"x": x})["y"]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())


def test_whole_model_4_bits_keep_other_convolutions_int8_and_say_which(save_model, tmp_path,
                                                                       caplog):
    model = conv_relu()  # one 3x3 convolution (on the image: int8 only when asked)
    with caplog.at_level(logging.WARNING, logger="qcompile"):
        qcompile.compile(save_model(model), "host", tmp_path / "out", quantize="int8",
                         calibration=[random_inputs(model, seed=s) for s in range(4)],
                         quant_config=QuantConfig(weight_bits=4, float_stem=False))
    row = json.loads((tmp_path / "out" / "quantization.json").read_text())["layers"][0]
    assert row["precision"] == "int8"
    assert "1 convolution(s) keep int8 weights" in caplog.text and ": conv" in caplog.text


def test_search_gives_4_bits_to_the_cheapest_layers_the_budget_allows():
    """After the int8 mix, 4-bit weights go to the layers that lose least output SQNR per byte
    saved, as many as the budget allows: the Gemm first and not every layer at a tight
    budget, every layer at a loose one; none when the int8 mix itself misses the budget."""
    from qcompile.quantize.metrics import load_metric
    from qcompile.quantize.rules import LayerSettings
    from qcompile.quantize.search import search

    model = pointwise_chain()
    calibration = [random_inputs(model, s) for s in range(16)]
    validation = [random_inputs(model, 100 + s) for s in range(16)]
    int8, int4 = LayerSettings("int8", activations="uint8"), LayerSettings("int4",
                                                                           activations="uint8")
    cosine = load_metric("cosine")
    tight = search(model, calibration, validation, int8, cosine, 0.99, four_bits=int4)
    costs = tight.four_bit_costs
    assert set(costs) == {"conv1", "conv2", "conv3", "fc"} and tight.kept == []
    chosen = tight.four_bit
    assert chosen == sorted(costs, key=costs.get)[:len(chosen)] and chosen[0] == "fc"
    assert 1 <= len(chosen) < 4
    assert {n for n, s in tight.plan.items() if s.precision == "int4"} == set(chosen)
    assert {s.precision for n, s in tight.plan.items() if n not in chosen} == {"int8"}
    assert 0.99 <= tight.estimate < tight.all_int8
    assert f"{len(chosen)} of them with 4-bit weights" in tight.summary()
    assert tight.to_json()["four_bit_weights"] == chosen
    loose = search(model, calibration, validation, int8, cosine, 0.95, four_bits=int4)
    assert sorted(loose.four_bit) == ["conv1", "conv2", "conv3", "fc"]
    assert loose.int8_mac_fraction == 1.0  # W4A8 multiplies int8 by int8
    # the int8 mix needs an fp32 layer for this budget: the rest stays int8, no 4 bits
    exact = search(model, calibration, validation, int8, cosine, 0.99999, four_bits=int4)
    assert exact.four_bit == [] and exact.estimate >= 0.99999


@pytest.mark.parametrize("palettes", [False, True])
def test_auto_with_4_bit_weights_builds_the_mix_it_chose(palettes, save_model, tmp_path):
    """--quantize auto --weight-bits 4 [--palettes]: the compiled model has 4-bit weights on
    the layers the search chose (pointwise convs and Gemm alike), int8 elsewhere, and its rules
    file gives the same mix with --quantize int8."""
    model = pointwise_chain()
    path = save_model(model)
    calibration = [random_inputs(model, s) for s in range(16)]
    out = tmp_path / "auto"
    qcompile.compile(path, "host", out, quantize="auto", calibration=calibration,
                     validation=[random_inputs(model, 100 + s) for s in range(16)],
                     accuracy_budget=0.97, metric="cosine", latency=False,
                     quant_config=QuantConfig(weight_bits=4, palettes=palettes))
    search = json.loads((out / "search.json").read_text())
    precisions = {r["layer"]: r["precision"] for r in
                  json.loads((out / "quantization.json").read_text())["layers"]}
    four = "lut4-g32" if palettes else "int4-g32"
    assert sorted(search["four_bit_weights"]) == sorted(
        n for n, p in precisions.items() if p == four) != []
    assert search["verified"] >= 0.97
    again = tmp_path / "again"
    qcompile.compile(path, "host", again, quantize="int8", calibration=calibration,
                     quant_config=QuantConfig(rules=PrecisionRules.load(
                         out / "precision-rules.toml")))
    assert {r["layer"]: r["precision"] for r in json.loads(
        (again / "quantization.json").read_text())["layers"]} == precisions


@pytest.mark.parametrize("target", ["arm64-dotprod", "arm64-i8mm"])
def test_arm64_int4_uses_sdot(target, save_model, tmp_path):
    """The 4-bit kernel multiplies one row at a time, so an i8mm CPU runs it on sdot too."""
    model = matmul_model(256, 64)
    calibration = [random_inputs(model, seed=10 + i) for i in range(4)]
    artifact = qcompile.compile(save_model(model), target, tmp_path / "out", quantize="int8",
                                calibration=calibration,
                                quant_config=QuantConfig(weight_bits=4))
    assert artifact.manifest.kernels["int8_default_schedules"] == 1
    assert instruction_counts(artifact.library, "aarch64-linux-gnu-objdump")["sdot"] > 0


def test_gptq_beats_round_to_nearest_at_4_bits(save_model, tmp_path):
    """Correlated inputs (as a real layer's are): GPTQ's error feedback through the calibration
    moments gives a smaller output error than rounding each weight on its own."""
    k, n = 128, 32
    rng = np.random.default_rng(5)
    mix = rng.standard_normal((k, k)).astype(np.float32) / np.sqrt(k)
    model = matmul_model(k, n, rows=8)
    path = save_model(model)

    def sample(seed):
        z = np.random.default_rng(seed).standard_normal((8, k)).astype(np.float32)
        return {"x": (z @ mix + 0.5 * z).astype(np.float32)}

    calibration = [sample(100 + i) for i in range(32)]
    held_out = [sample(200 + i) for i in range(8)]
    init = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    errors = {}
    for rounding in ("gptq", "nearest"):
        out = tmp_path / rounding
        qcompile.compile(path, "host", out, quantize="int8", calibration=calibration,
                         quant_config=QuantConfig(weight_bits=4, weight_rounding=rounding,
                                                  bias_correction=False))
        with qcompile.load(out) as loaded:
            noise = signal = 0.0
            for feed in held_out:
                ref = feed["x"] @ init["w"] + init["b"]
                noise += float(np.sum((loaded.run(feed)["y"] - ref) ** 2))
                signal += float(np.sum(ref ** 2))
        errors[rounding] = 10 * np.log10(signal / noise)
    assert errors["gptq"] > errors["nearest"] + 1.0, errors


def test_bad_4bit_options(save_model, tmp_path, capsys):
    model = matmul_model(64, 16)
    path = save_model(model)
    calibration = tmp_path / "calib.npz"
    np.savez(calibration, x=np.stack([random_inputs(model, s)["x"] for s in range(4)]))
    rules = tmp_path / "rules.toml"
    rules.write_text('[[rule]]\nop = "MatMul"\nprecision = "int4"\ngroup_size = 48\n')
    conv = save_model(conv_relu())
    conv_calibration = tmp_path / "conv.npz"
    np.savez(conv_calibration, x=np.stack([random_inputs(conv_relu(), s)["x"] for s in range(4)]))
    conv_rules = tmp_path / "conv-rules.toml"
    conv_rules.write_text('[[rule]]\nop = "Conv"\nprecision = "int4"\n')
    int8 = ["--quantize", "int8", "--calibration", str(calibration)]
    cases = [
        (path, [*int8, "--precision-rules", str(rules)], "group_size must be one of 32, 64, 128"),
        (path, [*int8, "--group-size", "48"], "invalid choice"),
        (conv, ["--quantize", "int8", "--calibration", str(conv_calibration),
                "--precision-rules", str(conv_rules)], "(a convolution other than 1x1) to int4"),
    ]
    for model_path, extra, message in cases:
        try:
            code = main(["compile", str(model_path), "-o", str(tmp_path / "out"), *extra])
        except SystemExit as exit_info:  # argparse's own errors
            code = exit_info.code
        assert code == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err


@pytest.mark.slow
@pytest.mark.parametrize("target", ["arm64-dotprod", "arm64-i8mm"])
def test_w4a8_on_the_device_matches_the_integer_reference(arm64_device, target, save_model,
                                                          tmp_path):
    """The sdot kernel (packed 4 x 4 weight blocks, two per byte) run on the emulated phone
    (-cpu max) gives the reference's numbers, with int8 activations as ARM takes them."""
    k, n, group = 200, 36, 32
    model = matmul_model(k, n)
    init = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    calibration = [random_inputs(model, seed=10 + i) for i in range(8)]
    artifact = qcompile.compile(save_model(model), target, tmp_path / "out", quantize="int8",
                                calibration=calibration,
                                quant_config=QuantConfig(weight_bits=4, group_size=group,
                                                         weight_rounding="nearest",
                                                         bias_correction=False))
    assert instruction_counts(artifact.library, "aarch64-linux-gnu-objdump")["sdot"] > 0
    row = json.loads((tmp_path / "out" / "quantization.json").read_text())["layers"][0]
    assert row["input"]["dtype"] == "int8"
    x = random_inputs(model, seed=4)["x"]
    with qcompile.load(artifact.directory, rpc_tracker=arm64_device["tracker"],
                       rpc_key=arm64_device["key"]) as loaded:
        got = loaded.run({"x": x})["y"]
    expected = w4a8_ref(x, init["w"], init["b"], row["input"], group)
    np.testing.assert_allclose(got, expected, rtol=2e-5, atol=2e-5 * np.abs(expected).max())
