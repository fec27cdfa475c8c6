"""Small seeded ONNX models that the tests build, one per op family."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _w(name: str, shape, seed: int, scale: float = 0.3) -> onnx.TensorProto:
    return numpy_helper.from_array((_rng(seed).standard_normal(shape) * scale)
                                   .astype(np.float32), name)


def make_model(nodes, inputs, outputs, initializers=(), opset: int = OPSET) -> onnx.ModelProto:
    def info(spec):
        name, shape, *dtype = spec
        elem = dtype[0] if dtype else TensorProto.FLOAT
        return helper.make_tensor_value_info(name, elem, shape)

    graph = helper.make_graph(nodes, "test", [info(i) for i in inputs],
                              [info(o) for o in outputs], list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def conv_relu() -> onnx.ModelProto:
    """3x3 conv with bias and stride 2, then ReLU."""
    return make_model(
        [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1],
                          strides=[2, 2]),
         helper.make_node("Relu", ["c"], ["y"], name="relu")],
        [("x", [1, 3, 32, 32])], [("y", [1, 16, 16, 16])],
        [_w("w", (16, 3, 3, 3), 1), _w("b", (16,), 2)])


def depthwise_grouped() -> onnx.ModelProto:
    """Depthwise 3x3 conv, ReLU6 (Clip), then a grouped 1x1 conv (4 groups)."""
    return make_model(
        [helper.make_node("Conv", ["x", "dw"], ["d"], name="depthwise", group=16,
                          pads=[1, 1, 1, 1]),
         helper.make_node("Clip", ["d", "lo", "hi"], ["r"], name="relu6"),
         helper.make_node("Conv", ["r", "gw", "gb"], ["y"], name="grouped", group=4)],
        [("x", [1, 16, 14, 14])], [("y", [1, 32, 14, 14])],
        [_w("dw", (16, 1, 3, 3), 3), _w("gw", (32, 4, 1, 1), 4), _w("gb", (32,), 5),
         numpy_helper.from_array(np.array(0.0, np.float32), "lo"),
         numpy_helper.from_array(np.array(6.0, np.float32), "hi")])


def gemm_matmul() -> onnx.ModelProto:
    """Gemm (transB) then MatMul with a constant, then Softmax."""
    return make_model(
        [helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="gemm", transB=1),
         helper.make_node("Relu", ["h"], ["r"], name="relu"),
         helper.make_node("MatMul", ["r", "w2"], ["m"], name="matmul"),
         helper.make_node("Softmax", ["m"], ["y"], name="softmax", axis=-1)],
        [("x", [4, 64])], [("y", [4, 10])],
        [_w("w1", (32, 64), 6), _w("b1", (32,), 7), _w("w2", (32, 10), 8)])


def residual_pool_concat() -> onnx.ModelProto:
    """Conv + residual add, max and average pooling, concat, global average pool."""
    return make_model(
        [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
         helper.make_node("Add", ["c", "x"], ["a"], name="residual"),
         helper.make_node("MaxPool", ["a"], ["mp"], name="maxpool", kernel_shape=[2, 2],
                          strides=[2, 2]),
         helper.make_node("AveragePool", ["a"], ["ap"], name="avgpool", kernel_shape=[3, 3],
                          strides=[2, 2], pads=[1, 1, 1, 1], count_include_pad=0),
         helper.make_node("Concat", ["mp", "ap"], ["cat"], name="concat", axis=1),
         helper.make_node("GlobalAveragePool", ["cat"], ["y"], name="gap")],
        [("x", [1, 8, 16, 16])], [("y", [1, 16, 1, 1])],
        [_w("w", (8, 8, 3, 3), 9)])


def packed_convnet() -> onnx.ModelProto:
    """Layers whose channels fill the int8 dot-product blocks (16 outputs x 4 inputs): a 3x3
    conv (stride 2, padded), a 1x1 conv with ReLU6, a depthwise conv, global average pool and
    a Gemm to 16 classes."""
    return make_model(
        [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv3x3", pads=[1, 1, 1, 1],
                          strides=[2, 2]),
         helper.make_node("Relu", ["c1"], ["r1"], name="relu"),
         helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="pointwise"),
         helper.make_node("Clip", ["c2", "lo", "hi"], ["r2"], name="relu6"),
         helper.make_node("Conv", ["r2", "w3"], ["c3"], name="depthwise", group=64,
                          pads=[1, 1, 1, 1]),
         helper.make_node("GlobalAveragePool", ["c3"], ["g"], name="gap"),
         helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
         helper.make_node("Gemm", ["f", "w4", "b4"], ["y"], name="fc", transB=1)],
        [("x", [1, 16, 20, 20])], [("y", [1, 16])],
        [_w("w1", (32, 16, 3, 3), 21, 0.1), _w("b1", (32,), 22), _w("w2", (64, 32, 1, 1), 23, 0.2),
         _w("b2", (64,), 24), _w("w3", (64, 1, 3, 3), 25), _w("w4", (16, 64), 26),
         _w("b4", (16,), 27),
         numpy_helper.from_array(np.array(0.0, np.float32), "lo"),
         numpy_helper.from_array(np.array(6.0, np.float32), "hi")])


def padded_channels() -> onnx.ModelProto:
    """Output channels that are not a multiple of VNNI's 16 lanes: 24 and 40 (packed with
    zero channels up to 32 and 48, like EfficientNet-Lite0's project convs) and a Gemm to 10
    classes (16 would be 6 zero channels of 16: left unpacked on VNNI; 12 on ARM's 4 lanes)."""
    return make_model(
        [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv24", pads=[1, 1, 1, 1]),
         helper.make_node("Relu", ["c1"], ["r1"], name="relu"),
         helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv40"),
         helper.make_node("GlobalAveragePool", ["c2"], ["g"], name="gap"),
         helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
         helper.make_node("Gemm", ["f", "w3", "b3"], ["y"], name="fc10", transB=1)],
        [("x", [1, 16, 12, 12])], [("y", [1, 10])],
        [_w("w1", (24, 16, 3, 3), 41, 0.1), _w("b1", (24,), 42), _w("w2", (40, 24, 1, 1), 43, 0.2),
         _w("b2", (40,), 44), _w("w3", (10, 40), 45), _w("b3", (10,), 46)])


def outlier_chain() -> onnx.ModelProto:
    """Four 1x1 convs; the second writes one channel 300x larger than the others (the
    outlier activations of transformers), which the third reads through tiny weights: only
    the third conv loses much accuracy in int8 (its per-tensor input scale drowns the other
    channels)."""
    w2 = _rng(32).standard_normal((16, 16, 1, 1)).astype(np.float32) * 0.3
    w2[0] *= 300.0
    w3 = _rng(33).standard_normal((16, 16, 1, 1)).astype(np.float32) * 0.3
    w3[:, 0] *= 1e-3
    return make_model(
        [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1"),
         helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
         helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv2"),
         helper.make_node("Conv", ["c2", "w3"], ["c3"], name="conv3"),
         helper.make_node("Relu", ["c3"], ["r3"], name="relu3"),
         helper.make_node("Conv", ["r3", "w4", "b4"], ["y"], name="conv4")],
        [("x", [1, 16, 8, 8])], [("y", [1, 16, 8, 8])],
        [_w("w1", (16, 16, 1, 1), 31), _w("b1", (16,), 34),
         numpy_helper.from_array(w2, "w2"), numpy_helper.from_array(w3, "w3"),
         _w("w4", (16, 16, 1, 1), 35), _w("b4", (16,), 36)])


def pointwise_chain() -> onnx.ModelProto:
    """Three 1x1 convs (the second with stride 2, and one input channel of its weights 12x
    the others) and a Gemm of 2560 weights: every layer has a 4-bit kernel, the Gemm loses
    least per byte in 4 bits."""
    w2 = _rng(52).standard_normal((64, 64, 1, 1)).astype(np.float32) * 0.2
    w2[:, 5] *= 12.0
    return make_model(
        [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1"),
         helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
         helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", strides=[2, 2]),
         helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
         helper.make_node("Conv", ["r2", "w3", "b3"], ["c3"], name="conv3"),
         helper.make_node("Flatten", ["c3"], ["f"], name="flatten"),
         helper.make_node("Gemm", ["f", "w4", "b4"], ["y"], name="fc", transB=1)],
        [("x", [1, 32, 8, 8])], [("y", [1, 10])],
        [_w("w1", (64, 32, 1, 1), 51, 0.2), _w("b1", (64,), 53, 0.1),
         numpy_helper.from_array(w2, "w2"), _w("b2", (64,), 54, 0.1),
         _w("w3", (16, 64, 1, 1), 55, 0.2), _w("b3", (16,), 56, 0.1),
         _w("w4", (10, 256), 57, 0.1), _w("b4", (10,), 58, 0.1)])


def spiky_chain() -> onnx.ModelProto:
    """Three 1x1 convs; the first reads an input with rare spikes (spiky_inputs) and is
    clipped to [0, 6] after it, so only the first conv's input range is wide: in 8 bits its
    scale is set by the spikes and the ordinary values round to a few steps; 16-bit inputs
    hold them (int8-a16), and so would fp32. The weights are plain: int8 weights lose
    little."""
    return make_model(
        [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1"),
         helper.make_node("Clip", ["c1", "lo", "hi"], ["r1"], name="relu6"),
         helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2"),
         helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
         helper.make_node("Conv", ["r2", "w3", "b3"], ["y"], name="conv3")],
        [("x", [1, 16, 8, 8])], [("y", [1, 16, 8, 8])],
        [_w("w1", (16, 16, 1, 1), 41), _w("b1", (16,), 42), _w("w2", (16, 16, 1, 1), 43),
         _w("b2", (16,), 44), _w("w3", (16, 16, 1, 1), 45), _w("b3", (16,), 46),
         numpy_helper.from_array(np.array(0.0, np.float32), "lo"),
         numpy_helper.from_array(np.array(6.0, np.float32), "hi")])


def spiky_inputs(model: onnx.ModelProto, seed: int = 0) -> dict[str, np.ndarray]:
    """random_inputs with two values in a thousand 300x larger (spiky_chain's input)."""
    feeds = random_inputs(model, seed)
    rng = _rng(seed + 10_000)
    for name, value in feeds.items():
        spikes = rng.random(value.shape) < 0.002
        spikes.flat[rng.integers(value.size)] = True  # every sample sets the range
        feeds[name] = np.where(spikes, 300.0 * np.sign(value), value).astype(value.dtype)
    return feeds


def resize_layernorm() -> onnx.ModelProto:
    """Bilinear and nearest Resize, then LayerNormalization over the last axis."""
    scales = numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales")
    return make_model(
        [helper.make_node("Resize", ["x", "", "scales"], ["up"], name="resize_linear",
                          mode="linear", coordinate_transformation_mode="half_pixel"),
         helper.make_node("Resize", ["up", "", "scales"], ["up2"], name="resize_nearest",
                          mode="nearest", coordinate_transformation_mode="asymmetric",
                          nearest_mode="floor"),
         helper.make_node("LayerNormalization", ["up2", "gamma", "beta"], ["y"],
                          name="layernorm", axis=-1, epsilon=1e-5)],
        [("x", [1, 4, 6, 6])], [("y", [1, 4, 24, 24])],
        [scales, _w("gamma", (24,), 10), _w("beta", (24,), 11)])


def two_inputs_two_outputs() -> onnx.ModelProto:
    """Two inputs of different dtypes, two outputs."""
    return make_model(
        [helper.make_node("Cast", ["n"], ["nf"], name="cast", to=TensorProto.FLOAT),
         helper.make_node("Mul", ["x", "nf"], ["y"], name="mul"),
         helper.make_node("ReduceSum", ["y"], ["s"], name="sum", keepdims=0)],
        [("x", [2, 3]), ("n", [2, 3], TensorProto.INT64)],
        [("y", [2, 3]), ("s", [])])


def conv_upsample() -> onnx.ModelProto:
    """An int8 conv followed by a ConvTranspose (a segmentation or detection head's
    upsampling), which stays float and keeps its layout when the int8 graph goes NHWC."""
    return make_model(
        [helper.make_node("Conv", ["x", "w"], ["a"], name="conv", pads=[1, 1, 1, 1]),
         helper.make_node("Relu", ["a"], ["r"], name="relu"),
         helper.make_node("Conv", ["r", "w2"], ["d"], name="conv2", pads=[1, 1, 1, 1]),
         helper.make_node("ConvTranspose", ["d", "wt", "bt"], ["y"], name="up",
                          strides=[2, 2])],
        [("x", [1, 8, 12, 12])], [("y", [1, 4, 24, 24])],
        [_w("w", (16, 8, 3, 3), 30), _w("w2", (16, 16, 3, 3), 31), _w("wt", (16, 4, 2, 2), 32),
         _w("bt", (4,), 33)])


def lstm_cell() -> onnx.ModelProto:
    """An LSTM cell written out as exporters of recurrent audio models write it: one Gemm on
    [x, h] whose output is split into the four gates (a tuple-valued op between int8 layers),
    two inputs of state, two outputs of state."""
    split = numpy_helper.from_array(np.array([32, 32, 32, 32], np.int64), "split")
    return make_model(
        [helper.make_node("Concat", ["x", "h"], ["xh"], name="concat", axis=1),
         helper.make_node("Gemm", ["xh", "w", "b"], ["gates"], name="gates"),
         helper.make_node("Split", ["gates", "split"], ["i", "f", "g", "o"], name="split",
                          axis=1),
         helper.make_node("Sigmoid", ["i"], ["si"], name="sig_i"),
         helper.make_node("Sigmoid", ["f"], ["sf"], name="sig_f"),
         helper.make_node("Tanh", ["g"], ["tg"], name="tanh_g"),
         helper.make_node("Sigmoid", ["o"], ["so"], name="sig_o"),
         helper.make_node("Mul", ["sf", "c"], ["fc"], name="mul_f"),
         helper.make_node("Mul", ["si", "tg"], ["ig"], name="mul_i"),
         helper.make_node("Add", ["fc", "ig"], ["c_next"], name="cell"),
         helper.make_node("Tanh", ["c_next"], ["tc"], name="tanh_c"),
         helper.make_node("Mul", ["so", "tc"], ["h_mid"], name="mul_o"),
         helper.make_node("MatMul", ["h_mid", "proj"], ["h_next"], name="proj")],
        [("x", [1, 16]), ("h", [1, 32]), ("c", [1, 32])],
        [("h_next", [1, 32]), ("c_next", [1, 32])],
        [_w("w", (48, 128), 20), _w("b", (128,), 21), split, _w("proj", (32, 32), 22)])


def embedding_matmul() -> onnx.ModelProto:
    """Token ids -> a word-embedding lookup (Gather on a [256, 64] table) -> a linear layer;
    the ids are made non-negative and spread over the table (|id| * 37)."""
    return make_model(
        [helper.make_node("Abs", ["ids"], ["a"], name="abs"),
         helper.make_node("Mul", ["a", "step"], ["rows"], name="spread"),
         helper.make_node("Gather", ["table", "rows"], ["e"], name="embedding", axis=0),
         helper.make_node("MatMul", ["e", "w"], ["m"], name="proj"),
         helper.make_node("Add", ["m", "b"], ["y"], name="proj_bias")],
        [("ids", [2, 6], TensorProto.INT64)], [("y", [2, 6, 16])],
        [_w("table", (256, 64), 30, scale=1.0), _w("w", (64, 16), 31), _w("b", (16,), 32),
         numpy_helper.from_array(np.array(37, np.int64), "step")])


def dynamic_batch() -> onnx.ModelProto:
    """A Gemm whose input has a dynamic batch dimension."""
    return make_model(
        [helper.make_node("Gemm", ["x", "w"], ["y"], name="gemm", transB=1)],
        [("x", ["batch", 8])], [("y", ["batch", 4])], [_w("w", (4, 8), 12)])


def unsupported_op() -> onnx.ModelProto:
    """An LSTM, which TVM 0.27's ONNX importer does not implement."""
    return make_model(
        [helper.make_node("LSTM", ["x", "w", "r"], ["y"], name="encoder_lstm", hidden_size=4)],
        [("x", [5, 1, 3])], [("y", [5, 1, 1, 4])],
        [_w("w", (1, 16, 3), 13), _w("r", (1, 16, 4), 14)], opset=14)


NUMERIC_MODELS = {
    "conv_relu": conv_relu,
    "depthwise_grouped": depthwise_grouped,
    "gemm_matmul": gemm_matmul,
    "residual_pool_concat": residual_pool_concat,
    "resize_layernorm": resize_layernorm,
    "two_inputs_two_outputs": two_inputs_two_outputs,
}


def bottleneck_ffn() -> onnx.ModelProto:
    """An inverted bottleneck (1x1 expand to 64, ReLU6, depthwise 3x3, ReLU6, 1x1 project,
    residual add), then its 196 pixels as tokens through a transformer-style FFN (MatMul to 64
    with bias, GELU as x * (1 + erf(x / sqrt 2)) / 2, MatMul back, residual add): two groups
    of 64 hidden channels, a quarter of each one's producer weights 20x smaller."""
    rng = _rng(61)
    expand = rng.standard_normal((64, 16, 1, 1)).astype(np.float32) * 0.3
    expand[48:] *= 0.05
    w1 = rng.standard_normal((16, 64)).astype(np.float32) * 0.3
    w1[:, 48:] *= 0.05
    const = lambda name, v: numpy_helper.from_array(np.array(v, np.float32), name)  # noqa: E731
    return make_model(
        [helper.make_node("Conv", ["x", "we", "be"], ["e"], name="expand"),
         helper.make_node("Clip", ["e", "lo", "hi"], ["e6"], name="expand_relu6"),
         helper.make_node("Conv", ["e6", "wd", "bd"], ["d"], name="depthwise", group=64,
                          pads=[1, 1, 1, 1]),
         helper.make_node("Clip", ["d", "lo", "hi"], ["d6"], name="depthwise_relu6"),
         helper.make_node("Conv", ["d6", "wp", "bp"], ["p"], name="project"),
         helper.make_node("Add", ["p", "x"], ["r"], name="residual"),
         helper.make_node("Reshape", ["r", "tokens"], ["t"], name="to_tokens"),
         helper.make_node("Transpose", ["t"], ["f"], name="tokens_last", perm=[1, 0]),
         helper.make_node("MatMul", ["f", "w1"], ["h"], name="ffn_in"),
         helper.make_node("Add", ["h", "b1"], ["hb"], name="ffn_in_bias"),
         helper.make_node("Div", ["hb", "sqrt2"], ["hs"], name="gelu_div"),
         helper.make_node("Erf", ["hs"], ["he"], name="gelu_erf"),
         helper.make_node("Add", ["he", "one"], ["h1"], name="gelu_add"),
         helper.make_node("Mul", ["hb", "h1"], ["hm"], name="gelu_mul"),
         helper.make_node("Mul", ["hm", "half"], ["hg"], name="gelu_half"),
         helper.make_node("MatMul", ["hg", "w2"], ["o"], name="ffn_out"),
         helper.make_node("Add", ["o", "b2"], ["ob"], name="ffn_out_bias"),
         helper.make_node("Add", ["ob", "f"], ["y"], name="ffn_residual")],
        [("x", [1, 16, 14, 14])], [("y", [196, 16])],
        [numpy_helper.from_array(expand, "we"), _w("be", (64,), 62, 0.5),
         _w("wd", (64, 1, 3, 3), 63, 0.3), _w("bd", (64,), 64, 0.5),
         _w("wp", (16, 64, 1, 1), 65, 0.2), _w("bp", (16,), 66, 0.1),
         numpy_helper.from_array(w1, "w1"), _w("b1", (64,), 67, 0.3),
         _w("w2", (64, 16), 68, 0.2), _w("b2", (16,), 69, 0.1),
         const("lo", 0.0), const("hi", 6.0), const("sqrt2", np.sqrt(2.0)),
         const("one", 1.0), const("half", 0.5),
         numpy_helper.from_array(np.array([16, 196], np.int64), "tokens")])


def random_inputs(model: onnx.ModelProto, seed: int = 0) -> dict[str, np.ndarray]:
    """Random data for every input of a model with static shapes."""
    rng = _rng(seed)
    feeds = {}
    for inp in model.graph.input:
        shape = [d.dim_value for d in inp.type.tensor_type.shape.dim]
        dtype = helper.tensor_dtype_to_np_dtype(inp.type.tensor_type.elem_type)
        if np.issubdtype(dtype, np.floating):
            feeds[inp.name] = rng.standard_normal(shape).astype(dtype)
        else:
            feeds[inp.name] = rng.integers(-3, 4, shape).astype(dtype)
    return feeds


def onnxruntime_outputs(model, feeds) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    data = model if isinstance(model, (bytes, str)) else model.SerializeToString()
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds)))


def assert_close(actual: np.ndarray, expected: np.ndarray, rtol: float = 1e-4) -> None:
    """Equal within rtol, relative to each element and to the tensor's largest magnitude."""
    scale = float(np.abs(expected).max()) if expected.size else 0.0
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * scale)
