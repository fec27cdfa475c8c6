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

QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear"})


def _key(values: np.ndarray) -> str:
    values = np.ascontiguousarray(values, dtype=np.float32)
    return hashlib.sha1(values.tobytes() + str(values.shape).encode()).hexdigest()


@dataclass
class WeightCodes:
    """Integer codes of dequantized constants: float values -> (codes, scales, axis)."""

    entries: dict = field(default_factory=dict)

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
        del graph.node[:]
        graph.node.extend(keep)
        graph.initializer.extend(new_init)
        used = {name for node in graph.node for name in node.input}
        outputs = {o.name for o in graph.output}
        unused = [t for t in graph.initializer if t.name not in used and t.name not in outputs]
        for tensor in unused:
            graph.initializer.remove(tensor)
    return model, codes
