"""Broken, inconsistent and hostile ONNX files: each is refused before any build with one
paragraph that names the tensor or node and the fix (exit code 2, no traceback), or, where the
model is usable, compiled with a warning."""

import json
import resource
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import GENERIC_TARGET
from qcompile.cli import main


def graph(nodes, inputs, outputs, initializers=(), opset=17):
    """A model as written, not checked: (name, shape[, element type]) per input and output."""
    def info(spec):
        return helper.make_tensor_value_info(spec[0], spec[2] if len(spec) > 2 else
                                             TensorProto.FLOAT, spec[1])

    g = helper.make_graph(nodes, "g", [info(i) for i in inputs], [info(o) for o in outputs],
                          list(initializers))
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def conv_weight(seed=0, shape=(8, 3, 3, 3)):
    return (np.random.default_rng(seed).standard_normal(shape) * 0.3).astype(np.float32)


def conv(weight=None, channels=3):
    w = numpy_helper.from_array(conv_weight() if weight is None else weight, "w")
    return graph([helper.make_node("Conv", ["x", "w"], ["y"], name="conv", pads=[1, 1, 1, 1])],
                 [("x", [1, channels, 8, 8])], [("y", [1, 8, 8, 8])], [w])


def relu(name="x", shape=(1, 4), **kw):
    return graph([helper.make_node("Relu", [name], ["y"], name="r")], [(name, list(shape))],
                 [("y", list(shape))], **kw)


def nan_and_inf_weights():
    w = conv_weight()
    w[0, 0, 0, 0], w[1, 0, 0, 0] = np.nan, np.inf
    return conv(w)


def external_data_missing():
    model = conv()
    tensor = model.graph.initializer[0]
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", "weights.bin"), ("offset", "0"), ("length", "864")):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    return model


def cycle():
    return graph([helper.make_node("Add", ["x", "b"], ["a"], name="n1"),
                  helper.make_node("Relu", ["a"], ["b"], name="n2"),
                  helper.make_node("Relu", ["b"], ["y"], name="n3")],
                 [("x", [1, 4])], [("y", [1, 4])])


def bomb(side=100_000, behind_abs=False):
    """A few hundred bytes whose constant folding would allocate side*side floats; with
    behind_abs, the shape is computed by an op ONNX's shape inference does not evaluate."""
    fill = helper.make_tensor("v", TensorProto.FLOAT, [1], [1.0])
    shape = np.array([side, side], np.int64)
    nodes = [helper.make_node("ConstantOfShape", ["shape"], ["big"], name="fill", value=fill),
             helper.make_node("ReduceSum", ["big"], ["s"], name="sum", keepdims=0),
             helper.make_node("Add", ["x", "s"], ["y"], name="add")]
    if behind_abs:
        nodes.insert(0, helper.make_node("Abs", ["negative"], ["shape"], name="abs"))
    return graph(nodes, [("x", [1, 4])], [("y", [1, 4])],
                 [numpy_helper.from_array(-shape if behind_abs else shape,
                                          "negative" if behind_abs else "shape")])


BAD_MODELS = {
    "cycle": (cycle, ["has a cycle", "node 'n1' (Add) reads 'b' from node 'n2' (Relu)"]),
    "dangling input": (
        lambda: graph([helper.make_node("Add", ["x", "ghost"], ["y"], name="add")],
                      [("x", [1, 4])], [("y", [1, 4])]),
        ["Node 'add' (Add)", "tensor 'ghost'", "incomplete"]),
    "two writers of a tensor": (
        lambda: graph([helper.make_node("Relu", ["x"], ["y"], name="relu"),
                       helper.make_node("Sigmoid", ["x"], ["y"], name="sigmoid")],
                      [("x", [1, 4])], [("y", [1, 4])]),
        ["Tensor 'y'", "two nodes", "'relu' (Relu)", "'sigmoid' (Sigmoid)"]),
    "NaN and infinite weights": (
        nan_and_inf_weights, ["Weight 'w'", "node 'conv' (Conv)", "1 NaN and 1 infinite"]),
    "string input": (
        lambda: graph([helper.make_node("Identity", ["s"], ["y"], name="id")],
                      [("s", [1], TensorProto.STRING)], [("y", [1], TensorProto.STRING)]),
        ["Input 's'", "string tensor", "token ids"]),
    "static dimension 0": (lambda: relu(shape=(0, 4)), ["size 0 on axis 0",
                                                        "--input-shape x:1,4"]),
    "external data missing": (external_data_missing, ["'weights.bin'", "beside the model"]),
    "ConstantOfShape bomb": (bomb, ["Node 'fill' (ConstantOfShape)", "[100000, 100000]",
                                    "40.0 GB"]),
    "bomb whose shape is computed": (lambda: bomb(behind_abs=True),
                                     ["Node 'fill' (ConstantOfShape)", "40.0 GB"]),
}


@pytest.mark.parametrize("case", BAD_MODELS)
@pytest.mark.parametrize("verb", ["compile", "inspect"])
def test_bad_model_is_refused_naming_the_tensor_or_node(case, verb, tmp_path, capsys):
    make, words = BAD_MODELS[case]
    model = make()
    path = tmp_path / "model.onnx"
    onnx.save(model, str(path))
    argv = [verb, str(path)] + (["-o", str(tmp_path / "out")] if verb == "compile" else [])
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith("qcompile: error: ")
    for word in words:
        assert word in err
    assert "dynamic" not in err
    assert not (tmp_path / "out").exists()


def test_int8_compile_refuses_nan_weights_before_calibrating(tmp_path, capsys):
    path = tmp_path / "model.onnx"
    onnx.save(nan_and_inf_weights(), str(path))
    np.savez(tmp_path / "calib.npz", x=np.ones((4, 1, 3, 8, 8), np.float32))
    assert main(["compile", str(path), "-o", str(tmp_path / "out"), "--quantize", "int8",
                 "--calibration", str(tmp_path / "calib.npz"), "--int8-stem"]) == 2
    assert "Weight 'w'" in capsys.readouterr().err


def test_bomb_allocates_nothing_under_a_memory_limit(tmp_path):
    """The refusal comes before constant folding: under a 6 GB address-space limit (TVM and
    onnxruntime take about 2 GB of it when loaded) the 40 GB constant is never allocated."""
    path = tmp_path / "bomb.onnx"
    onnx.save(bomb(), str(path))
    assert path.stat().st_size < 400

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))

    result = subprocess.run([sys.executable, "-m", "qcompile", "compile", str(path), "-o",
                             str(tmp_path / "out")], capture_output=True, text=True,
                            timeout=300, preexec_fn=limit)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and "bad_alloc" not in result.stderr
    assert "ConstantOfShape" in result.stderr


def test_constant_of_a_sensible_size_is_folded(tmp_path, capsys):
    """The bound is on size, not on the op: a 1000x1000 ConstantOfShape is imported."""
    path = tmp_path / "model.onnx"
    onnx.save(bomb(side=1000), str(path))
    assert main(["inspect", str(path)]) == 0
    assert "0 weighted layers" in capsys.readouterr().out


def test_new_opset_is_a_warning(tmp_path, capsys, caplog):
    path = tmp_path / "model.onnx"
    onnx.save(relu(opset=99), str(path))
    assert main(["inspect", str(path)]) == 0
    assert "opset 99, which does not exist" in caplog.text and "or older" in caplog.text


def test_unsorted_nodes_are_sorted(tmp_path, capsys):
    nodes = [helper.make_node("Relu", ["a"], ["y"], name="second"),
             helper.make_node("Conv", ["x", "w"], ["a"], name="first", pads=[1, 1, 1, 1])]
    model = graph(nodes, [("x", [1, 3, 8, 8])], [("y", [1, 8, 8, 8])],
                  [numpy_helper.from_array(conv_weight(), "w")])
    path = tmp_path / "model.onnx"
    onnx.save(model, str(path))
    from qcompile.frontend import load_onnx

    assert [node.name for node in load_onnx(path).graph.node] == ["first", "second"]
    assert main(["inspect", str(path)]) == 0
    assert "first" in capsys.readouterr().out


def test_inconsistent_channels_name_the_shapes_not_input_shape(tmp_path, capsys):
    """A 3-channel conv on a 5-channel input: the paragraph says the model is inconsistent,
    without the --input-shape advice that fits a dynamic model."""
    path = tmp_path / "model.onnx"
    onnx.save(conv(channels=5), str(path))
    assert main(["compile", str(path), "-o", str(tmp_path / "out")]) == 2
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err and "is broken" in captured.err
    assert "channel" in captured.err and "Name:'conv'" in captured.err
    assert "--input-shape" not in captured.err
    assert "Error converting operator" not in captured.out


def test_duplicate_node_names_stay_two_layers_in_int8(tmp_path, capsys, caplog):
    """Two convs both named 'dup': renamed dup, dup_1 with a warning, so the stem's fp32
    decision does not also keep the second conv in fp32."""
    w2 = conv_weight(1, (8, 8, 3, 3))
    model = graph([helper.make_node("Conv", ["x", "w"], ["a"], name="dup", pads=[1, 1, 1, 1]),
                   helper.make_node("Conv", ["a", "w2"], ["y"], name="dup", pads=[1, 1, 1, 1])],
                  [("x", [1, 3, 8, 8])], [("y", [1, 8, 8, 8])],
                  [numpy_helper.from_array(conv_weight(), "w"),
                   numpy_helper.from_array(w2, "w2")])
    path = tmp_path / "model.onnx"
    onnx.save(model, str(path))
    (tmp_path / "cpu.toml").write_text(GENERIC_TARGET)
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "calib.npz", x=rng.standard_normal((4, 1, 3, 8, 8)).astype(np.float32))
    out = tmp_path / "out"
    assert main(["compile", str(path), "--target", str(tmp_path / "cpu.toml"), "-o", str(out),
                 "--quantize", "int8", "--calibration", str(tmp_path / "calib.npz"),
                 "--no-tuning-log"]) == 0
    assert "'dup' -> 'dup_1'" in caplog.text
    layers = {l["name"]: l["precision"]
              for l in json.loads((out / "model.json").read_text())["layers"]}
    assert layers == {"dup": "fp32", "dup_1": "int8"}


def test_gather_compiles_without_tvms_take_warning(tmp_path, capfd):
    """TVM prints "Fast mode segfaults when there are out-of-bounds indices" for every Gather
    it legalizes; that line means nothing to a user and is filtered out."""
    table = np.arange(80, dtype=np.float32).reshape(10, 8)
    model = graph([helper.make_node("Gather", ["table", "ids"], ["y"], name="embed", axis=0)],
                  [("ids", [1, 4], TensorProto.INT64)], [("y", [1, 4, 8])],
                  [numpy_helper.from_array(table, "table")])
    path = tmp_path / "model.onnx"
    onnx.save(model, str(path))
    (tmp_path / "cpu.toml").write_text(GENERIC_TARGET)
    assert main(["compile", str(path), "--target", str(tmp_path / "cpu.toml"), "-o",
                 str(tmp_path / "out"), "--no-tuning-log"]) == 0
    assert "Fast mode" not in capfd.readouterr().err


def test_relax_constants_are_bounded_before_fold_constant(tmp_path):
    """The same bound on the imported Relax module, for shapes only TVM works out: the bomb
    imported without qcompile's ONNX check is refused before FoldConstant runs."""
    from tvm.relax.frontend.onnx import from_onnx

    from qcompile.constant_sizes import check_relax_constants
    from qcompile.errors import ModelError

    mod = from_onnx(bomb(), shape_dict={"x": [1, 4]}, keep_params_in_input=False)
    with pytest.raises(ModelError, match=r"shape \[100000, 100000\] float32 \(40.0 GB\)"):
        check_relax_constants(mod, tmp_path / "bomb.onnx")
    check_relax_constants(from_onnx(bomb(side=1000), shape_dict={"x": [1, 4]},
                                    keep_params_in_input=False), tmp_path / "small.onnx")
