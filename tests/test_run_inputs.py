"""How `LoadedModel.run` hands inputs to the runtime: an array TVM can take as it is (64-byte
aligned, writable) without a copy, any other one copied into a tensor kept for that input.
Every form gives onnxruntime's outputs, and no run sees an earlier run's data."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

import qcompile
from conftest import GENERIC_TARGET
from models import conv_relu, random_inputs



@pytest.fixture(scope="module")
def built(tmp_path_factory):
    import onnx

    work = tmp_path_factory.mktemp("run-inputs")
    onnx.save(conv_relu(), str(work / "model.onnx"))
    (work / "generic.toml").write_text(GENERIC_TARGET)
    qcompile.compile(work / "model.onnx", work / "generic.toml", work / "out")
    session = ort.InferenceSession(str(work / "model.onnx"), providers=["CPUExecutionProvider"])
    return qcompile.load(work / "out"), session


def _placed(array: np.ndarray, offset: int) -> np.ndarray:
    """A copy of `array` whose data starts `offset` bytes past a 64-byte boundary."""
    buffer = np.empty(array.nbytes + 64 + offset, np.uint8)
    start = (-buffer.ctypes.data) % 64 + offset
    placed = buffer[start:start + array.nbytes].view(array.dtype).reshape(array.shape)
    placed[...] = array
    return placed


def test_every_form_of_input_gives_onnxruntimes_outputs_and_stays_unchanged(built):
    model, session = built
    x = random_inputs(conv_relu(), seed=3)["x"]
    expected = session.run(None, {"x": x})[0]
    readonly = _placed(x, 0)
    readonly.setflags(write=False)
    for name, array in [("aligned", _placed(x, 0)), ("unaligned", _placed(x, 16)),
                        ("read-only", readonly), ("strided", np.asfortranarray(x))]:
        before = array.copy()
        got = model.run({"x": array})["y"]
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5, err_msg=name)
        np.testing.assert_array_equal(array, before, err_msg=name)


def test_an_aligned_array_is_not_copied_and_others_reuse_one_tensor(built):
    model, _ = built
    x = random_inputs(conv_relu(), seed=4)["x"]
    model._staged.clear()
    model.run({"x": _placed(x, 0)})
    assert not model._staged  # taken as it is
    model.run({"x": _placed(x, 16)})
    kept = model._staged[0]
    model.run({"x": _placed(x, 32)})
    assert model._staged[0] is kept


def test_no_run_sees_an_earlier_runs_inputs(built):
    model, session = built
    a, b = (random_inputs(conv_relu(), seed=s)["x"] for s in (5, 6))
    for offset in (0, 16):  # without a copy, and through the kept tensor
        first = model.run({"x": _placed(a, offset)})["y"]
        second = model.run({"x": _placed(b, offset)})["y"]
        np.testing.assert_allclose(first, session.run(None, {"x": a})[0], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(second, session.run(None, {"x": b})[0], rtol=1e-5,
                                   atol=1e-5)
        assert not np.allclose(first, second)
