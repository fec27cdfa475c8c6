"""The other ways to run a model in fewer bits than fp32, each against a reference written
from its definition or against onnxruntime: fp16, weight-only int8, dynamic int8, and models
that arrive quantized (onnxruntime's static QDQ and QOperator models, its dynamic ConvInteger
and MatMulInteger ones), realized as integer kernels with their own scales."""

import json

import numpy as np
import pytest

import qcompile
from models import (depthwise_grouped, gemm_matmul, onnxruntime_outputs, packed_convnet,
                    random_inputs, residual_pool_concat)
from qcompile.cli import main
from test_quantize import calibration, initializers, weights_ref


def _ort_quantized(model, path, out, fmt="QDQ"):
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType,
                                          quantize_static)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.samples = iter(calibration(model))

        def get_next(self):
            return next(self.samples, None)

    quantize_static(str(path), str(out), Reader(), quant_format=getattr(QuantFormat, fmt),
                    per_channel=True, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8)
    return out


def _op_by_op(path, feeds) -> dict:
    """The outputs of a QDQ model run by onnxruntime op by op, each op in float between its
    DequantizeLinear and QuantizeLinear: what the format defines. (Its fused int8 kernels, and
    the QOperator model's, add u8 x s8 products in 16-bit pairs that saturate on x86 CPUs
    without VNNI: 5 quantization steps off on an AMD EPYC with AVX2 only.)"""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))


@pytest.mark.parametrize("fmt", ["QDQ", "QOperator"])
@pytest.mark.parametrize("build", [depthwise_grouped, residual_pool_concat, gemm_matmul])
def test_onnxruntime_quantized_model_runs_as_integer_kernels(build, fmt, save_model, tmp_path):
    """A model quantized by onnxruntime's quantize_static, in QDQ format or as QOperator ops
    (QLinearConv, QGemm, QLinearAdd, ... which TVM cannot import), keeps its own scales and
    int8 weights, and matches the QDQ model's definition within one quantization step."""
    import onnx
    from onnx import numpy_helper

    model = build()
    qdq = _ort_quantized(model, save_model(model), tmp_path / "q.onnx", fmt)
    twin = qdq if fmt == "QDQ" else _ort_quantized(model, save_model(model),
                                                   tmp_path / "twin.onnx", "QDQ")
    artifact = qcompile.compile(qdq, "host", tmp_path / "out")  # no calibration needed
    layers = artifact.manifest.layers
    assert layers and all(layer["precision"] == "int8" for layer in layers), layers
    qmodel = onnx.load(str(qdq))
    init = {i.name: numpy_helper.to_array(i) for i in qmodel.graph.initializer}
    output = qmodel.graph.output[0].name
    producer = next(n for n in qmodel.graph.node if output in n.output)
    for seed in (3, 4):
        feeds = random_inputs(model, seed=seed)
        expected = _op_by_op(twin, feeds)[output]
        actual = qcompile.load(tmp_path / "out").run(feeds)[output]
        if producer.op_type == "DequantizeLinear":
            step = float(init[producer.input[1]])
            assert np.abs(actual - expected).max() <= step * 1.001
        else:  # softmax after the last DQ: probabilities within 1e-2
            np.testing.assert_allclose(actual, expected, atol=1e-2)


@pytest.mark.parametrize("build", [depthwise_grouped, gemm_matmul, residual_pool_concat])
def test_fp16_stays_close_to_fp32(build, save_model, tmp_path, capsys):
    model = build()
    assert main(["compile", str(save_model(model)), "--quantize", "fp16", "-o",
                 str(tmp_path / "out")]) == 0
    manifest = json.loads((tmp_path / "out" / "model.json").read_text())
    assert {layer["precision"] for layer in manifest["layers"]} == {"fp16"}
    feeds = random_inputs(model, seed=11)
    expected = onnxruntime_outputs(model, feeds)
    actual = qcompile.load(tmp_path / "out").run(feeds)
    for name, value in expected.items():
        assert actual[name].dtype == value.dtype  # outputs stay fp32
        np.testing.assert_allclose(actual[name], value, rtol=0,
                                   atol=2e-3 * float(np.abs(value).max()) + 1e-3)


# -- no calibration: weight-only and dynamic int8 ----------------------------------------------
def _dequantized_copy(model):
    """`model` with every weight replaced by its per-channel int8 dequantized value (the
    reference for weight-only int8)."""
    import copy

    from onnx import numpy_helper

    axes = {}  # weight initializer -> output channel axis
    for node in model.graph.node:
        if node.op_type == "Conv":
            axes[node.input[1]] = 0
        elif node.op_type == "Gemm":
            trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
            axes[node.input[1]] = 0 if trans_b else 1
        elif node.op_type == "MatMul":
            axes[node.input[1]] = 1
    out = copy.deepcopy(model)
    for init in out.graph.initializer:
        if init.name in axes:
            w = numpy_helper.to_array(init)
            wq, scales = weights_ref(w, axes[init.name])
            shape = [1] * w.ndim
            shape[axes[init.name]] = -1
            init.CopyFrom(numpy_helper.from_array(
                (wq * scales.reshape(shape)).astype(np.float32), init.name))
    return out


@pytest.mark.parametrize("build", [packed_convnet, depthwise_grouped, gemm_matmul])
def test_weight_only_int8_is_fp32_math_on_the_int8_weights(build, save_model, tmp_path):
    model = build()
    artifact = qcompile.compile(save_model(model), "host", tmp_path / "out",
                                quantize="int8-weights")
    assert {layer["precision"] for layer in artifact.manifest.layers} == {"int8-weights"}
    reference = _dequantized_copy(model)
    feeds = random_inputs(model, seed=4)
    expected = onnxruntime_outputs(reference, feeds)
    with qcompile.load(artifact.directory) as loaded:
        actual = loaded.run(feeds)
    for name, value in expected.items():
        np.testing.assert_allclose(actual[name], value, rtol=1e-4,
                                   atol=1e-5 * float(np.abs(value).max()))


def dynamic_quantize_ref(x, dtype="uint8"):
    """onnxruntime's DynamicQuantizeLinear applied to each row of x (the last axis) on its
    own, as dynamic int8 quantizes its inputs: (x_q, scales, zero points), [..., 1] each."""
    qmin, qmax = (0, 255) if dtype == "uint8" else (-128, 127)
    f32 = np.float32
    lo = np.minimum(x.min(axis=-1, keepdims=True), f32(0))
    hi = np.maximum(x.max(axis=-1, keepdims=True), f32(0))
    scale = ((hi - lo) / f32(qmax - qmin)).astype(f32)
    zp = np.clip(np.round(f32(qmin) - lo / scale), qmin, qmax)
    q = np.clip(np.round(x / scale) + zp, qmin, qmax)
    return q.astype(np.int64), scale, zp.astype(np.int64)


@pytest.mark.parametrize("target,dtype", [("host", "uint8"), ("arm64-dotprod", "int8")])
def test_dynamic_int8_matches_the_reference(target, dtype, save_model, tmp_path):
    """Gemm -> ReLU -> MatMul -> Softmax with activations quantized at run time; the arm64
    build is checked for its int8 activations and sdot without running it (no device here)."""
    model = gemm_matmul()
    artifact = qcompile.compile(save_model(model), target, tmp_path / "out",
                                quantize="int8-dynamic")
    assert {layer["precision"] for layer in artifact.manifest.layers} == {"int8-dynamic"}
    report = json.loads((tmp_path / "out" / "quantization.json").read_text())
    assert report["activations"] == dtype
    if target != "host":
        from test_int8_kernels import instruction_counts

        assert instruction_counts(artifact.library, "aarch64-linux-gnu-objdump")["sdot"] > 0
        return
    init = initializers(model)
    x = random_inputs(model, seed=6)["x"]

    def layer(x, w):
        xq, s_x, zp = dynamic_quantize_ref(x)
        wq, s_w = weights_ref(w, 1)
        return ((xq - zp) @ wq).astype(np.float32) * (s_x * s_w).astype(np.float32)

    hidden = np.maximum(layer(x, init["w1"].T) + init["b1"], 0)
    logits = layer(hidden, init["w2"])
    e = np.exp(logits - logits.max(axis=-1, keepdims=True))
    expected = e / e.sum(axis=-1, keepdims=True)
    with qcompile.load(artifact.directory) as loaded:
        np.testing.assert_allclose(loaded.run({"x": x})["y"], expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("weights", ["QInt8", "QUInt8"])
@pytest.mark.parametrize("per_channel", [False, True])
def test_onnxruntime_dynamic_model_with_integer_ops(weights, per_channel, save_model, tmp_path):
    """onnxruntime's quantize_dynamic: DynamicQuantizeLinear, ConvInteger (which TVM cannot
    import) and MatMulInteger, with weight zero points when the weights are uint8; against
    the ONNX reference evaluator (numpy, from the operators' definitions: onnxruntime's own
    u8 x s8 kernels saturate on x86 CPUs without VNNI, _op_by_op)."""
    import onnx
    from onnx.reference import ReferenceEvaluator
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = packed_convnet()
    quantized = tmp_path / "dynamic.onnx"
    quantize_dynamic(str(save_model(model)), str(quantized), per_channel=per_channel,
                     weight_type=getattr(QuantType, weights),
                     op_types_to_quantize=["Conv", "MatMul", "Gemm"])
    ops = {node.op_type for node in onnx.load(str(quantized)).graph.node}
    assert {"ConvInteger", "MatMulInteger", "DynamicQuantizeLinear"} <= ops
    artifact = qcompile.compile(quantized, "host", tmp_path / "out")
    for seed in (1, 2):
        feeds = random_inputs(model, seed=seed)
        expected = ReferenceEvaluator(onnx.load(str(quantized))).run(["y"], feeds)[0]
        with qcompile.load(artifact.directory) as loaded:
            actual = loaded.run(feeds)["y"]
        np.testing.assert_allclose(actual, expected, rtol=0,
                                   atol=1e-5 * float(np.abs(expected).max()))
