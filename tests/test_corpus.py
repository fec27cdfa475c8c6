"""Real models that no other test names (tests/corpus_models.py: OCR, voice activity,
detection, a model that arrives quantized), each compiled for this machine in fp32 (the same
outputs as onnxruntime) and in int8 (its own task's measure against fp32 above the model's
threshold); two also in int8 on the emulated ARM64 phone (arm64-dotprod). The rule they hold
qcompile to: a model that compiles in fp32 compiles in int8; what cannot be realized in
integers stays float, and the quantization report never breaks the build.

Marked `corpus` (about 12 minutes for all of them): `pytest -m corpus` runs them; .ci/run runs
the ones marked `slow` too (the models whose int8 once failed to build)."""

from __future__ import annotations

import re

import numpy as np
import onnxruntime as ort
import pytest

import qcompile
from corpus_models import BY_NAME, CORPUS, calibration_samples, held_out_outputs
from qcompile.errors import UnsupportedOpError

# the models whose int8 build once crashed (a float ConvTranspose in the NHWC int8 graph; a
# split of an LSTM's gates): part of CI's slow tier
IN_CI = {"ppocr-det", "silero-vad"}


def _runner(session_or_model, names):
    if isinstance(session_or_model, ort.InferenceSession):
        return lambda feed: session_or_model.run(None, feed)
    return lambda feed: [session_or_model.run(feed)[name] for name in names]


def _marks(name):
    return [pytest.mark.corpus] + ([pytest.mark.slow] if name in IN_CI else [])


@pytest.mark.parametrize("name", [pytest.param(m.name, marks=_marks(m.name)) for m in CORPUS])
def test_a_real_model_compiles_in_fp32_and_int8(name, tmp_path):
    model = BY_NAME[name]
    path = model.prepared(tmp_path)
    if model.unsupported:  # refused before any work, naming the op (until TVM imports it)
        with pytest.raises(UnsupportedOpError, match=re.escape(model.unsupported)):
            qcompile.compile(path, "host", tmp_path / "fp32", input_shapes=model.shapes)
        return
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    reference = held_out_outputs(model, _runner(session, names))

    fp32 = qcompile.compile(path, "host", tmp_path / "fp32", input_shapes=model.shapes,
                            tuning_log=False)
    with qcompile.load(fp32.directory) as loaded:
        compiled = held_out_outputs(model, _runner(loaded, names))
    for expected, actual in zip(reference, compiled):
        pairs = [(expected, actual)] if model.sequence else zip(expected, actual)
        for e, a in pairs:
            e, a = np.float64(e), np.float64(a)
            assert np.abs(a - e).max() <= 1e-3 * max(np.abs(e).max(), 1.0), name

    calibration = calibration_samples(model, _runner(session, names))
    int8 = qcompile.compile(path, "host", tmp_path / "int8", quantize="int8",
                            input_shapes=model.shapes, calibration=calibration,
                            tuning_log=False)
    assert any(layer["precision"] == "int8" for layer in int8.manifest.layers), name
    with qcompile.load(int8.directory) as loaded:
        quantized = held_out_outputs(model, _runner(loaded, names))
    score = model.score(reference, quantized)
    print(f"corpus: {name}: int8 {model.measure} {score:.3f}")  # the docs' table (pytest -s)
    assert score >= model.threshold, f"{name}: {model.measure} {score:.3f}"


PHONE = ("ppocr-cls", "ppocr-det")  # small enough for the emulated CPU


@pytest.mark.corpus
@pytest.mark.parametrize("name", PHONE)
def test_a_real_model_in_int8_on_the_emulated_phone(name, tmp_path, arm64_device):
    """Built for arm64-dotprod (sdot kernels) and run on the emulated ARM64 device through the
    tracker: the task's measure against onnxruntime fp32 on this machine."""
    model = BY_NAME[name]
    path = model.prepared(tmp_path)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    reference = held_out_outputs(model, _runner(session, names))
    artifact = qcompile.compile(path, "arm64-dotprod", tmp_path / "arm", quantize="int8",
                                input_shapes=model.shapes, tuning_log=False,
                                calibration=calibration_samples(model,
                                                                _runner(session, names)))
    with qcompile.load(artifact.directory, rpc_tracker=arm64_device["tracker"],
                       rpc_key=arm64_device["key"]) as remote:
        on_phone = held_out_outputs(model, _runner(remote, names))
    score = model.score(reference, on_phone)
    print(f"corpus: {name} on arm64-dotprod (emulated): int8 {model.measure} {score:.3f}")
    assert score >= model.threshold, f"{name} on arm64-dotprod: {model.measure} {score:.3f}"
