"""Structured pruning (--prune structured --macs-budget F): the hidden channels that can go
are found on real graph shapes (an inverted bottleneck through a depthwise conv, a GELU FFN),
the ones that cannot are named with the reason, the MACs budget is met in whole packing
widths, the consumer's refit makes up for the removed channels better than removing them
alone, and the pruned model compiles, runs and reports what went."""

import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import qcompile
from models import (bottleneck_ffn, onnxruntime_outputs, packed_convnet, pointwise_chain,
                    random_inputs)
from qcompile.cli import main
from qcompile.prune.channels import find_groups
from qcompile.prune import structured
from qcompile.prune.structured import prune_structured


def test_hidden_groups_and_why_others_stay():
    groups, refused = find_groups(bottleneck_ffn())
    assert [(g.name, g.consumer_name, g.channels) for g in groups] == [
        ("expand", "project", 64), ("ffn_in", "ffn_out", 64)]
    expand, ffn = groups
    assert sorted(expand.slices) == [("bd", 0), ("be", 0), ("wd", 0), ("we", 0)]
    assert len(expand.depthwise) == 1 and sorted(ffn.slices) == [("b1", 0), ("w1", 1)]
    # one channel: the expand row (16 MACs), 9 depthwise taps, the project column (16), at
    # 14 x 14 pixels; an FFN neuron: its column of w1 and its row of w2, for 196 tokens
    assert expand.macs_per_channel == 196 * (16 + 9 + 16) and ffn.macs_per_channel == 196 * 32
    assert refused == {
        "project": "its channels reach Add node 'residual' (a tensor from outside the "
                   "channels' path)",
        "ffn_out": "its channels reach Add node 'ffn_residual' (a tensor from outside the "
                   "channels' path)"}
    groups, refused = find_groups(packed_convnet())
    assert "its channels reach Flatten node" in refused["pointwise"]


def _error(model, pruned, feeds) -> float:
    """Relative squared error of the pruned model's outputs against the original's."""
    signal = noise = 0.0
    for feed in feeds:
        ref, out = onnxruntime_outputs(model, feed), onnxruntime_outputs(pruned, feed)
        for name in ref:
            signal += float(np.sum(ref[name].astype(np.float64) ** 2))
            noise += float(np.sum((ref[name] - out[name]).astype(np.float64) ** 2))
    return noise / signal


def _without_refit(model, pruned):
    """`pruned`'s channels removed from `model` by slicing alone: the consumers keep their
    original weights (less the removed inputs) and biases."""
    original = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    naive = onnx.ModelProto()
    naive.CopyFrom(pruned)
    kept_e = _kept(original["we"][:, 0, 0, 0], numpy_helper.to_array(
        next(i for i in pruned.graph.initializer if i.name == "we"))[:, 0, 0, 0])
    kept_f = _kept(original["w1"][0], numpy_helper.to_array(
        next(i for i in pruned.graph.initializer if i.name == "w1"))[0])
    replace = {"wp": original["wp"][:, kept_e], "bp": original["bp"],
               "w2": original["w2"][kept_f], "b2": original["b2"],
               "w2__pruned_bias": np.zeros(16, np.float32)}  # the refit's, after ffn_out
    for init in naive.graph.initializer:
        if init.name in replace:
            init.CopyFrom(numpy_helper.from_array(replace[init.name], init.name))
    return naive


def _kept(full: np.ndarray, kept: np.ndarray) -> list[int]:
    return [int(np.flatnonzero(full == value)[0]) for value in kept]


def test_budget_met_in_whole_widths_and_the_refit_helps():
    model = bottleneck_ffn()
    calibration = [random_inputs(model, s) for s in range(32)]
    held_out = [random_inputs(model, 100 + s) for s in range(32)]
    result = prune_structured(model, calibration, 0.8)
    assert result.macs_after <= 0.8 * result.macs_before
    removed = {g["layer"]: g["channels"] - g["kept"] for g in result.groups}
    assert removed == {"expand": 16, "ffn_in": 16}
    original = numpy_helper.to_array(model.graph.initializer[0])
    we = numpy_helper.to_array(next(i for i in result.onnx.graph.initializer
                                    if i.name == "we"))
    kept = _kept(original[:, 0, 0, 0], we[:, 0, 0, 0])
    # the channels that go are mostly the 16 whose weights are 20x smaller: ReLU6 of their
    # bias, nearly constant, which the consumer's bias takes over
    assert len(set(range(48, 64)) - set(kept)) >= 12
    depthwise = next(n for n in result.onnx.graph.node if n.name == "depthwise")
    assert [a.i for a in depthwise.attribute if a.name == "group"] == [48]
    onnx.checker.check_model(result.onnx)
    refit = _error(model, result.onnx, held_out)
    alone = _error(model, _without_refit(model, result.onnx), held_out)
    assert refit < 0.5 * alone, (refit, alone)
    report = result.to_json()
    assert report["macs_fraction"] <= 0.8 and len(report["kept_whole"]) == 2


def test_too_few_calibration_rows_keep_a_group(monkeypatch):
    """With 4 calibration rows needed a channel, 2 samples give each consumer 2 x 196 rows for
    64 channels, enough; 1 does not: then the channels stay, and the report says why."""
    monkeypatch.setattr(structured, "ROWS_PER_CHANNEL", 4)
    model = bottleneck_ffn()
    result = prune_structured(model, [random_inputs(model, s) for s in range(2)], 0.5)
    assert all(g["kept"] < 64 for g in result.groups) and "expand" not in result.refused
    result = prune_structured(model, [random_inputs(model, 0)], 0.5)
    assert "its consumer saw 196 calibration rows for 64 channels" in result.refused["expand"]
    assert all(g["kept"] == 64 for g in result.groups)
    assert result.macs_after == result.macs_before


def test_at_most_three_quarters_of_a_group_and_a_matmul_gets_its_bias():
    """A budget below what the groups can give stops at 3/4 of each (48 of 64); the FFN's
    second MatMul, which has no bias input, gets the refit's bias as an Add after it."""
    model = bottleneck_ffn()
    calibration = [random_inputs(model, s) for s in range(32)]
    held_out = [random_inputs(model, 100 + s) for s in range(32)]
    result = prune_structured(model, calibration, 0.1)
    assert [g["kept"] for g in result.groups] == [16, 16]
    assert result.macs_after > 0.1 * result.macs_before
    assert any(n.name == "ffn_out__bias" and n.op_type == "Add" for n in result.onnx.graph.node)
    refit = _error(model, result.onnx, held_out)
    alone = _error(model, _without_refit(model, result.onnx), held_out)
    assert refit < 0.5 * alone, (refit, alone)


def test_a_budget_of_everything_changes_nothing():
    model = pointwise_chain()
    result = prune_structured(model, [random_inputs(model, s) for s in range(4)], 1.0)
    assert result.macs_after == result.macs_before
    assert all(g["kept"] == g["channels"] for g in result.groups)


def test_pruned_and_quantized_model_builds(save_model, tmp_path):
    model = bottleneck_ffn()
    path = save_model(model)
    calibration = [random_inputs(model, s) for s in range(32)]
    out = tmp_path / "pruned"
    qcompile.compile(path, "host", out, quantize="int8", calibration=calibration,
                     tuning_log=False, prune="structured", macs_budget=0.7)
    report = json.loads((out / "pruning.json").read_text())
    assert report["macs_fraction"] <= 0.7
    layers = json.loads((out / "quantization.json").read_text())["layers"]
    project = next(r for r in layers if r["layer"] == "project")
    kept = next(g["kept"] for g in report["groups"] if g["layer"] == "expand")
    assert project["weights"] == 16 * kept < 16 * 64
    feeds = [random_inputs(model, 200 + s) for s in range(8)]
    with qcompile.load(out) as loaded:
        outputs = [loaded.run(feed)["y"] for feed in feeds]  # tokens x channels
    reference = [onnxruntime_outputs(model, feed)["y"] for feed in feeds]
    error = sum(float(np.sum((o - r) ** 2)) for o, r in zip(outputs, reference)) / \
        sum(float(np.sum(r ** 2)) for r in reference)
    assert error < 0.05, error


@pytest.mark.parametrize("extra, message", [
    (["--prune", "structured"], "needs --macs-budget F"),
    (["--quantize", "int8", "--macs-budget", "0.8"], "add --prune structured"),
    (["--prune", "structured", "--macs-budget", "1.5"], "in (0, 1], not 1.5"),
    (["--prune", "structured", "--macs-budget", "0.8", "--no-calibration"],
     "on calibration data: pass --calibration"),
    (["--prune", "structured", "--macs-budget", "0.8", "--max-context", "64"],
     "a language model's layers are not pruned yet"),
])
def test_bad_pruning_options(save_model, tmp_path, capsys, extra, message):
    path = save_model(bottleneck_ffn())
    calibration = tmp_path / "calib.npz"
    np.savez(calibration, x=np.stack([random_inputs(bottleneck_ffn(), s)["x"]
                                      for s in range(4)]))
    args = ["compile", str(path), "-o", str(tmp_path / "out")]
    if "--no-calibration" in extra:
        extra = [e for e in extra if e != "--no-calibration"]
    else:
        args += ["--calibration", str(calibration)]
    code = main(args + extra)
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err, err
