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
    it. Shapes come from ONNX shape inference on a copy without the large weights' values;
    small constants that inference cannot see through (a shape computed by Abs, say) are
    computed (onnx's reference evaluator) and inference runs again, a few rounds at most."""
    skeleton, largest = _skeleton(model, shapes)
    limit = max(CONSTANT_LIMIT, largest)
    for _ in range(8):
        infos = _infer(skeleton)
        if infos is None:
            return
        _check(model, infos, limit, path)
        if not _compute_small_constants(skeleton, infos):
            return


def _infer(skeleton) -> dict | None:
    """{tensor name: inferred TypeProto.Tensor}, or None when inference fails."""
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(skeleton, data_prop=True)
    except Exception as exc:  # noqa: BLE001 - inference is a help here, never a requirement
        log.debug("shape inference failed (%s); constant sizes not checked", exc)
        return None
    infos = {v.name: v.type.tensor_type for v in inferred.graph.value_info}
    infos.update((v.name, v.type.tensor_type) for v in inferred.graph.output)
    return infos


def _dims(infos: dict, name: str) -> list | None:
    tensor = infos.get(name)
    if tensor is None or not tensor.HasField("shape"):
        return None
    dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim]
    return None if None in dims else dims


def _has_subgraph(node) -> bool:
    import onnx

    return any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
               for a in node.attribute)


def _check(model, infos: dict, limit: int, path: Path) -> None:
    constant = {i.name for i in model.graph.initializer} | {""}
    for index, node in enumerate(model.graph.node):
        if not all(name in constant for name in node.input) or _has_subgraph(node):
            continue
        constant.update(node.output)
        for out in node.output:
            dims = _dims(infos, out)
            if dims is None:
                continue
            size = int(np.prod(dims, dtype=np.float64)) * _itemsize(infos[out].elem_type)
            if size > limit:
                who = f"node '{node.name}'" if node.name else f"node #{index}"
                raise ModelError(
                    f"{who[:1].upper()}{who[1:]} ({node.op_type}) of '{path.name}' computes "
                    f"tensor '{out}' of shape {dims} ({size / 1e9:.1f} GB) from constants "
                    "alone; qcompile folds constants at compile time and refuses one larger "
                    f"than the model's largest weight and {CONSTANT_LIMIT / 1e9:.1f} GB. "
                    + _ADVICE)


def _compute_small_constants(skeleton, infos: dict) -> bool:
    """Replace each node of `skeleton` whose inputs are all known values and whose outputs
    have at most _SMALL elements by initializers holding its outputs; whether any was."""
    from onnx import numpy_helper
    from onnx.reference import ReferenceEvaluator

    graph = skeleton.graph
    known = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    opsets = {o.domain or "": o.version for o in skeleton.opset_import}
    kept, computed = [], []
    for node in graph.node:
        dims = [_dims(infos, out) for out in node.output]
        if _has_subgraph(node) or node.domain not in ("", "ai.onnx") or \
                not all(name in known or not name for name in node.input) or \
                any(d is None or np.prod(d) > _SMALL for d in dims):
            kept.append(node)
            continue
        try:
            values = ReferenceEvaluator(node, opsets=opsets).run(
                None, {name: known[name] for name in node.input if name})
        except Exception:  # noqa: BLE001 - left for shape inference to judge as it is
            kept.append(node)
            continue
        for name, value in zip(node.output, values):
            known[name] = np.asarray(value)
            computed.append(numpy_helper.from_array(np.asarray(value), name))
    if not computed:
        return False
    del graph.node[:]
    graph.node.extend(kept)
    graph.initializer.extend(computed)
    return True


_SMALL = 64  # elements: a shape, an axis list, a scalar


def _itemsize(elem_type: int) -> int:
    import onnx

    try:
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type)).itemsize
    except (KeyError, TypeError, ValueError):
        return 4


def _skeleton(model, shapes):
    """(a copy of `model` with static input shapes, whose initializers of more than _SMALL
    values are inputs of the same type and shape, without their values; the largest weight's
    bytes)"""
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
        if count <= _SMALL:
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
