"""Import of models that arrive with 4-bit weights: onnxruntime's com.microsoft.MatMulNBits
(its matmul_nbits_quantizer, model builders) and opset-21 DequantizeLinear with `block_size`
on an INT4/UINT4 constant (the same quantizer's QDQ form).

TVM's importer reads neither (it has no MatMulNBits converter, refuses blocked
DequantizeLinear and cannot copy a 4-bit initializer). Before import, each becomes a plain
MatMul on the float weight that its codes encode, computed as onnxruntime computes it,
(code - zero point) * scale in float32, and the codes are remembered (`GroupCodes`, in
qdq.WeightCodes under the float values) so that realize stores the layer in 4 bits again,
with the model's own codes, scales and zero points.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import ModelError

NBITS_OP = "MatMulNBits"
MS_DOMAIN = "com.microsoft"


@dataclass(frozen=True)
class GroupCodes:
    """A [K, N] weight as 4-bit codes in groups of `group` along K:
    w[k, n] = (codes[k, n] - zero[k // group, n]) * scales[k // group, n]."""

    codes: np.ndarray               # uint8 [K_padded, N], in [0, 16)
    scales: np.ndarray              # [groups, N], float32 or float16 as the model has them
    zero_points: np.ndarray | None  # [groups, N] (uint8 or float); None: 8 (symmetric)
    group: int
    rows: int                       # K

    def values(self) -> np.ndarray:
        """The float weight [K, N] the codes stand for, in onnxruntime's arithmetic."""
        zeros = np.float32(8) if self.zero_points is None else \
            np.repeat(self.zero_points.astype(np.float32), self.group, axis=0)
        scales = np.repeat(self.scales.astype(np.float32), self.group, axis=0)
        return ((self.codes.astype(np.float32) - zeros) * scales)[:self.rows]


def has_nbits(model) -> bool:
    return any(node.op_type == NBITS_OP and node.domain == MS_DOMAIN for node in model.graph.node)


def _nibbles(packed: np.ndarray) -> np.ndarray:
    """uint8 [..., B] -> [..., 2B]: the low nibble first."""
    packed = packed.astype(np.uint8)
    return np.stack([packed & 15, packed >> 4], axis=-1).reshape(*packed.shape[:-1], -1)


def _refuse(node, why: str) -> ModelError:
    return ModelError(
        f"MatMulNBits node '{node.name}' {why}. qcompile imports MatMulNBits with bits=4, "
        "block_size a power of two of at least 16, no g_idx reordering, and scales and zero "
        "points as onnxruntime's matmul_nbits_quantizer writes them. Re-quantize the float "
        "model with that quantizer (bits=4), or compile the float model with --quantize int8 "
        "--weight-bits 4.")


def nbits_codes(node, consts: dict) -> GroupCodes:
    """The group codes of a MatMulNBits node whose weight inputs are constants."""
    attrs = {a.name: a.i for a in node.attribute if a.type == a.INT}
    k, n, bits, block = attrs.get("K"), attrs.get("N"), attrs.get("bits", 4), \
        attrs.get("block_size")
    if bits != 4:
        raise _refuse(node, f"has bits={bits}")
    if k is None or n is None or block is None or block < 16 or block & (block - 1):
        raise _refuse(node, f"has K={k}, N={n}, block_size={block}")
    inputs = list(node.input) + [""] * 6
    missing = [name for name in inputs[1:3] if name not in consts]
    if missing:
        raise _refuse(node, f"takes its weight input '{missing[0]}' at run time")
    blocks = -(-k // block)
    if len(inputs) > 4 and inputs[4]:
        g_idx = consts.get(inputs[4])
        if g_idx is None or not np.array_equal(np.asarray(g_idx).ravel()[:k],
                                               np.arange(k) // block):
            raise _refuse(node, "reorders its reduction with g_idx (act-order GPTQ)")
    packed = np.asarray(consts[inputs[1]], np.uint8)
    if packed.size != n * blocks * block // 2:
        raise _refuse(node, f"has a weight of shape {list(packed.shape)}, not "
                      f"[{n}, {blocks}, {block // 2}]")
    codes = _nibbles(packed.reshape(n, blocks * block // 2)).T  # [K_padded, N]
    scales = np.asarray(consts[inputs[2]])
    if scales.size != n * blocks:
        raise _refuse(node, f"has {scales.size} scales, not N * blocks = {n * blocks}")
    scales = np.ascontiguousarray(scales.reshape(n, blocks).T)
    zero_points = None
    if inputs[3]:
        if inputs[3] not in consts:
            raise _refuse(node, f"takes its zero points '{inputs[3]}' at run time")
        zp = np.asarray(consts[inputs[3]])
        if zp.dtype == np.uint8:
            zp = _nibbles(zp.reshape(n, -1))[:, :blocks]
        if zp.size != n * blocks:
            raise _refuse(node, f"has {zp.size} zero points, not N * blocks = {n * blocks}")
        zero_points = np.ascontiguousarray(zp.reshape(n, blocks).T)
    return GroupCodes(np.ascontiguousarray(codes), scales, zero_points, block, k)


def blocked_codes(q: np.ndarray, scale: np.ndarray, zp: np.ndarray | None, block: int,
                  axis: int, signed: bool) -> GroupCodes | None:
    """The group codes of DequantizeLinear(q [K, N] INT4/UINT4, scale [K/block, N], axis 0,
    block_size); None for any other blocked form (its float values are still exact)."""
    if q.ndim != 2 or axis != 0 or scale.shape != (-(-q.shape[0] // block), q.shape[1]):
        return None
    k, n = q.shape
    offset = 8 if signed else 0
    codes = q.astype(np.int16) + offset
    zeros = np.zeros(scale.shape, np.int16) if zp is None else zp.astype(np.int16)
    zeros = zeros + offset
    padded = scale.shape[0] * block
    if padded > k:
        pad = np.repeat(zeros, block, axis=0)[k:]
        codes = np.concatenate([codes, pad])
    zero_points = None if signed and zp is None else zeros.astype(np.uint8)
    return GroupCodes(codes.astype(np.uint8), np.ascontiguousarray(scale), zero_points, block, k)


def blocked_values(q: np.ndarray, scale: np.ndarray, zp: np.ndarray | None, block: int,
                   axis: int) -> np.ndarray:
    """DequantizeLinear with block_size: (q - zp) * scale, each scale for `block` elements
    along `axis`, in float32."""
    axis = axis % q.ndim
    size = q.shape[axis]

    def widen(values):
        return np.take(np.repeat(values, block, axis=axis), np.arange(size), axis=axis)

    centred = q.astype(np.float32) - (0 if zp is None else widen(zp.astype(np.float32)))
    return (centred * widen(scale.astype(np.float32))).astype(np.float32)


def replace_nodes(graph, nodes: list, initializers: list) -> None:
    """Make `nodes` the graph's nodes, add `initializers`, and drop the initializers that no
    node and no output reads any more (this rewrite's and qdq.py's)."""
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(initializers)
    used = {name for node in graph.node for name in node.input}
    outputs = {o.name for o in graph.output}
    unused = [t for t in graph.initializer if t.name not in used and t.name not in outputs]
    for tensor in unused:
        graph.initializer.remove(tensor)


def fold_nbits(model, codes) -> tuple[object, int]:
    """Replace each MatMulNBits by MatMul(A, the float weight) (+ its bias), remembering the
    group codes in `codes` (qdq.WeightCodes); returns the model and the count."""
    from onnx import helper, numpy_helper

    graph = model.graph
    consts = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    nodes, new_init, count = [], [], 0
    for node in graph.node:
        if node.op_type != NBITS_OP or node.domain != MS_DOMAIN:
            nodes.append(node)
            continue
        group = nbits_codes(node, consts)
        values = group.values()
        weight = f"{node.output[0]}__weight"
        new_init.append(numpy_helper.from_array(values, weight))
        codes.add_groups(values, group)
        inputs = list(node.input) + [""] * 6
        out = node.output[0]
        if inputs[5]:
            nodes.append(helper.make_node("MatMul", [inputs[0], weight], [out + "__mm"],
                                          name=node.name))
            nodes.append(helper.make_node("Add", [out + "__mm", inputs[5]], [out],
                                          name=f"{node.name}_bias"))
        else:
            nodes.append(helper.make_node("MatMul", [inputs[0], weight], [out], name=node.name))
        count += 1
    if count:
        replace_nodes(graph, nodes, new_init)
        if not any(node.domain == MS_DOMAIN for node in graph.node):
            kept = [o for o in model.opset_import if o.domain != MS_DOMAIN]
            del model.opset_import[:]
            model.opset_import.extend(kept)
    return model, count


__all__ = ["GroupCodes", "blocked_codes", "blocked_values", "fold_nbits", "has_nbits",
           "nbits_codes", "replace_nodes"]
