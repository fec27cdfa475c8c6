"""Bounds on the constants that compiling a model computes: constant folding (onnxsim through
onnxruntime, then TVM's FoldConstant) evaluates every node whose inputs are all constants, and a
few bytes of ConstantOfShape can ask it for gigabytes. A computed constant larger than the
model's largest weight and CONSTANT_LIMIT is refused, naming the node, before anything folds it;
running out of memory while folding anyway is a ModelError too (out_of_memory).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from .errors import ModelError

log = logging.getLogger(__name__)

CONSTANT_LIMIT = 10 ** 9  # bytes: what a computed constant may take at least
_ADVICE = ("A model that needs it cannot run on a phone: check the shape this node is given, "
           "and re-export the model.")


def out_of_memory(exc: BaseException) -> bool:
    """Whether `exc` is running out of memory: Python's MemoryError, a C++ std::bad_alloc that
    onnxruntime or TVM turned into an error, or onnxruntime's arena failing to allocate."""
    text = str(exc)
    return isinstance(exc, MemoryError) or any(
        sign in text for sign in ("bad_alloc", "bad allocation", "Failed to allocate memory"))


def check_constant_sizes(model, shapes, path: Path) -> None:
    """Refuse a node computed from constants alone whose output would take more than the
    model's largest weight and CONSTANT_LIMIT: constant folding (onnxsim, TVM) would allocate
    it. Shapes come from ONNX shape inference on a copy without the large weights' values."""
    import onnx

    skeleton, largest = _skeleton(model, shapes)
    try:
        inferred = onnx.shape_inference.infer_shapes(skeleton, data_prop=True)
    except Exception as exc:  # noqa: BLE001 - inference is a help here, never a requirement
        log.debug("shape inference failed (%s); constant sizes not checked", exc)
        return
    infos = {v.name: v.type.tensor_type for v in inferred.graph.value_info}
    infos.update((v.name, v.type.tensor_type) for v in inferred.graph.output)
    limit = max(CONSTANT_LIMIT, largest)
    constant = {i.name for i in model.graph.initializer} | {""}
    for index, node in enumerate(model.graph.node):
        if not all(name in constant for name in node.input) or \
                any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
                    for a in node.attribute):
            continue
        constant.update(node.output)
        for out in node.output:
            tensor = infos.get(out)
            dims = [d.dim_value if d.HasField("dim_value") else None
                    for d in tensor.shape.dim] if tensor is not None else [None]
            if None in dims:
                continue
            itemsize = _itemsize(tensor.elem_type)
            size = int(np.prod(dims, dtype=np.float64)) * itemsize
            if size > limit:
                who = f"node '{node.name}'" if node.name else f"node #{index}"
                raise ModelError(
                    f"{who[:1].upper()}{who[1:]} ({node.op_type}) of '{path.name}' computes "
                    f"tensor '{out}' of shape {dims} ({size / 1e9:.1f} GB) from constants "
                    "alone; qcompile folds constants at compile time and refuses one larger "
                    f"than the model's largest weight and {CONSTANT_LIMIT / 1e9:.1f} GB. "
                    + _ADVICE)


def _itemsize(elem_type: int) -> int:
    import onnx

    try:
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type)).itemsize
    except (KeyError, TypeError, ValueError):
        return 4


def _skeleton(model, shapes):
    """(a copy of `model` with static input shapes, whose initializers of more than 64 values
    are inputs of the same type and shape, without their values; the largest weight's bytes)"""
    import onnx
    from onnx import helper

    graph = model.graph
    skeleton = onnx.ModelProto()
    skeleton.ir_version = model.ir_version
    skeleton.opset_import.extend(model.opset_import)
    skeleton.functions.extend(model.functions)
    g = skeleton.graph
    g.name = graph.name
    g.node.extend(graph.node)
    g.output.extend(graph.output)
    initializers = {i.name for i in graph.initializer}
    for inp in graph.input:
        if inp.name in initializers:
            continue
        fixed = g.input.add()
        fixed.CopyFrom(inp)
        if inp.name in shapes:
            dims = fixed.type.tensor_type.shape.dim
            for dim, size in zip(dims, shapes[inp.name]):
                dim.Clear()
                dim.dim_value = int(size)
    largest = 0
    for init in graph.initializer:
        count = int(np.prod(init.dims, dtype=np.float64))
        largest = max(largest, count * _itemsize(init.data_type))
        if count <= 64:
            g.initializer.append(init)
        else:
            g.input.append(helper.make_tensor_value_info(init.name, init.data_type,
                                                         list(init.dims)))
    return skeleton, largest


def check_relax_constants(mod, path: Path) -> None:
    """The same bound on the imported Relax module, before TVM's FoldConstant: a call of main
    whose arguments are all constants and whose static output is over the bound."""
    import tvm
    from tvm import relax

    constant: set = set()
    largest = 0

    def is_constant(arg) -> bool:
        nonlocal largest
        if isinstance(arg, tvm.ir.expr.GenericConst):
            value = arg.value
            largest = max(largest, int(np.prod(value.shape, dtype=np.float64)) *
                          np.dtype(str(value.dtype)).itemsize)
            return True
        if isinstance(arg, relax.Tuple):
            return all(is_constant(a) for a in arg.fields)
        if isinstance(arg, relax.Var):
            return arg in constant
        return not isinstance(arg, relax.Call)  # shapes, prim values, functions

    body = mod["main"].body
    for block in getattr(body, "blocks", ()):
        for binding in block.bindings:
            value = binding.value
            if not isinstance(value, relax.Call) or not all(is_constant(a) for a in value.args):
                continue
            constant.add(binding.var)
            ty = binding.var.ty
            try:
                dims = [int(d) for d in ty.shape]
                size = int(np.prod(dims, dtype=np.float64)) * np.dtype(str(ty.dtype)).itemsize
            except (TypeError, ValueError, AttributeError):
                continue  # not a tensor of static shape
            if size > max(CONSTANT_LIMIT, largest):
                op = getattr(value.op, "name", None) or getattr(value.op, "name_hint", "?")
                raise ModelError(f"'{path.name}' computes a tensor of shape {dims} "
                                 f"{ty.dtype} ({size / 1e9:.1f} GB) from constants alone "
                                 f"({op}); qcompile folds constants at compile time and refuses "
                                 "one larger than the model's largest weight and "
                                 f"{CONSTANT_LIMIT / 1e9:.1f} GB. " + _ADVICE)
