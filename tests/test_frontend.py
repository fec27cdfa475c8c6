"""Importing real and broken ONNX models."""

import numpy as np
import onnx
import pytest

import qcompile
from models import (assert_close, dynamic_batch, onnxruntime_outputs, unsupported_op)
from qcompile.errors import ModelError, ShapeError, UnsupportedOpError
from qcompile.frontend import import_onnx
from qcompile.specs import parse_input_shape


def test_missing_file(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        import_onnx(tmp_path / "nope.onnx")


def test_not_onnx(tmp_path):
    path = tmp_path / "model.onnx"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    with pytest.raises(ModelError, match="not an ONNX model|holds no ONNX graph"):
        import_onnx(path)


def test_unsupported_op_names_op_and_node(save_model):
    with pytest.raises(UnsupportedOpError) as err:
        import_onnx(save_model(unsupported_op()))
    assert "LSTM" in str(err.value) and "'encoder_lstm'" in str(err.value)


def test_dynamic_input_without_shape_names_the_input(save_model):
    with pytest.raises(ShapeError) as err:
        import_onnx(save_model(dynamic_batch()))
    assert "Input 'x'" in str(err.value) and "--input-shape x:1,8" in str(err.value)


@pytest.mark.parametrize("shapes, message", [
    ({"images": (1, 8)}, "not an input of the model"),
    ({"x": (1, 8, 1)}, "3 dimensions"),
    ({"x": (2, 9)}, "fixes that axis to 8"),
])
def test_bad_input_shapes(save_model, shapes, message):
    with pytest.raises(ShapeError, match=message):
        import_onnx(save_model(dynamic_batch()), shapes)


@pytest.mark.parametrize("text", ["x", "x:", ":1,2", "x:1,a", "x:0,3"])
def test_malformed_input_shape(text):
    with pytest.raises(ShapeError, match="malformed"):
        parse_input_shape(text)


def test_parse_input_shape_allows_colons_in_names():
    assert parse_input_shape("input:0:1,3,224,224") == ("input:0", (1, 3, 224, 224))


def _rapidocr_model(name):
    from importlib import resources

    path = resources.files("rapidocr_onnxruntime") / "models" / name
    if not path.is_file():
        pytest.fail(f"rapidocr-onnxruntime does not ship {name} any more")
    return path


def _text_image(shape):
    """Printed text on white, normalized as PaddleOCR does (ImageNet mean/std)."""
    from PIL import Image, ImageDraw, ImageFont

    height, width = shape[2:]
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=max(12, height // 12))
    for row, line in enumerate(["qcompile int8", "TVM Relax 0.27", "hello phones"]):
        draw.text((width // 16, height // 8 + row * height // 4), line, fill="black", font=font)
    pixels = np.asarray(image, dtype=np.float32) / 255.0
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    return ((pixels - mean) / std).transpose(2, 0, 1)[None].astype(np.float32)


@pytest.mark.parametrize("name, shape", [
    ("ch_ppocr_mobile_v2.0_cls_infer.onnx", (1, 3, 48, 192)),
    ("ch_PP-OCRv4_det_infer.onnx", (1, 3, 320, 320)),
])
def test_paddleocr_models_with_runtime_shapes_compile(name, shape, tmp_path):
    """PP-OCR exports compute Reshape shapes and Pad pads in the graph; TVM's importer
    rejects the cls model as it is. Fixed input shapes + constant folding make them compile."""
    path = _rapidocr_model(name)
    model = onnx.load(str(path))
    input_name = model.graph.input[0].name
    artifact = qcompile.compile(path, "host", tmp_path / "out", input_shapes={input_name: shape})
    x = _text_image(shape)
    expected = onnxruntime_outputs(path.read_bytes(), {input_name: x})
    actual = qcompile.load(artifact.directory).run({input_name: x})
    for out_name, value in expected.items():
        assert value.max() > 0.5  # the models see the text: real, not degenerate, outputs
        assert_close(actual[out_name], value)


def test_squares_become_products_and_other_powers_stay(save_model, tmp_path):
    """RMSNorm's Pow(x, 2) is imported as x * x (TVM would call powf per element); a cube
    stays a power; both compute what onnxruntime does."""
    from onnx import helper, numpy_helper

    from models import make_model

    two, three = (numpy_helper.from_array(np.array(v, np.float32), n)
                  for v, n in ((2.0, "two"), (3.0, "three")))
    nodes = [helper.make_node("Pow", ["x", "two"], ["squared"]),
             helper.make_node("ReduceMean", ["squared"], ["mean"], axes=[-1]),
             helper.make_node("Sqrt", ["mean"], ["rms"]),
             helper.make_node("Div", ["x", "rms"], ["normed"]),
             helper.make_node("Pow", ["normed", "three"], ["y"])]
    model = make_model(nodes, [("x", [2, 16])], [("y", [2, 16])], [two, three], opset=13)
    path = save_model(model)
    ops = [c.op.name for c in _calls(import_onnx(path).mod["main"])]
    assert ops.count("relax.power") == 1 and "relax.multiply" in ops
    x = np.random.default_rng(0).standard_normal((2, 16)).astype(np.float32)
    artifact = qcompile.compile(path, "host", tmp_path / "out")
    assert_close(qcompile.load(artifact.directory).run({"x": x})["y"],
                 onnxruntime_outputs(path.read_bytes(), {"x": x})["y"])


def _calls(function):
    from tvm import relax

    return [b.value for block in function.body.blocks for b in block.bindings
            if isinstance(b.value, relax.Call)]
