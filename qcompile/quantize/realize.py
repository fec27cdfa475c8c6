"""Realize: rewrite the float model into integer kernels, with as few boundaries as possible.

Walks the model's dataflow in order. Each value is either float or an integer tensor with its
quantization parameters (values.QValue). A handler per node kind (ops/) emits it:

- conv2d / matmul (one "layer"): by the scheme the plan gives the layer (schemes/): static
  int8 kernels with the requantization fused, int8 with 16-bit inputs, fp16, weight-only or
  dynamic int8, or fp32;
- add, mean (global average pool), average/max pooling, concat, clip: integer in, integer out,
  rescaled to the output's parameters inside the kernel, where the result goes on into integer
  ops (flow.integer_tensors);
- reshape-like ops: on the integer tensor, parameters unchanged;
- a Gather of a constant table (an embedding): the table in int8, one scale per row;
- anything else: float, fed by a dequantize.

Quantize/dequantize boundaries appear only where float and integer values meet. `verify`
then checks the result: every layer planned as int8 became an int8 x int8 -> int32 kernel.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..relax_main import function_attrs, without_main
from .flow import LAYER_KINDS, integer_tensors
from .graph import Graph, Node, constant_value, relax_flow
from .observers import QParams
from .ops import HANDLERS, handle_float
from .ops.linear import layer_op
from .schemes import Int8, Scheme
from .values import LayerResult, QValue, RealizeConfig, TableResult


class Realizer:
    def __init__(self, mod, graph: Graph, qparams: dict[Any, QParams], config: RealizeConfig):
        from tvm import relax

        self.relax = relax
        self.graph = graph
        self.qparams = qparams  # var -> QParams of every observed float tensor
        self.config = config
        self.bb = relax.BlockBuilder(without_main(mod))
        self.env: dict[Any, Any] = {}        # var -> float expr or QValue
        self.float_cache: dict[Any, Any] = {}
        self.quant_cache: dict[Any, Any] = {}  # QValues, and schemes' run-time inputs
        self.absorbed: set[int] = set()      # node indices folded into a layer's kernel
        self.layers: list[LayerResult] = []
        self.tables: list[TableResult] = []  # lookup tables stored in int8 (ops/tables.py)
        int8 = [n.name for n in graph.nodes if n.kind in LAYER_KINDS and
                self.scheme_of(n).takes_integers and constant_value(n.args[1]) is not None]
        self.integer = integer_tensors(relax_flow(graph), int8)  # flow.py decides

    # -- value conversions -------------------------------------------------------------
    def _emit(self, expr):
        return self.bb.emit(expr)

    def _const(self, value, dtype: str):
        return self.relax.const(np.asarray(value, dtype=dtype), dtype)

    def lookup(self, expr):
        return self.env.get(expr, expr)

    def float_of(self, expr):
        value = self.lookup(expr)
        if not isinstance(value, QValue):
            return value
        key = id(value)
        if key not in self.float_cache:
            self.float_cache[key] = self.dequantize(value)
        return self.float_cache[key]

    def quant_of(self, expr, qp: QParams | None = None) -> QValue:
        """`expr` as an integer tensor (with parameters `qp`, or its calibrated ones)."""
        value = self.lookup(expr)
        if isinstance(value, QValue):
            if qp is None or qp == value.qp:
                return value
            return self.requantize_q(value, qp)
        qp = qp or self.qparams[expr]
        key = (expr, qp)
        if key not in self.quant_cache:
            self.quant_cache[key] = QValue(self.quantize(value, qp), qp)
        return self.quant_cache[key]

    def has_qparams(self, expr) -> bool:
        value = self.lookup(expr)
        return isinstance(value, QValue) or expr in self.qparams

    # -- integer arithmetic building blocks (each mirrored by tests' numpy reference) -----
    def clamp(self, x, lo, hi, dtype: str = "float32"):
        """x limited to [lo, hi] (either may be None), as minimum/maximum with scalar
        constants rather than relax's clip: ConvertLayout has no layout rule for clip and wrapped
        every requantize of an NHWC conv in two transposes (100-400 us each on EfficientNet)."""
        op = self.relax.op
        if hi is not None:
            x = op.minimum(x, self._const(hi, dtype))
        if lo is not None:
            x = op.maximum(x, self._const(lo, dtype))
        return x

    def quantize(self, x, qp: QParams):
        op = self.relax.op
        scaled = op.divide(x, self._const(qp.scale, "float32"))
        q = op.add(op.round(scaled), self._const(float(qp.zero_point), "float32"))
        return self._emit(op.astype(self.clamp(q, qp.qmin, qp.qmax), qp.dtype))

    def dequantize(self, value: QValue):
        op = self.relax.op
        centered = op.subtract(op.astype(value.expr, "float32"),
                               self._const(float(value.qp.zero_point), "float32"))
        return self._emit(op.multiply(centered, self._const(value.qp.scale, "float32")))

    def requantize_float(self, real_over_scale, qp: QParams, lo: int | None = None,
                         hi: int | None = None):
        """float32 tensor already divided by the output scale -> integers of `qp`."""
        op = self.relax.op
        lo = qp.qmin if lo is None else max(lo, qp.qmin)
        hi = qp.qmax if hi is None else min(hi, qp.qmax)
        q = op.add(op.round(real_over_scale), self._const(float(qp.zero_point), "float32"))
        return self._emit(op.astype(self.clamp(q, lo, hi), qp.dtype))

    def centered(self, value: QValue, factor: float):
        """(q - zero_point) * factor, in float32."""
        op = self.relax.op
        c = op.subtract(op.astype(value.expr, "float32"),
                        self._const(float(value.qp.zero_point), "float32"))
        return op.multiply(c, self._const(np.float32(factor), "float32"))

    def requantize_q(self, value: QValue, qp: QParams) -> QValue:
        return QValue(self.requantize_float(self.centered(value, value.qp.scale / qp.scale),
                                            qp), qp)

    # -- the walk ----------------------------------------------------------------------
    def wants_integers(self, node: Node) -> bool:
        """Whether `node`'s value is worth keeping in integers (flow.integer_tensors)."""
        return node.var in self.integer

    def scheme_of(self, node: Node) -> Scheme:
        """The scheme of a weighted node's layer: the plan's, else the default."""
        return self.config.plan.get(node.name) or self.config.default or Int8()

    def run(self, extra_outputs: tuple = ()):
        """The realized module; `extra_outputs` (vars) are appended to main's outputs as
        float (used to measure each layer's error)."""
        relax = self.relax
        function = self.graph.function
        params = list(function.params)
        with self.bb.function("main", params, attrs=function_attrs(function)):
            with self.bb.dataflow():
                for node in self.graph.nodes:
                    if node.index in self.absorbed:
                        continue
                    handler = HANDLERS.get(node.kind, handle_float)
                    result = handler(self, node)
                    if result is NotImplemented:
                        result = handle_float(self, node)
                    self.env[node.var] = result
                values = [self.float_of(v) for v in self.graph.output_list]
                values += [self.float_of(v) for v in extra_outputs]
                if len(values) == 1 and not self.graph.returns_tuple:
                    result = self.bb.emit_output(values[0])
                else:
                    result = self.bb.emit_output(relax.Tuple(values))
            self.bb.emit_func_output(result)
        return self.bb.get()


def verify(mod, config: RealizeConfig, graph: Graph, results: list[LayerResult]) -> list[str]:
    """What went against the plan, one line per layer: a layer planned on an int8 kernel that
    an int8 kernel could take, which did not become one; and the int8 x int8 -> int32 kernels
    of the realized module, counted against the layers that say they run on one."""
    from tvm import relax

    problems = []
    done = {r.var: r for r in results}
    for node in graph.nodes:
        if node.kind not in LAYER_KINDS:
            continue
        scheme = config.plan.get(node.name) or config.default or Int8()
        result = done.get(node.name)
        if not scheme.int8_kernel or layer_op(node).unsupported is not None or \
                (not scheme.covers_convs and node.kind != "matmul"):
            continue
        if (result is None or result.precision == "fp32") and config.weight_codes is None:
            # (a model that arrives quantized keeps in float what it left in float)
            problems.append(f"layer {node.name} was planned {scheme.label} but runs in fp32"
                            + (f": {result.reason}" if result is not None else ""))
    kernels = []

    def visit(expr):
        if isinstance(expr, relax.Call) and getattr(expr.op, "name", "") in (
                "relax.nn.conv2d", "relax.matmul") and \
                str(expr.ty.dtype) == "int32" and str(expr.args[1].ty.dtype) == "int8":
            kernels.append(expr)

    relax.analysis.post_order_visit(mod["main"], visit)
    integer = [r for r in results if r.precision in ("int8", "int8-a16", "int8-dynamic")]
    if len(kernels) != len(integer):
        problems.append(f"the realized model has {len(kernels)} int8 x int8 -> int32 kernels "
                        f"for {len(integer)} layers that say they run on one")
    return problems


__all__ = ["Realizer", "verify"]
