"""Int8 layers with 16-bit inputs (rules: activations = "uint16" / "int16"): the input is
split into its high and low bytes, both multiplied by the int8 weights in one int8 kernel, and
the two int32 accumulators combined. Checked against the numpy reference of test_quantize.py
(the same arithmetic on the whole 16-bit integers), on the target's dot-product instruction,
through a residual add, and in the precision search's simulator."""

import json

import numpy as np
import pytest
from onnx import helper

import qcompile
from models import (_w, depthwise_grouped, make_model, packed_convnet, random_inputs)
from qcompile.errors import InputError
from qcompile.quantize import QuantConfig, quantize
from qcompile.quantize.rules import LayerSettings, PrecisionRules
from qcompile.targets import load_target
from test_int8_kernels import X86_PACKED, instruction_counts, x86_target
from test_quantize import calibration, compile_int8, depthwise_grouped_ref, initializers


def wide(*names, activations="uint16"):
    return PrecisionRules.from_dict({"rule": [{"name": list(names),
                                               "activations": activations}]})


@pytest.mark.parametrize("layer", ["grouped", "depthwise"])
@pytest.mark.parametrize("activations", ["uint16", "int16"])
def test_16bit_input_matches_the_integer_reference(save_model, tmp_path, layer, activations):
    """grouped: the depthwise conv requantizes its output (through ReLU6) to 16 bits for it.
    depthwise: the model input is quantized to 16 bits, and padded with its zero point before
    it is split into bytes."""
    model = depthwise_grouped()
    loaded, rows, _ = compile_int8(model, save_model, tmp_path / "out",
                                        rules=wide(layer, activations=activations))
    assert rows[layer]["precision"] == "int8-a16"
    assert rows[layer]["input"]["dtype"] == activations
    other = "depthwise" if layer == "grouped" else "grouped"
    assert rows[other]["precision"] == "int8" and rows[other]["input"]["dtype"] == "uint8"
    if layer == "grouped":
        assert rows["depthwise"]["output"] == rows["grouped"]["input"]
    x = random_inputs(model, seed=42)["x"]
    expected, wq2, acc_scale2 = depthwise_grouped_ref(x, rows, initializers(model))
    actual = loaded.run({"x": x})["y"]
    # one LSB of the intermediate tensor may differ (float rounding at a .5 boundary)
    step = float(np.abs(wq2).sum(axis=(1, 2, 3)).max() * acc_scale2.max())
    np.testing.assert_allclose(actual, expected, rtol=0, atol=step)
    close = np.isclose(actual, expected, rtol=0, atol=4 * float(acc_scale2.max()))
    assert close.mean() > 0.98


def test_arm_byte_planes_compute_the_same_integers(save_model):
    """On ARM the bytes are int8 (sdot multiplies s8 x s8), on x86 uint8 (vpdpbusd: u8 x s8):
    the same model quantized for each gives the same outputs (both run here, on the host)."""
    from qcompile.frontend import import_onnx
    from qcompile.quantize.static import host_vm

    model = depthwise_grouped()
    float_model = import_onnx(save_model(model))
    config = QuantConfig(rules=wide("depthwise", "grouped", activations="int16"),
                         float_stem=False, bias_correction=False, weight_rounding="nearest")
    outputs = []
    for target in ("host", "arm64-dotprod"):
        q = quantize(float_model, calibration(model), config, target=load_target(target))
        assert [r["precision"] for r in q.report.rows] == ["int8-a16", "int8-a16"]
        vm = host_vm(q.mod)
        x = random_inputs(model, seed=7)["x"]
        import tvm

        outputs.append(vm["main"](tvm.runtime.tensor(x)).numpy())
    np.testing.assert_allclose(outputs[0], outputs[1], rtol=0, atol=1e-5)


@pytest.mark.parametrize("instruction, target_of", X86_PACKED)
def test_16bit_input_runs_on_the_instruction_and_matches_unpacked_kernels(
        save_model, tmp_path, instruction, target_of):
    """The pointwise conv's 16-bit input: its two bytes go through the packed kernel (VNNI,
    or AVX2) as a batch of two; a CPU with neither computes the same integers with TVM's own
    kernels."""
    model = packed_convnet()
    path = save_model(model)
    config = QuantConfig(rules=wide("pointwise", "fc"))
    cal = [random_inputs(model, seed=10 + i) for i in range(8)]
    packed = qcompile.compile(path, target_of(tmp_path), tmp_path / "packed", quantize="int8",
                              calibration=cal, quant_config=config)
    plain = qcompile.compile(path, x86_target(tmp_path, "nehalem"), tmp_path / "plain",
                             quantize="int8", calibration=cal, quant_config=config)
    assert [l["precision"] for l in packed.manifest.layers] == ["int8", "int8-a16", "int8",
                                                             "int8-a16"]
    assert packed.manifest.kernels["int8_default_schedules"] == 4  # with the depthwise conv
    assert instruction_counts(packed.library)[instruction] > 0
    for seed in range(3):
        feeds = random_inputs(model, seed=seed)
        with qcompile.load(packed.directory) as a, qcompile.load(plain.directory) as b:
            assert np.array_equal(a.run(feeds)["y"], b.run(feeds)["y"])


def residual_block():
    """conv -> + input (a residual add) -> 1x1 conv: a linear stream with an outlier channel,
    which one int8 scale holds badly."""
    scales = np.ones((1, 16, 1, 1), np.float32)
    scales[0, 3] = 40.0  # one channel far wider than the others
    from onnx import numpy_helper

    return make_model(
        [helper.make_node("Mul", ["x", "s"], ["xs"], name="scale"),
         helper.make_node("Conv", ["xs", "w1", "b1"], ["c1"], name="conv1"),
         helper.make_node("Add", ["c1", "xs"], ["a"], name="residual"),
         helper.make_node("Conv", ["a", "w2", "b2"], ["y"], name="conv2")],
        [("x", [1, 16, 8, 8])], [("y", [1, 32, 8, 8])],
        [numpy_helper.from_array(scales, "s"), _w("w1", (16, 16, 1, 1), 31, 0.2),
         _w("b1", (16,), 32), _w("w2", (32, 16, 1, 1), 33, 0.2), _w("b2", (32,), 34)])


def _sqnr(reference, approx):
    return 10 * np.log10(np.sum(reference ** 2) / np.sum((reference - approx) ** 2))


def test_residual_stream_is_16bit_through_the_add(save_model, tmp_path):
    """conv2's 16-bit input is the residual add's output: the add's inputs (conv1's output
    and the model input) are 16-bit too, so only requantization rounds the stream. The
    simulator of the precision search gives the same outputs as the compiled model."""
    from qcompile.quantize.simulate import Simulator, onnxruntime_outputs

    model = residual_block()
    path = save_model(model)
    cal = calibration(model)
    feeds = [random_inputs(model, seed=100 + i) for i in range(4)]
    reference = onnxruntime_outputs(model, feeds)
    results = {}
    for activations in ("uint8", "uint16"):
        out = tmp_path / activations
        qcompile.compile(path, "host", out, quantize="int8", calibration=cal,
                         quant_config=QuantConfig(rules=wide("conv2", activations=activations),
                                                  float_stem=False))
        rows = {r["layer"]: r for r in json.loads((out / "quantization.json").read_text())
                ["layers"]}
        with qcompile.load(out) as loaded:
            results[activations] = [loaded.run(f)["y"] for f in feeds]
        if activations == "uint16":
            assert rows["conv1"]["output"]["dtype"] == "uint16"  # requantized into the add
            assert rows["conv2"]["input"]["dtype"] == "uint16"
            assert rows["conv1"]["input"]["dtype"] == "uint8"
    ref = np.concatenate([r[0].ravel() for r in reference])
    sqnr = {a: _sqnr(ref, np.concatenate([y.ravel() for y in ys])) for a, ys in results.items()}
    assert sqnr["uint16"] > sqnr["uint8"] + 3, sqnr  # measured: 32.9 vs 28.4 dB

    simulator = Simulator(model, cal, bias_correction=True)
    plan = {"conv1": LayerSettings("int8"), "conv2": LayerSettings("int8", activations="uint16")}
    simulated = np.concatenate([o[0].ravel() for o in simulator.run(plan, feeds)])
    compiled = np.concatenate([y.ravel() for y in results["uint16"]])
    assert _sqnr(compiled, simulated) > sqnr["uint16"] + 10, (_sqnr(compiled, simulated), sqnr)


def test_16bit_activations_are_named_in_rules_and_refused_for_dynamic(save_model, tmp_path):
    path = tmp_path / "rules.toml"
    path.write_text('[[rule]]\nname = "a"\nactivations = "int32"')
    with pytest.raises(InputError, match="activations must be one of uint8, int8, uint16, "
                                         "int16"):
        PrecisionRules.load(path)
    with pytest.raises(InputError, match="needs static int8"):
        qcompile.compile(save_model(depthwise_grouped()), "host", tmp_path / "out",
                         quantize="int8-dynamic",
                         quant_config=QuantConfig(activations="int16"))
