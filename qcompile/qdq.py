"""Import of models that arrive quantized: ONNX QDQ (quantize_static, quantization-aware
training).

Before import (and before onnxsim, which would fold them away), every DequantizeLinear of a constant (weights, int32 biases) is replaced by the
exact float values it produces, and its integer codes are remembered (`WeightCodes`, keyed by
the float values, so that they are found again after import, constant folding and transposes).
The activations' QuantizeLinear -> DequantizeLinear pairs stay in the graph: TVM imports them
as R.quantize / R.dequantize, and the realize step reads their scales and zero points as the
activations' parameters, so the model's own quantization is kept, with no calibration.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

from .nbits import blocked_codes, blocked_values, replace_nodes

QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear"})


def _key(values: np.ndarray) -> str:
    values = np.ascontiguousarray(values, dtype=np.float32)
    return hashlib.sha1(values.tobytes() + str(values.shape).encode()).hexdigest()


@dataclass
class WeightCodes:
    """Integer codes of dequantized constants: float values -> (codes, scales, axis), and
    for 4-bit weights float values -> nbits.GroupCodes."""

    entries: dict = field(default_factory=dict)
    groups: dict = field(default_factory=dict)

    def add_groups(self, values: np.ndarray, codes) -> None:
        self.groups[_key(values)] = codes

    def find_groups(self, values: np.ndarray):
        """The nbits.GroupCodes of a [K, N] weight with these values, or None."""
        return self.groups.get(_key(values))

    def add(self, values: np.ndarray, codes: np.ndarray, scales: np.ndarray, axis) -> None:
        self.entries[_key(values)] = (codes, scales, axis)

    def find(self, values: np.ndarray):
        """(codes int8, per-channel scales, axis) for `values`, or for its transpose (Gemm's
        transB is folded into the constant), in `values`' layout; None if unknown."""
        found = self.entries.get(_key(values))
        if found is not None:
            return found
        if values.ndim == 2:
            found = self.entries.get(_key(values.T))
            if found is not None:
                codes, scales, axis = found
                return codes.T, scales, (None if axis is None else 1 - axis)
        return None

    def __len__(self) -> int:
        return len(self.entries)


def is_qdq(model) -> bool:
    return any(node.op_type in QDQ_OPS for node in model.graph.node)


def is_qoperator(model) -> bool:
    return any(node.op_type in QOPERATOR_RULES or node.op_type == "QLinearConcat"
               for node in model.graph.node)


def fold_constant_dequantize(model) -> tuple[object, WeightCodes]:
    """Replace DequantizeLinear(constant) by its float result; return the model and codes."""
    from onnx import numpy_helper

    graph = model.graph
    init = {i.name: i for i in graph.initializer}
    consts = {name: numpy_helper.to_array(t) for name, t in init.items()}
    for node in graph.node:  # Constant nodes hold some scales and zero points
        if node.op_type == "Constant" and node.attribute:
            consts[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    codes = WeightCodes()
    keep = []
    new_init = []
    for node in graph.node:
        if node.op_type != "DequantizeLinear" or node.input[0] not in consts or \
                node.input[1] not in consts:
            keep.append(node)
            continue
        q = consts[node.input[0]]
        scale = consts[node.input[1]].astype(np.float32)
        zp = consts[node.input[2]] if len(node.input) > 2 and node.input[2] else \
            np.zeros_like(scale, dtype=q.dtype)
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        block = next((a.i for a in node.attribute if a.name == "block_size"), 0)
        if block:  # opset 21's blocked form: 4-bit weights in groups
            given_zp = consts[node.input[2]] if len(node.input) > 2 and node.input[2] else None
            values = blocked_values(q, scale, given_zp, block, axis)
            if q.dtype.name in ("int4", "uint4"):
                group = blocked_codes(q, consts[node.input[1]], given_zp, block, axis,
                                      signed=q.dtype.name == "int4")
                if group is not None:
                    codes.add_groups(values, group)
            new_init.append(numpy_helper.from_array(values, node.output[0]))
            continue
        if scale.size > 1:
            shape = [1] * q.ndim
            shape[axis] = -1
            scale_b, zp_b = scale.reshape(shape), zp.reshape(shape).astype(np.int64)
        else:
            scale_b, zp_b = scale.reshape(()), np.int64(zp.reshape(()))
            axis = None
        values = ((q.astype(np.int64) - zp_b).astype(np.float32) * scale_b).astype(np.float32)
        if q.dtype == np.int8 and not np.any(zp):
            codes.add(values, q, scale.reshape(-1), axis)
        new_init.append(numpy_helper.from_array(values, node.output[0]))
    if new_init:
        replace_nodes(graph, keep, new_init)
    return model, codes



# -- QOperator models: QLinearConv & co. become DequantizeLinear -> float op -> QuantizeLinear,
# after which they take the QDQ path. Each rule: (float op, positions of the (tensor, scale,
# zero point) inputs, position of the output (scale, zero point) or None, int32 bias position).
# Inputs not listed (none so far) would be dropped; attributes are copied unless listed.
QOPERATOR_RULES = {
    "QLinearConv": ("Conv", ((0, 1, 2), (3, 4, 5)), (6, 7), 8),
    "QLinearMatMul": ("MatMul", ((0, 1, 2), (3, 4, 5)), (6, 7), None),
    "QGemm": ("Gemm", ((0, 1, 2), (3, 4, 5)), (7, 8), 6),
    "QLinearAdd": ("Add", ((0, 1, 2), (3, 4, 5)), (6, 7), None),
    "QLinearMul": ("Mul", ((0, 1, 2), (3, 4, 5)), (6, 7), None),
    "QLinearAveragePool": ("AveragePool", ((0, 1, 2),), (3, 4), None),
    "QLinearGlobalAveragePool": ("GlobalAveragePool", ((0, 1, 2),), (3, 4), None),
    "QLinearSoftmax": ("Softmax", ((0, 1, 2),), (3, 4), None),
    "QLinearSigmoid": ("Sigmoid", ((0, 1, 2),), (3, 4), None),
    "QLinearLeakyRelu": ("LeakyRelu", ((0, 1, 2),), (3, 4), None),
}
_DROPPED_ATTRS = {"channels_last", "opset"}


def _weight_axis(op: str, position: int, node) -> int:
    """The per-channel axis of a quantized weight input."""
    if op == "Conv":
        return 0
    if op == "Gemm":
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return 0 if trans_b else 1
    return 1  # MatMul: per output column


def qoperator_to_qdq(model):
    """Rewrite QOperator nodes (standard and com.microsoft) into DQ -> op -> Q; returns the
    model and the number of nodes rewritten."""
    from onnx import helper, numpy_helper

    graph = model.graph
    consts = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    nodes, rewritten, extra = [], 0, []
    for node in graph.node:
        if node.op_type == "QLinearConcat":
            node = _concat_as_rule(node)
        rule = QOPERATOR_RULES.get(node.op_type)
        if rule is None:
            nodes.append(node)
            continue
        op, triples, out_params, bias_at = rule
        inputs = list(node.input) + [""] * 10
        floats = []
        for k, (t, s, z) in enumerate(triples):
            name = f"{node.output[0]}__dq{k}"
            attrs = {}
            scale = consts.get(inputs[s])
            if scale is not None and scale.size > 1:
                attrs["axis"] = _weight_axis(op, k, node)
            dq_inputs = [inputs[t], inputs[s]] + ([inputs[z]] if inputs[z] else [])
            nodes.append(helper.make_node("DequantizeLinear", dq_inputs, [name], **attrs))
            floats.append(name)
        if bias_at is not None and inputs[bias_at]:
            # int32 bias in units of x_scale * w_scale
            x_scale, w_scale = consts[inputs[triples[0][1]]], consts[inputs[triples[1][1]]]
            scale_name = f"{node.output[0]}__bias_scale"
            extra.append(numpy_helper.from_array(
                (x_scale.astype(np.float32) * w_scale.astype(np.float32)).reshape(-1)
                if w_scale.size > 1 else np.float32(x_scale * w_scale), scale_name))
            bias_name = f"{node.output[0]}__bias"
            attrs = {"axis": 0} if w_scale.size > 1 else {}
            nodes.append(helper.make_node("DequantizeLinear", [inputs[bias_at], scale_name],
                                          [bias_name], **attrs))
            floats.append(bias_name)
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute
                 if a.name not in _DROPPED_ATTRS}
        if out_params is None or not inputs[out_params[0]]:
            nodes.append(helper.make_node(op, floats, [node.output[0]], **attrs))
        else:
            y = f"{node.output[0]}__f"
            nodes.append(helper.make_node(op, floats, [y], **attrs))
            q_inputs = [y, inputs[out_params[0]]] + (
                [inputs[out_params[1]]] if inputs[out_params[1]] else [])
            nodes.append(helper.make_node("QuantizeLinear", q_inputs, [node.output[0]]))
        rewritten += 1
    if rewritten:
        del graph.node[:]
        graph.node.extend(nodes)
        graph.initializer.extend(extra)
        kept = [o for o in model.opset_import if o.domain not in ("com.microsoft",)]
        del model.opset_import[:]
        model.opset_import.extend(kept)
    return model, rewritten


# -- integer ops with zero points (onnxruntime's quantize_dynamic): TVM imports MatMulInteger
# (zero points included) and DynamicQuantizeLinear, but has no ConvInteger converter. It becomes
# Conv(x - x_zp, w - w_zp) in float, exact while the sums stay below 2^24, cast back to int32.
INTEGER_OPS = {"ConvInteger": "Conv"}


def integer_ops_to_float(model):
    """Rewrite ConvInteger as a float Conv on zero-point-centered inputs; returns the model
    and the number of nodes rewritten."""
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    nodes, rewritten, extra = [], 0, []
    for node in graph.node:
        op = INTEGER_OPS.get(node.op_type)
        if op is None:
            nodes.append(node)
            continue
        inputs = list(node.input) + ["", ""]
        centered = []
        for k in (0, 1):
            name = f"{node.output[0]}__in{k}"
            nodes.append(helper.make_node("Cast", [inputs[k]], [name + "_f"],
                                          to=TensorProto.FLOAT))
            zp = inputs[k + 2]
            if not zp:
                centered.append(name + "_f")
                continue
            zp_f = name + "_zp"
            nodes.append(helper.make_node("Cast", [zp], [zp_f], to=TensorProto.FLOAT))
            if k == 1:  # the weight's, per output channel: [O] -> [O, 1, 1, 1]
                shape = f"{node.output[0]}__zp_shape"
                extra.append(numpy_helper.from_array(np.array([-1, 1, 1, 1], np.int64), shape))
                nodes.append(helper.make_node("Reshape", [zp_f, shape], [zp_f + "_r"]))
                zp_f += "_r"
            nodes.append(helper.make_node("Sub", [name + "_f", zp_f], [name]))
            centered.append(name)
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        y = f"{node.output[0]}__f"
        nodes.append(helper.make_node(op, centered, [y], **attrs))
        nodes.append(helper.make_node("Cast", [y], [node.output[0]], to=TensorProto.INT32))
        rewritten += 1
    if rewritten:
        del graph.node[:]
        graph.node.extend(nodes)
        graph.initializer.extend(extra)
    return model, rewritten


def _concat_as_rule(node):
    """QLinearConcat(y_s, y_zp, x0, s0, z0, x1, s1, z1, ...) in the QLinearAdd-like shape."""
    from onnx import helper

    inputs = list(node.input)
    count = (len(inputs) - 2) // 3
    triples = tuple((2 + 3 * i, 3 + 3 * i, 4 + 3 * i) for i in range(count))
    QOPERATOR_RULES.setdefault(f"QLinearConcat{count}", ("Concat", triples, (0, 1), None))
    clone = helper.make_node(f"QLinearConcat{count}", inputs, list(node.output),
                             **{a.name: helper.get_attribute_value(a) for a in node.attribute})
    return clone
