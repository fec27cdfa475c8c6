"""flow.py's two graph-wide decisions, on flows written by hand and on both graphs of the same
model (Relax from the importer, ONNX as the simulator reads it): they must agree."""

import numpy as np

from models import outlier_chain, packed_convnet, residual_pool_concat
from qcompile.quantize.flow import Flow, FlowNode, integer_tensors, wide_tensors


def _flow():
    # x -> conv a -> relu -> add(., conv b(x)) -> mean -> matmul c -> out
    #                                         \-> softmax (float) -> out2
    nodes = [FlowNode("conv2d", ("x",), "a", "A"), FlowNode("relu", ("a",), "r"),
             FlowNode("conv2d", ("x",), "b", "B"), FlowNode("add", ("r", "b"), "s"),
             FlowNode("mean", ("s",), "m"), FlowNode("matmul", ("m",), "out", "C"),
             FlowNode("other", ("s",), "out2")]
    return Flow.of(nodes, ["out", "out2"])


def test_integers_flow_only_into_integer_uses():
    flow = _flow()
    # s is read by softmax (float): the add runs in float, so its inputs are not kept; the
    # mean's result is (C reads it)
    assert integer_tensors(flow, {"A", "B", "C"}) == {"x", "m"}
    flow = Flow.of([n for n in flow.nodes if n.output != "out2"], ["out"])
    assert integer_tensors(flow, {"A", "B", "C"}) == {"x", "a", "r", "b", "s", "m"}
    # C in float: the mean's result would only be dequantized, and so up the chain
    assert integer_tensors(flow, {"A", "B"}) == {"x"}


def test_a_layer_reading_a_tensor_as_its_weight_does_not_keep_it():
    flow = Flow.of([FlowNode("matmul", ("q", "k"), "s", None)], ["s"])
    assert integer_tensors(flow, set()) == frozenset()


def test_wide_tensors_go_back_through_integer_ops_only():
    flow = _flow()
    wide = wide_tensors(flow, {"C": "uint16"})
    assert wide == {"m": "uint16", "s": "uint16", "r": "uint16", "b": "uint16", "a": "uint16"}
    assert wide_tensors(flow, {"C": "uint16"}, keep={"m", "s"}) == {"m": "uint16",
                                                                     "s": "uint16"}


def _both(model):
    import onnx
    from tvm import relax

    from qcompile.frontend import import_onnx
    from qcompile.quantize.graph import read_graph, relax_flow
    from qcompile.quantize.onnx_view import onnx_flow, weighted_layers

    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as work:
        path = Path(work) / "m.onnx"
        onnx.save(model, str(path))
        imported = import_onnx(path)
    graph = read_graph(relax.transform.FoldConstant()(imported.mod))
    layers = weighted_layers(imported.onnx)
    return graph, relax_flow(graph), onnx_flow(imported.onnx, layers), layers


def test_relax_and_onnx_flows_keep_the_same_layers_inputs_in_integers():
    """Every layer int8: the layers whose input tensor stays an integer are the same on both
    graphs (layers named by position: the importer keeps their order)."""
    for model in (packed_convnet(), residual_pool_concat(), outlier_chain()):
        graph, relax_flow, onnx_flow, layers = _both(model)
        relax_layers = [n for n in relax_flow.nodes if n.layer is not None]
        onnx_layers = [n for n in onnx_flow.nodes if n.layer is not None]
        assert len(relax_layers) == len(onnx_layers) == len(layers)
        on_relax = integer_tensors(relax_flow, [n.layer for n in relax_layers])
        on_onnx = integer_tensors(onnx_flow, [n.layer for n in onnx_layers])
        kept_relax = [n.inputs[0] in on_relax for n in relax_layers]
        kept_onnx = [n.inputs[0] in on_onnx for n in onnx_layers]
        assert kept_relax == kept_onnx, model.graph.name
        # some layer after the first reads an integer tensor
        assert len(relax_layers) == 1 or any(kept_relax[1:])
        assert np.all(np.isin([n.kind for n in onnx_layers], ["conv2d", "matmul"]))
