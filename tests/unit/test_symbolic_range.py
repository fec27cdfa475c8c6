"""An ONNX Range whose bounds come from a symbolic size keeps its length through TVM's importer
(qcompile.symbolic_range): a causal mask's shapes stay known, so attention's do."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper


def range_model(start_offset: int | None) -> onnx.ModelProto:
    """y = x + Range(start, n) as float, x [1, n]; start 0, or n - start_offset."""
    ints = lambda name, *v: numpy_helper.from_array(np.array(v, np.int64), name)  # noqa: E731
    nodes = [helper.make_node("Shape", ["x"], ["shape"]),
             helper.make_node("Gather", ["shape", "one"], ["n"]),
             helper.make_node("Range", ["start", "n", "step"], ["r"]),
             helper.make_node("Cast", ["r"], ["rf"], to=TensorProto.FLOAT),
             helper.make_node("Add", ["x", "rf"], ["y"])]
    inits = [numpy_helper.from_array(np.array(1, np.int64), "one"), ints("step", 1)]
    if start_offset is None:
        inits.append(numpy_helper.from_array(np.array(0, np.int64), "start"))
    else:
        nodes.insert(2, helper.make_node("Sub", ["n", "offset"], ["start"]))
        inits.append(numpy_helper.from_array(np.array(start_offset, np.int64), "offset"))
    graph = helper.make_graph(
        nodes, "range", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "n"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("offset, length", [(None, "n"), (2, "2")])
def test_range_keeps_its_symbolic_length(offset, length):
    from tvm.relax.frontend.onnx import from_onnx

    from qcompile.symbolic_range import symbolic_range

    with symbolic_range():
        mod = from_onnx(range_model(offset), keep_params_in_input=False)
    text = str(mod["main"])
    ranges = [line for line in text.splitlines() if "R.arange" in line]
    assert len(ranges) == 1 and "range_len" not in text, text
    assert f"R.Tensor(({length},)" in ranges[0], ranges[0]
    if offset is None:  # x + Range(0, n): the same n on both sides, so the sum's shape stays
        assert "-> R.Tensor((1, n)" in text


def test_without_it_the_length_is_lost():
    """What the converter works around: TVM's own Range makes a fresh length."""
    from tvm.relax.frontend.onnx import from_onnx

    mod = from_onnx(range_model(None), keep_params_in_input=False)
    assert "range_len" in str(mod["main"])
