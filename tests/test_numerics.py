"""Compiled .so files, reloaded from disk, match onnxruntime within 1e-4 relative."""

import pytest

import qcompile
from models import NUMERIC_MODELS, assert_close, onnxruntime_outputs, random_inputs


@pytest.mark.parametrize("name", sorted(NUMERIC_MODELS))
def test_host_build_matches_onnxruntime(name, save_model, tmp_path):
    model = NUMERIC_MODELS[name]()
    artifact = qcompile.compile(save_model(model), "host", tmp_path / "out")
    assert artifact.library.is_file()

    loaded = qcompile.load(tmp_path / "out")  # from disk: manifest + .so
    feeds = random_inputs(model)
    expected = onnxruntime_outputs(model, feeds)
    actual = loaded.run(feeds)
    assert list(actual) == [o.name for o in model.graph.output]
    for out_name, value in expected.items():
        assert actual[out_name].shape == value.shape
        assert actual[out_name].dtype == value.dtype
        assert_close(actual[out_name], value)


def test_manifest_describes_the_library(save_model, tmp_path):
    import hashlib
    import json

    import tvm

    model = NUMERIC_MODELS["depthwise_grouped"]()
    qcompile.compile(save_model(model), "host", tmp_path / "out")
    manifest = json.loads((tmp_path / "out" / "model.json").read_text())
    library = (tmp_path / "out" / "model.so").read_bytes()
    assert manifest["library"]["sha256"] == hashlib.sha256(library).hexdigest()
    assert manifest["inputs"] == [{"name": "x", "shape": [1, 16, 14, 14], "dtype": "float32"}]
    assert manifest["outputs"] == [{"name": "y", "shape": [1, 32, 14, 14], "dtype": "float32"}]
    assert manifest["target"]["name"] == "host"
    assert manifest["target"]["target"]["kind"] == "llvm"
    assert manifest["target"]["target"]["mcpu"] != "native"  # resolved to this CPU
    assert manifest["layers"] == [
        {"name": "depthwise", "op": "Conv", "precision": "fp32"},
        {"name": "grouped", "op": "Conv", "precision": "fp32"}]
    assert manifest["versions"] == {"qcompile": qcompile.__version__, "tvm": tvm.__version__}


def test_dynamic_batch_with_input_shape(save_model, tmp_path):
    import numpy as np

    from models import dynamic_batch

    model = dynamic_batch()
    qcompile.compile(save_model(model), "host", tmp_path / "out", input_shapes={"x": (3, 8)})
    loaded = qcompile.load(tmp_path / "out")
    assert loaded.inputs[0].shape == (3, 8) and loaded.outputs[0].shape == (3, 4)
    x = np.random.default_rng(1).standard_normal((3, 8)).astype(np.float32)
    assert_close(loaded.run({"x": x})["y"], onnxruntime_outputs(model, {"x": x})["y"])
