"""Realize on IR, without building: the int8 kernels it emits (op counts and dtypes), and
`verify`, which says which layers planned as int8 did not become int8 kernels."""

import numpy as np
import pytest

from models import packed_convnet
from qcompile.quantize.observers import QParams
from qcompile.quantize.realize import Realizer, verify
from qcompile.quantize.schemes import Fp16, Fp32, Int8
from qcompile.quantize.values import RealizeConfig


def _graph(save_model, model):
    from tvm import relax

    from qcompile.frontend import import_onnx
    from qcompile.quantize.graph import read_graph

    mod = relax.transform.FoldConstant()(import_onnx(save_model(model)).mod)
    return mod, read_graph(mod)


def _every_float_tensor(graph) -> dict:
    """Made-up parameters for every float tensor: what calibration would give, roughly."""
    tensors = [p for p in graph.function.params] + [n.var for n in graph.nodes]
    return {t: QParams(0.05, 128, "uint8") for t in tensors
            if getattr(t.ty, "dtype", None) == "float32"}


def _calls(mod, name):
    from tvm import relax

    found = []
    relax.analysis.post_order_visit(
        mod["main"], lambda e: found.append(e) if isinstance(e, relax.Call) and
        getattr(e.op, "name", "") == name else None)
    return found


def test_every_layer_becomes_an_int8_kernel(save_model):
    mod, graph = _graph(save_model, packed_convnet())
    config = RealizeConfig()
    realizer = Realizer(mod, graph, _every_float_tensor(graph), config)
    realized = realizer.run()
    assert verify(realized, config, graph, realizer.layers) == []
    convs = _calls(realized, "relax.nn.conv2d")
    assert convs and all(str(c.ty.dtype) == "int32" and str(c.args[1].ty.dtype) == "int8"
                         for c in convs)
    assert str(convs[0].args[0].ty.dtype) == "uint8"
    assert [r.precision for r in realizer.layers] == ["int8"] * len(realizer.layers)
    assert len(_calls(realized, "relax.matmul")) == 1  # the Gemm


def test_schemes_follow_the_plan(save_model):
    mod, graph = _graph(save_model, packed_convnet())
    layers = [n.name for n in graph.nodes if n.kind in ("conv2d", "matmul")]
    plan = {layers[0]: Fp32("the test's reason"), layers[1]: Fp16()}
    config = RealizeConfig(plan=plan)
    realizer = Realizer(mod, graph, _every_float_tensor(graph), config)
    realized = realizer.run()
    by_name = {r.var: r for r in realizer.layers}
    assert by_name[layers[0]].precision == "fp32"
    assert by_name[layers[0]].reason == "the test's reason"
    assert by_name[layers[1]].precision == "fp16"
    assert verify(realized, config, graph, realizer.layers) == []
    half = [c for c in _calls(realized, "relax.nn.conv2d") if str(c.args[1].ty.dtype) ==
            "float16"]
    assert len(half) == 1


def test_verify_names_the_layers_that_missed_their_plan(save_model):
    """Nothing calibrated: every layer planned int8 stays float, and verify says so."""
    mod, graph = _graph(save_model, packed_convnet())
    layers = [n.name for n in graph.nodes if n.kind in ("conv2d", "matmul")]
    config = RealizeConfig(plan={name: Int8() for name in layers})
    realizer = Realizer(mod, graph, {}, config)
    problems = verify(realizer.run(), config, graph, realizer.layers)
    assert len(problems) == len(layers)
    assert all("was planned int8 but runs in fp32: its input has no calibration" in p
               for p in problems)
