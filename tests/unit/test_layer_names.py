"""Each conv/matmul of the imported Relax graph keeps its ONNX layer's name (rules match by
it), found by its weight's values: also when the importer transposes a weight (Gemm transB) and
when the ONNX graph has layers with no conv/matmul counterpart (ConvTranspose)."""

from onnx import helper

from models import _w, make_model


def _names(save_model, model):
    from tvm import relax

    from qcompile.frontend import import_onnx
    from qcompile.quantize import layer_names
    from qcompile.quantize.graph import read_graph

    imported = import_onnx(save_model(model))
    graph = read_graph(relax.transform.FoldConstant()(imported.mod))
    return sorted(layer_names(imported, graph).values()), [l.name for l in imported.layers]


def test_layers_around_a_conv_transpose_keep_their_names(save_model):
    model = make_model(
        [helper.make_node("Conv", ["x", "w1"], ["a"], name="first", pads=[1, 1, 1, 1]),
         helper.make_node("ConvTranspose", ["a", "wt"], ["b"], name="up", strides=[2, 2]),
         helper.make_node("Conv", ["b", "w2"], ["y"], name="last")],
        [("x", [1, 4, 8, 8])], [("y", [1, 4, 16, 16])],
        [_w("w1", (4, 4, 3, 3), 1), _w("wt", (4, 4, 2, 2), 2), _w("w2", (4, 4, 1, 1), 3)])
    names, layers = _names(save_model, model)
    assert layers == ["first", "up", "last"]
    assert names == ["first", "last"]  # before: the counts differed, and both lost their names


def test_a_transposed_gemm_weight_is_found_by_its_values(save_model):
    model = make_model(
        [helper.make_node("MatMul", ["x", "w1"], ["a"], name="plain"),
         helper.make_node("Gemm", ["a", "w2"], ["y"], name="transposed", transB=1)],
        [("x", [2, 8])], [("y", [2, 5])], [_w("w1", (8, 6), 4), _w("w2", (5, 6), 5)])
    names, _ = _names(save_model, model)
    assert names == ["plain", "transposed"]
