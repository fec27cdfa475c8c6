"""Checks of an ONNX graph as it is loaded, before onnxsim, onnxruntime or TVM see it: each
problem is one ModelError naming the tensor and the node, instead of a failure deep inside them.

- structure: every tensor is written once (ONNX graphs are SSA), by a node, an input or an
  initializer, and read after it is written (a graph that is only out of order is sorted; a
  cycle is refused);
- inputs: numeric tensors;
- weights: no NaN anywhere, no infinity in a layer's weight or bias (an infinity elsewhere, such
  as an attention mask's -inf, is a real value);
- node names: made unique, since layers are named after them in precision rules, --float-layer
  and reports;
- opset: newer than TVM's importer knows is a warning.

import_failure explains a model TVM's importer failed on. The sizes of computed constants are
bounded in constant_sizes.py.
"""

from __future__ import annotations

import heapq
import logging
from pathlib import Path

import numpy as np

from .errors import ModelError

log = logging.getLogger(__name__)

_REEXPORT = "Re-export the model from its framework (e.g. torch.onnx.export)."
# a layer's inputs that are its weight and bias (Conv, ConvTranspose, Gemm: 1 and 2; MatMul: 1)
_WEIGHT_INPUTS = {"Conv": (1, 2), "ConvTranspose": (1, 2), "Gemm": (1, 2), "MatMul": (1,)}


def check_model(model, path: Path) -> None:
    """All the checks that need no input shapes; fixes the node order and names in place."""
    _check_opset(model, path)
    _check_inputs(model, path)
    _sort_nodes(model, path)
    _unique_names(model, path)
    _check_finite(model, path)


def _node(node, index: int) -> str:
    who = f"'{node.name}'" if node.name else f"#{index}"
    return f"node {who} ({node.op_type})"


def _upper(text: str) -> str:
    return text[:1].upper() + text[1:]


def _check_opset(model, path: Path) -> None:
    import onnx

    from tvm.relax.frontend.onnx.onnx_frontend import _get_convert_map

    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")),
                default=0)
    known = max(int(name[len("_impl_v"):]) for converter in _get_convert_map().values()
                for name in dir(converter) if name.startswith("_impl_v"))
    if opset > known:
        exists = onnx.defs.onnx_opset_version()
        why = (f"which does not exist (ONNX's newest is {exists})" if opset > exists else
               f"newer than TVM's ONNX importer knows ({known})")
        log.warning("'%s' declares ONNX opset %d, %s: each op is imported by the rule of "
                    "opset %d, which may not be what the model means. If its outputs are "
                    "wrong, export it with opset %d or older.", path.name, opset, why,
                    known, known)


def _check_inputs(model, path: Path) -> None:
    import onnx

    kinds = onnx.TensorProto
    initializers = {i.name for i in model.graph.initializer}
    for inp in model.graph.input:
        if inp.name in initializers:
            continue
        if not inp.type.HasField("tensor_type"):
            raise ModelError(f"Input '{inp.name}' of '{path.name}' is not a tensor (a "
                             f"{inp.type.WhichOneof('value') or 'value of no type'}); qcompile "
                             "compiles models whose inputs are tensors. " + _REEXPORT)
        elem = inp.type.tensor_type.elem_type
        if elem == kinds.STRING:
            raise ModelError(f"Input '{inp.name}' of '{path.name}' is a string tensor; qcompile "
                             "compiles models whose inputs are numbers. Do the text processing "
                             "(e.g. tokenizing) before the model, and export the model from "
                             "its numeric inputs (e.g. token ids).")
        if elem in (kinds.UNDEFINED, kinds.COMPLEX64, kinds.COMPLEX128) or \
                elem not in kinds.DataType.values():
            name = kinds.DataType.Name(elem) if elem in kinds.DataType.values() else str(elem)
            raise ModelError(f"Input '{inp.name}' of '{path.name}' has element type {name}, "
                             "which qcompile cannot compile; inputs must be integer, float or "
                             "bool tensors. " + _REEXPORT)


def _sort_nodes(model, path: Path) -> None:
    """Check that every tensor is written once and provided; sort the nodes when they are only
    out of order; refuse a cycle."""
    graph = model.graph
    provided = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    writer: dict[str, int] = {}
    for index, node in enumerate(graph.node):
        for out in node.output:
            if not out:
                continue
            if out in provided:
                what = "an initializer" if out in {i.name for i in graph.initializer} \
                    else "an input"
                raise ModelError(f"Tensor '{out}' of '{path.name}' is {what} of the graph and "
                                 f"also written by {_node(node, index)}: ONNX graphs write each "
                                 "tensor once. " + _REEXPORT)
            if out in writer:
                first = writer[out]
                raise ModelError(f"Tensor '{out}' of '{path.name}' is written by two nodes, "
                                 f"{_node(graph.node[first], first)} and {_node(node, index)}: "
                                 "ONNX graphs write each tensor once, so it is not defined "
                                 "which one the model means. " + _REEXPORT)
            writer[out] = index
    for index, node in enumerate(graph.node):
        for name in node.input:
            if name not in provided and name not in writer:
                raise ModelError(f"{_upper(_node(node, index))} of '{path.name}' reads "
                                 f"tensor '{name}', which no node, input or initializer of the "
                                 "graph provides: the model file is incomplete. " + _REEXPORT)
    for out in graph.output:
        if out.name not in provided and out.name not in writer:
            raise ModelError(f"Output '{out.name}' of '{path.name}' is computed by no node: the "
                             "model file is incomplete. " + _REEXPORT)
    defined = set(provided)
    for node in graph.node:
        if any(name not in defined for name in node.input):
            break
        defined.update(node.output)
    else:
        return  # in order
    waiting = {i: [n for n in node.input if n not in provided]
               for i, node in enumerate(graph.node)}
    readers: dict[str, list[int]] = {}
    for i, names in waiting.items():
        for name in names:
            readers.setdefault(name, []).append(i)
    ready = [i for i, names in waiting.items() if not names]
    heapq.heapify(ready)
    order = []
    while ready:  # the original order wherever it is right
        i = heapq.heappop(ready)
        order.append(i)
        for out in graph.node[i].output:
            for reader in readers.pop(out, []):
                waiting[reader].remove(out)
                if not waiting[reader]:
                    heapq.heappush(ready, reader)
    if len(order) < len(graph.node):
        raise ModelError(f"The graph of '{path.name}' has a cycle: "
                         f"{_cycle(graph, waiting, writer)}. ONNX graphs cannot loop back. "
                         + _REEXPORT)
    log.info("sorted the nodes of '%s' (they were not in the order they compute)", path.name)
    nodes = []
    for i in order:
        node = type(graph.node[i])()
        node.CopyFrom(graph.node[i])
        nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)


def _cycle(graph, waiting: dict[int, list[str]], writer: dict[str, int]) -> str:
    """'node a reads t from node b, which reads u from node a': a cycle among the nodes that
    could not be sorted (each waits for a tensor that another of them writes)."""
    stuck = min(i for i, names in waiting.items() if names)
    path: list[tuple[int, str]] = []
    seen: dict[int, int] = {}
    while stuck not in seen:
        seen[stuck] = len(path)
        tensor = waiting[stuck][0]
        path.append((stuck, tensor))
        stuck = writer[tensor]
    loop = path[seen[stuck]:]
    steps = [f"{_node(graph.node[i], i)} reads '{t}' from {_node(graph.node[writer[t]], writer[t])}"
             for i, t in loop[:4]]
    return "; ".join(steps) + ("; ..." if len(loop) > 4 else "")


def _unique_names(model, path: Path) -> None:
    """Rename the later nodes of a name used twice: name_1, name_2, ..."""
    taken = {n.name for n in model.graph.node if n.name}
    seen: set[str] = set()
    renamed = []
    for node in model.graph.node:
        if not node.name:
            continue
        if node.name in seen:
            k = 1
            while f"{node.name}_{k}" in taken:
                k += 1
            new = f"{node.name}_{k}"
            renamed.append((node.name, new))
            taken.add(new)
            node.name = new
        seen.add(node.name)
    if renamed:
        shown = ", ".join(f"'{old}' -> '{new}'" for old, new in renamed[:5])
        more = f" and {len(renamed) - 5} more" if len(renamed) > 5 else ""
        log.warning("'%s' has %d node(s) whose name another node already has; renamed %s%s, "
                    "so that precision rules, --float-layer and reports tell them apart (use "
                    "these names there).", path.name, len(renamed), shown, more)


def _check_finite(model, path: Path) -> None:
    from onnx import numpy_helper

    consumers: dict[str, list[tuple[int, int]]] = {}
    for index, node in enumerate(model.graph.node):
        for position, name in enumerate(node.input):
            consumers.setdefault(name, []).append((index, position))
    for init in model.graph.initializer:
        if init.data_type not in _FLOAT_TYPES:
            continue
        users = consumers.get(init.name, [])
        weight_of = [(i, p) for i, p in users
                     if p in _WEIGHT_INPUTS.get(model.graph.node[i].op_type, ())]
        flat = numpy_helper.to_array(init).reshape(-1)
        nan = inf = 0
        for start in range(0, flat.size, 1 << 24):  # a bounded temporary per step
            chunk = flat[start:start + (1 << 24)]
            nan += int(np.count_nonzero(np.isnan(chunk)))
            inf += int(np.count_nonzero(np.isinf(chunk))) if weight_of else 0
        if nan or inf:
            i = (weight_of or users or [(None, None)])[0][0]
            user = f" of {_node(model.graph.node[i], i)}" if i is not None else ""
            what = " and ".join(p for p in (f"{nan} NaN" if nan else "",
                                            f"{inf} infinite" if inf else "") if p)
            raise ModelError(f"Weight '{init.name}'{user} in '{path.name}' holds {what} "
                             f"value(s) out of {flat.size}: the model cannot compute real "
                             "outputs. The training diverged or the export broke the weights; "
                             "export it again from a good checkpoint.")


_FLOAT_TYPES = {1, 10, 11}  # FLOAT, FLOAT16, DOUBLE


def import_failure(model, path: Path, why: str, printed: str, inputs, dynamic: bool) -> str:
    """The paragraph for a model TVM's importer failed on: a broken model when onnxruntime
    cannot run it either, else a form of an op TVM does not support. inputs: TensorSpecs."""
    op = ""
    for line in printed.splitlines():
        if line.startswith("Error converting operator "):
            op = f" (on {line[len('Error converting operator '):].split(',')[0]})"
    problem = _onnxruntime_problem(model, inputs)
    if problem:
        return (f"'{path.name}' is broken: TVM's ONNX importer failed{op}: {why}; and "
                f"onnxruntime cannot run it either: {problem}. Fix the model (e.g. a weight "
                "made for another number of channels) and export it again.")
    return (f"TVM's ONNX importer failed on '{path.name}'{op}: {why}. This usually means an op "
            "uses a form TVM does not support (for example a shape computed at run time); "
            + ("check the sizes given with --input-shape, or " if dynamic else "")
            + "simplify the model (e.g. with onnxsim) or export it with another opset.")


def _onnxruntime_problem(model, inputs) -> str | None:
    """onnxruntime's error running `model` on zeros (its last line), or None if it runs (or
    cannot be asked: a model over 2 GB)."""
    from .errors import last_line

    try:
        import onnxruntime

        serialized = model.SerializeToString()
    except Exception:  # noqa: BLE001 - no second opinion to ask
        return None
    try:
        options = onnxruntime.SessionOptions()
        options.log_severity_level = 4  # its own log would repeat the error on stderr
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
        session = onnxruntime.InferenceSession(serialized, options,
                                               providers=["CPUExecutionProvider"])
        session.run(None, {s.name: np.zeros(s.shape, s.dtype) for s in inputs})
    except Exception as exc:  # noqa: BLE001 - onnxruntime's errors have no common type
        return last_line(str(exc), type(exc).__name__)
    return None
