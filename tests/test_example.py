"""The bundled example: ImageNet EfficientNet-Lite0 converted from its PyTorch weights."""

import numpy as np
import pytest

import qcompile
from models import assert_close, onnxruntime_outputs
from qcompile.examples import efficientnet_lite0 as effnet
from qcompile.examples.photos import photos


@pytest.fixture(scope="module")
def onnx_path(tmp_path_factory):
    return effnet.export(tmp_path_factory.mktemp("effnet") / "efficientnet-lite0.onnx")


def test_converted_model_classifies_real_photos(onnx_path):
    batch = {name: effnet.preprocess(image) for name, image in photos().items()}
    data = onnx_path.read_bytes()
    top1 = {name: effnet.top5(onnxruntime_outputs(data, {"images": x})["logits"])[0][0]
            for name, x in batch.items()}
    assert top1["chelsea"] in ("tabby, tabby cat", "Egyptian cat", "tiger cat")
    assert top1["coffee"] == "espresso"


def test_compiled_model_matches_onnxruntime_on_photos(onnx_path, tmp_path):
    artifact = qcompile.compile(onnx_path, "host", tmp_path / "out")
    assert [layer["op"] for layer in artifact.manifest.layers].count("Conv") == 49
    loaded = qcompile.load(tmp_path / "out")
    data = onnx_path.read_bytes()
    for name, image in photos().items():
        x = effnet.preprocess(image)
        expected = onnxruntime_outputs(data, {"images": x})["logits"]
        actual = loaded.run({"images": x})["logits"]
        assert_close(actual, expected)
        assert np.argmax(actual) == np.argmax(expected), name


def test_example_command(tmp_path, capsys):
    from qcompile.cli import main

    assert main(["example", "-o", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "espresso" in out and "latency on this machine" in out
    assert (tmp_path / "host" / "model.so").is_file()
