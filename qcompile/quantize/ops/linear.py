"""Weighted ops (conv2d, matmul): each is computed by the scheme the plan gives its layer
(schemes/), after the checks of what an integer kernel can take."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from ..graph import constant_value
from ..values import LayerResult, QValue
from .registry import handles

if TYPE_CHECKING:
    from ..graph import Node
    from ..realize import Realizer


@dataclass(frozen=True)
class LayerOp:
    """A weighted node (conv2d or matmul) as its scheme emits it."""

    node: Node
    weight: np.ndarray | None  # the constant weight (None: a matmul of two activations)
    unsupported: str | None    # why no integer kernel fits it (None: one does)

    @property
    def kind(self) -> str:
        return self.node.kind

    @property
    def channel_axis(self) -> int:
        """The weight's output-channel axis: a conv's OIHW 0, a matmul's [K, N] 1."""
        return 0 if self.kind == "conv2d" else 1

    @property
    def reduce_axes(self) -> tuple[int, ...]:
        """The weight's axes summed into each output."""
        return (1, 2, 3) if self.kind == "conv2d" else (0,)

    @property
    def channels(self) -> int:
        return int(self.weight.shape[self.channel_axis])

    @property
    def takes_rows(self) -> bool:
        """Whether the layer is a matmul over its input's last axis, as the group-wise 4-bit
        kernels take it: a MatMul/Gemm, or a pointwise conv (`is_pointwise`) read as NHWC."""
        return self.weight is not None and (self.kind == "matmul" or is_pointwise(self.node))

    def row_weight(self) -> np.ndarray:
        """The weight as a [K, N] matmul weight (a pointwise conv's OIHW [N, K, 1, 1]
        transposed)."""
        return self.weight[:, :, 0, 0].T if self.kind == "conv2d" else self.weight

    def rows_of(self, r: Realizer, data):
        """The layer's input as rows [..., K]: a pointwise conv's NCHW input transposed to
        NHWC (every stride-th pixel) and its pixels made one axis of rows, [N*H*W, C] (the
        lowering fuses the transpose into the producer's epilogue)."""
        if self.kind != "conv2d":
            return data
        op = r.relax.op
        rows = op.permute_dims(data, [0, 2, 3, 1])
        n, c, h, w = (int(d) for d in data.ty.shape)
        sh, sw = (int(s) for s in self.node.attr("strides"))
        if (sh, sw) != (1, 1):
            rows = op.strided_slice(rows, axes=[1, 2], begin=[0, 0], end=[h, w],
                                    strides=[sh, sw])
        return r._emit(op.reshape(rows, [n * (-(-h // sh)) * (-(-w // sw)), c]))

    def from_rows(self, r: Realizer, out):
        """The inverse of `rows_of` on the layer's (emitted) output: a conv's rows back to
        NCHW; a matmul's output as it is."""
        if self.kind != "conv2d":
            return out
        op = r.relax.op
        n, _, h, w = (int(d) for d in self.node.var.ty.shape)
        return r._emit(op.permute_dims(op.reshape(out, [n, h, w, self.channels]), [0, 3, 1, 2]))

    def accumulate(self, r: Realizer, xq: QValue, codes: np.ndarray,
                   split: Callable[[Any], Any] | None = None):
        """The int8 x int8 -> int32 kernel on the integer input `xq` and the int8 `codes`.
        A conv pads with the input's zero point (its real zero). `split`: applied to the
        (padded) input before the kernel (a 16-bit input's byte planes)."""
        op = r.relax.op
        data = xq.expr
        if self.kind == "matmul":
            data = split(data) if split is not None else data
            return r._emit(op.matmul(data, r._const(codes, "int8"), out_dtype="int32"))
        node = self.node
        padding = [int(p) for p in node.attr("padding")]
        if (xq.qp.zero_point != 0 or split is not None) and any(padding):
            top, left, bottom, right = padding
            data = r._emit(op.nn.pad(data, [0, 0, 0, 0, top, bottom, left, right],
                                     pad_value=float(xq.qp.zero_point)))
            padding = [0, 0, 0, 0]
        if split is not None:
            data = split(data)
        return r._emit(op.nn.conv2d(
            data, r._const(codes, "int8"), strides=[int(s) for s in node.attr("strides")],
            padding=padding, dilation=[int(d) for d in node.attr("dilation")],
            groups=int(node.attr("groups")), out_dtype="int32"))

    def float_accumulating(self, r: Realizer, x, w):
        """The node's conv2d/matmul on `x` and the weight constant `w` (int8 or fp16, widened
        inside the kernel), accumulating in fp32."""
        op = r.relax.op
        node = self.node
        if self.kind == "conv2d":
            return op.nn.conv2d(x, w, strides=node.attr("strides"),
                                padding=node.attr("padding"), dilation=node.attr("dilation"),
                                groups=int(node.attr("groups")),
                                data_layout=node.attr("data_layout"),
                                kernel_layout=node.attr("kernel_layout"), out_dtype="float32")
        return op.matmul(x, w, out_dtype="float32")

    def result(self, precision: str, **fields) -> LayerResult:
        """What became of the layer; the bits stored per weight follow from `precision` (int8
        with a float32 scale per output channel, fp16, fp32) unless the scheme gives them."""
        if self.weight is not None:
            size = int(self.weight.size)
            fields.setdefault("weights", size)
            fields.setdefault("weight_bits", 8 + 32 * self.channels / size
                              if precision.startswith("int8") else
                              16.0 if precision == "fp16" else 32.0)
        return LayerResult(self.node.name, self.kind, precision, **fields)


def is_pointwise(node: Node) -> bool:
    """A conv2d with a constant 1x1 kernel, one group and no padding: at each (stride-th)
    pixel, a matmul of the input channels by the weight."""
    import tvm

    weight = node.args[1] if node.kind == "conv2d" else None
    if not isinstance(weight, tvm.ir.expr.GenericConst):
        return False
    shape = [int(d) for d in weight.ty.shape]  # the constant's type: no copy of its values
    return len(shape) == 4 and shape[2:] == [1, 1] and int(node.attr("groups")) == 1 and \
        not any(int(p) for p in node.attr("padding")) and \
        node.attr("data_layout") == "NCHW" and node.attr("kernel_layout") == "OIHW"


def layer_op(node: Node) -> LayerOp:
    """The node as a LayerOp, with why no integer kernel takes it (if none does)."""
    weight = constant_value(node.args[1])
    if node.kind == "conv2d":
        unsupported = None
        if weight is None or node.attr("data_layout") != "NCHW" or \
                node.attr("kernel_layout") != "OIHW" or node.dtype != "float32":
            unsupported = ("no integer kernel for a conv with non-constant weights or a layout "
                           "other than NCHW/OIHW")
    else:
        unsupported = ("no integer kernel for a matmul of two activations"
                       if weight is None or weight.ndim != 2 or node.dtype != "float32"
                       else None)
    return LayerOp(node, weight, unsupported)


@handles("conv2d", "matmul")
def handle_layer(r: Realizer, node: Node):
    return r.scheme_of(node).emit(r, layer_op(node))


def fused_chain(r: Realizer, node: Node, channels: int):
    """The bias add and the clip bounds that follow a layer and can fold into its kernel:
    (last node, bias or None, lo, hi, absorbed indices)."""
    current, bias, lo, hi, absorbed = node, None, None, None, []
    while len(current.consumers) == 1 and current.var not in r.graph.outputs:
        nxt = current.consumers[0]
        if nxt.kind == "add" and bias is None and lo is None and hi is None:
            other = [a for a in nxt.args if not a.same_as(current.var)]
            value = constant_value(other[0]) if len(other) == 1 else None
            if value is None or value.size != channels:
                break
            bias = value.reshape(-1).astype(np.float32)
        elif nxt.kind == "relu":
            lo = 0.0 if lo is None else max(lo, 0.0)
        elif nxt.kind == "max" and nxt.bound is not None:
            lo = nxt.bound if lo is None else max(lo, nxt.bound)
        elif nxt.kind == "min" and nxt.bound is not None:
            hi = nxt.bound if hi is None else min(hi, nxt.bound)
        elif nxt.kind == "clip":
            a_min, a_max = (float(getattr(v, "value", v)) for v in nxt.value.args[1:3])
            lo = a_min if lo is None else max(lo, a_min)
            hi = a_max if hi is None else min(hi, a_max)
        else:
            break
        if nxt.dtype != "float32":
            break
        absorbed.append(nxt.index)
        current = nxt
    return current, bias, lo, hi, absorbed


__all__ = ["LayerOp", "fused_chain", "handle_layer", "is_pointwise", "layer_op"]
