"""Realize: rewrite the float model into integer kernels, with as few boundaries as possible.

Walks the model's dataflow in order. Each value is either float or an integer tensor with its
quantization parameters (QValue). Handlers, registered per node kind, emit:

- conv2d / matmul with constant weights (one "layer"): int8 weights (symmetric, per channel),
  uint8/int8 activations, int32 accumulation, the bias and the activation zero-point correction
  folded into one int32 constant, and the output requantized in the same fused kernel with the
  following ReLU/ReLU6/clip as its integer bounds. When nothing after it takes integers (or it
  is a graph output, e.g. logits), the int32 accumulator is dequantized straight to float.
  A layer with a 16-bit input runs its int8 kernel on the input's two bytes (a batch of two)
  and combines the two accumulators in float (byte_planes, combined_planes);
- add, mean (global average pool), average/max pooling, concat, clip: integer in, integer out,
  rescaled to the output's parameters inside the kernel;
- reshape-like ops: on the integer tensor, parameters unchanged;
- anything else: float, fed by a dequantize.

Quantize/dequantize boundaries appear only where float and integer values meet.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from ..relax_main import function_attrs, without_main
from .flow import LAYER_KINDS, SAME_PARAMS_KINDS, integer_tensors
from .graph import Graph, Node, constant_value, relax_flow
from .observers import QParams
from .weights import quantize_weight, sqnr_db

PASS_THROUGH = SAME_PARAMS_KINDS - {"max_pool2d"}  # reshape-likes: the integers themselves


@dataclass
class QValue:
    """An integer tensor and what its integers mean."""

    expr: Any
    qp: QParams


@dataclass
class LayerResult:
    """What happened to one weighted layer (conv2d/matmul)."""

    var: str
    op: str
    precision: str                  # int8 | int8-a16 (16-bit input) | fp16 | fp32 | ...
    reason: str = ""                # why it stayed in float
    input_qp: QParams | None = None
    output_qp: QParams | None = None  # None: the layer's output is float
    weight_scales: list[float] = field(default_factory=list)
    weight_sqnr_db: float | None = None
    rounding: str = ""              # how the int8 weights were rounded: gptq | nearest | model
    fused: tuple[str, ...] = ()     # bias / activation nodes folded into the kernel
    output_var: Any = None          # the relax var whose value the layer produces


MODES = ("static", "dynamic", "weight-only")


@dataclass
class RealizeConfig:
    mode: str = "static"              # static (calibrated) | dynamic | weight-only
    activation_dtype: str = "uint8"   # "uint8" (x86 VNNI: u8 x s8) or "int8" (ARM sdot)
    plane_dtype: str = "uint8"        # the 8-bit planes of a 16-bit input: the target's type
    per_channel: bool = True
    float_layers: frozenset = frozenset()  # layer vars kept in fp32 (by relax name)
    fp16_layers: frozenset = frozenset()   # layer vars computed in fp16 (fp32 accumulation)
    per_tensor_layers: frozenset = frozenset()  # int8 layers with one weight scale
    input_qparams: Any = None              # {layer var name: its input's QParams} (rules)
    stem: str | None = None                # the image stem conv, kept in float
    weight_codes: Any = None               # prequantized.WeightCodes of a QDQ model
    input_means: Any = None                # {layer input var: per-channel mean} (bias correction)
    input_moments: Any = None              # {layer var name: rounding.InputMoments} (GPTQ)


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
        self.quant_cache: dict[Any, QValue] = {}
        self.absorbed: set[int] = set()      # node indices folded into a layer's kernel
        self.layers: list[LayerResult] = []
        int8 = [n.name for n in graph.nodes if n.kind in LAYER_KINDS and
                not self._layer_stays_float(n)]
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

    def _layer_stays_float(self, node: Node) -> bool:
        return node.kind in ("conv2d", "matmul") and (
            node.name in self.config.float_layers or node.name in self.config.fp16_layers or
            node.name == self.config.stem or constant_value(node.args[1]) is None)

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


# -- handlers ------------------------------------------------------------------------------
Handler = Callable[[Realizer, Node], Any]
HANDLERS: dict[str, Handler] = {}


def handles(*kinds: str):
    def register(fn: Handler) -> Handler:
        for kind in kinds:
            HANDLERS[kind] = fn
        return fn
    return register


def handle_float(r: Realizer, node: Node):
    """Re-emit the node in float, its tensor arguments dequantized where needed."""
    relax = r.relax
    value = node.value

    def subst(expr):
        if isinstance(expr, relax.Var):
            return r.float_of(expr)
        if isinstance(expr, relax.Tuple):
            return relax.Tuple([subst(f) for f in expr.fields])
        return expr

    if node.kind == "dequantize" and isinstance(r.lookup(node.args[0]), QValue):
        # the integer tensor itself, not its float value
        q = r.lookup(node.args[0])
        new = relax.Call(value.op, [q.expr, *value.args[1:]], value.attrs, value.ty_args)
    elif isinstance(value, relax.Call):
        new = relax.Call(value.op, [subst(a) for a in value.args], value.attrs,
                         value.ty_args)
    else:
        new = subst(value)
    return r._emit(new)


def _fused_chain(r: Realizer, node: Node, channel_axis: int, channels: int):
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


def _layer(r: Realizer, node: Node, weight: np.ndarray, channel_axis: int, reduce_axes,
           emit_acc: Callable[[QValue, np.ndarray], Any]):
    """Shared by conv2d and matmul: quantize the weight, fold bias and zero-point
    correction, requantize or dequantize the accumulator, fuse the activation bounds."""
    op = r.relax.op
    channels = weight.shape[channel_axis]
    last, bias, lo, hi, absorbed = _fused_chain(r, node, channel_axis, channels)
    x = node.args[0]
    given_qp = (r.config.input_qparams or {}).get(node.name)
    if not r.has_qparams(x) and given_qp is None:
        return NotImplemented
    xq = r.quant_of(x, given_qp)
    given = r.config.weight_codes.find(weight) if r.config.weight_codes is not None else None
    if given is not None and given[2] not in (channel_axis, None):
        given = None
    if given is None and r.config.weight_codes is not None:
        return NotImplemented  # a QDQ model that keeps this layer's weights in float
    in_scale = np.float32(xq.qp.scale)
    wide = xq.qp.bits == 16  # the input runs as two bytes; the correction is added in float
    means = r.config.input_means.get(x) if r.config.input_means is not None else None
    qw = quantize_weight(
        weight, node.kind,
        per_channel=r.config.per_channel and node.name not in r.config.per_tensor_layers,
        bias=bias, input_scale=None if wide else in_scale,
        moments=(r.config.input_moments or {}).get(node.name), means=means, given=given)
    w_q, s_w, bias = qw.codes, qw.scales, qw.bias
    s_w_c = np.broadcast_to(s_w, (channels,)).astype(np.float32)
    # int32 constant: bias / (s_x * s_w) - zp_x * sum(w_q) over each output's reduction
    acc_scale = (in_scale * s_w_c).astype(np.float32)
    zero_point = plane_zero_point(xq.qp, r.config.plane_dtype) if wide else xq.qp.zero_point
    correction = -np.int64(zero_point) * w_q.astype(np.int64).sum(axis=reduce_axes)
    if bias is not None:
        correction = correction + np.round(bias / acc_scale).astype(np.int64)
    acc = emit_acc(xq, w_q)
    out_shape = last.shape
    bshape = [1] * len(out_shape)
    out_axis = 1 if node.kind == "conv2d" else len(out_shape) - 1
    bshape[out_axis] = channels
    if wide:
        accf = combined_planes(r, acc, correction.astype(np.float32).reshape(bshape))
    else:
        acc = r._emit(op.add(acc, r._const(correction.astype(np.int32).reshape(bshape),
                                           "int32")))
        accf = op.astype(acc, "float32")
    layer = LayerResult(node.name, node.kind, "int8-a16" if wide else "int8", input_qp=xq.qp,
                        weight_scales=[float(s) for s in s_w],
                        weight_sqnr_db=qw.sqnr_db,
                        rounding=qw.rounding, fused=tuple(r.graph.nodes[i].name for i in absorbed),
                        output_var=last.var)
    r.absorbed.update(absorbed)
    if r.wants_integers(last) and last.var in r.qparams:
        qp = r.qparams[last.var]
        multiplier = (acc_scale / np.float32(qp.scale)).astype(np.float32).reshape(bshape)
        lo_q = None if lo is None else qp.zero_point + int(np.round(lo / qp.scale))
        hi_q = None if hi is None else qp.zero_point + int(np.round(hi / qp.scale))
        out = QValue(r.requantize_float(op.multiply(accf, r._const(multiplier, "float32")),
                                        qp, lo_q, hi_q), qp)
        layer.output_qp = qp
    else:
        real = op.multiply(accf, r._const(acc_scale.reshape(bshape), "float32"))
        if lo is not None or hi is not None:
            real = r.clamp(real, lo, hi)
        out = r._emit(real)
    r.layers.append(layer)
    r.env[last.var] = out
    return out


def plane_offsets(qp: QParams, plane_dtype: str) -> tuple[int, int]:
    """What is added to the high and low bytes of a 16-bit integer to fit `plane_dtype`."""
    high = {("uint16", "uint8"): 0, ("int16", "uint8"): 128,
            ("uint16", "int8"): -128, ("int16", "int8"): 0}[(qp.dtype, plane_dtype)]
    return high, (0 if plane_dtype == "uint8" else -128)


def plane_zero_point(qp: QParams, plane_dtype: str) -> int:
    """The zero point of a 16-bit input in terms of its byte planes: x - z = 256 h + l - z'."""
    high, low = plane_offsets(qp, plane_dtype)
    return qp.zero_point + 256 * high + low


def byte_planes(r: Realizer, data, qp: QParams):
    """A 16-bit integer tensor as its high and low bytes, stacked along axis 0 (one int8
    kernel computes both): x = 256 h + l, each byte moved into `plane_dtype`'s range."""
    op = r.relax.op
    high, low = plane_offsets(qp, r.config.plane_dtype)
    wide = op.astype(data, "int32")
    h = op.add(op.right_shift(wide, r._const(8, "int32")), r._const(high, "int32"))
    l = op.add(op.bitwise_and(wide, r._const(255, "int32")), r._const(low, "int32"))
    dtype = r.config.plane_dtype
    return r._emit(op.concat([op.astype(h, dtype), op.astype(l, dtype)], axis=0))


def combined_planes(r: Realizer, acc, correction: np.ndarray):
    """The float32 accumulator of a 16-bit input from its planes' int32 accumulators (stacked
    along axis 0): 256 acc_h + acc_l + correction, in float (256 acc_h may not fit int32)."""
    op = r.relax.op
    halves = r._emit(op.split(acc, 2, axis=0))
    acc_h = op.astype(r.relax.TupleGetItem(halves, 0), "float32")
    acc_l = op.astype(r.relax.TupleGetItem(halves, 1), "float32")
    return op.add(op.add(op.multiply(acc_h, r._const(256.0, "float32")), acc_l),
                  r._const(correction, "float32"))


def _stays_float(r: Realizer, node: Node, unsupported: str | None) -> bool:
    """Whether a weighted layer stays float (recording why): kept by the rules (fp32 or
    fp16), the image stem, or `unsupported` (no integer kernel for its form)."""
    if node.name in r.config.fp16_layers and unsupported is None:
        return False
    if node.name in r.config.float_layers or node.name in r.config.fp16_layers:
        reason = "kept in float by the rules"
    elif node.name == r.config.stem:
        reason = ("first conv on the image: little compute, most sensitive (--int8-stem to "
                  "quantize)")
    else:
        reason = unsupported
    if reason is not None:
        r.layers.append(LayerResult(node.name, node.kind, "fp32", reason))
    return reason is not None


def _not_static_int8(r: Realizer, node: Node, weight: np.ndarray, channel_axis: int):
    """A weighted layer in fp16 (by the rules), weight-only or dynamic int8; None for static
    int8. Dynamic mode never reaches here with a conv (it stays fp32)."""
    if node.name in r.config.fp16_layers:
        return _fp16_layer(r, node, weight)
    if r.config.mode == "weight-only":
        return _weight_only(r, node, weight, channel_axis)
    if r.config.mode == "dynamic":
        return _dynamic_matmul(r, node, weight)
    return None


@handles("conv2d")
def handle_conv2d(r: Realizer, node: Node):
    weight = constant_value(node.args[1])
    if weight is None or node.attr("data_layout") != "NCHW" or \
            node.attr("kernel_layout") != "OIHW" or node.dtype != "float32":
        unsupported = ("no integer kernel for a conv with non-constant weights or a layout "
                       "other than NCHW/OIHW")
    else:
        unsupported = None
    if r.config.mode == "dynamic" and unsupported is None:
        unsupported = ("dynamic quantization covers MatMul/Gemm; convolutions need static int8 "
                       "(--quantize int8 with calibration)")
    if _stays_float(r, node, unsupported):
        return NotImplemented
    other = _not_static_int8(r, node, weight, channel_axis=0)
    if other is not None:
        return other
    op = r.relax.op
    strides = [int(s) for s in node.attr("strides")]
    padding = [int(p) for p in node.attr("padding")]
    dilation = [int(d) for d in node.attr("dilation")]
    groups = int(node.attr("groups"))

    def emit_acc(xq: QValue, w_q: np.ndarray):
        data = xq.expr
        pad = padding
        if (xq.qp.zero_point != 0 or xq.qp.bits == 16) and any(padding):
            # the real zero is the zero point: pad with it, not with 0 (a 16-bit input
            # before it is split into bytes)
            top, left, bottom, right = padding
            data = r._emit(op.nn.pad(data, [0, 0, 0, 0, top, bottom, left, right],
                                     pad_value=float(xq.qp.zero_point)))
            pad = [0, 0, 0, 0]
        if xq.qp.bits == 16:
            data = byte_planes(r, data, xq.qp)
        return r._emit(op.nn.conv2d(data, r._const(w_q, "int8"), strides=strides, padding=pad,
                                    dilation=dilation, groups=groups, out_dtype="int32"))

    result = _layer(r, node, weight, channel_axis=0, reduce_axes=(1, 2, 3), emit_acc=emit_acc)
    if result is NotImplemented:
        r.layers.append(LayerResult(node.name, "conv2d", "fp32", _float_reason(r)))
    return result


@handles("matmul")
def handle_matmul(r: Realizer, node: Node):
    weight = constant_value(node.args[1])
    unsupported = ("no integer kernel for a matmul of two activations"
                   if weight is None or weight.ndim != 2 or node.dtype != "float32" else None)
    if _stays_float(r, node, unsupported):
        return NotImplemented
    other = _not_static_int8(r, node, weight, channel_axis=1)
    if other is not None:
        return other
    op = r.relax.op

    def emit_acc(xq: QValue, w_q: np.ndarray):
        data = byte_planes(r, xq.expr, xq.qp) if xq.qp.bits == 16 else xq.expr
        return r._emit(op.matmul(data, r._const(w_q, "int8"), out_dtype="int32"))

    result = _layer(r, node, weight, channel_axis=1, reduce_axes=(0,), emit_acc=emit_acc)
    if result is NotImplemented:
        r.layers.append(LayerResult(node.name, "matmul", "fp32", _float_reason(r)))
    return result


def _fp16_layer(r: Realizer, node: Node, weight: np.ndarray):
    """The layer in half precision: its input and weight in fp16, accumulated in fp32 (the
    weight is stored as fp16: half the size). Bias and activation follow in fp32."""
    half = weight.astype(np.float16)
    x = r._emit(r.relax.op.astype(r.float_of(node.args[0]), "float16"))
    r.layers.append(LayerResult(node.name, node.kind, "fp16", "kept in fp16 by the rules",
                                weight_sqnr_db=sqnr_db(weight, half.astype(np.float32)),
                                output_var=node.var))
    return r._emit(_float_accumulating(r, node, x, r._const(half, "float16")))


def _float_accumulating(r: Realizer, node: Node, x, w):
    """The node's conv2d/matmul on `x` and the weight constant `w` (int8 or fp16, widened
    inside the kernel), accumulating in fp32."""
    op = r.relax.op
    if node.kind == "conv2d":
        return op.nn.conv2d(x, w, strides=node.attr("strides"), padding=node.attr("padding"),
                            dilation=node.attr("dilation"), groups=int(node.attr("groups")),
                            data_layout=node.attr("data_layout"),
                            kernel_layout=node.attr("kernel_layout"), out_dtype="float32")
    return op.matmul(x, w, out_dtype="float32")


def _weight_only(r: Realizer, node: Node, weight: np.ndarray, channel_axis: int):
    """Weight-only int8: weights stored as int8 with per-channel scales, activations and
    arithmetic in fp32; the per-channel scale multiplies the output (conv and matmul are
    linear in each output channel)."""
    qw = quantize_weight(weight, node.kind, per_channel=r.config.per_channel)
    out_rank = len(node.shape)
    scale_shape = [1] * out_rank
    scale_shape[1 if node.kind == "conv2d" else out_rank - 1] = weight.shape[channel_axis]
    layer = _float_accumulating(r, node, r.float_of(node.args[0]), r._const(qw.codes, "int8"))
    out = r._emit(r.relax.op.multiply(r._emit(layer),
                                      r._const(qw.channel_scales().reshape(scale_shape),
                                               "float32")))
    r.layers.append(LayerResult(node.name, node.kind, "int8-weights",
                                weight_scales=[float(v) for v in qw.scales],
                                weight_sqnr_db=qw.sqnr_db, output_var=node.var))
    return out


def _dynamic_matmul(r: Realizer, node: Node, weight: np.ndarray):
    """Dynamic int8: int8 weights (per output column), the activation quantized at run time
    with a per-tensor scale and zero point from its own min and max (onnxruntime's
    DynamicQuantizeLinear), an int8 x int8 -> int32 matmul, and the zero point's correction
    and both scales applied to the accumulator."""
    op = r.relax.op
    qmin, qmax = (0, 255) if r.config.activation_dtype == "uint8" else (-128, 127)
    x = r.float_of(node.args[0])
    f32 = "float32"
    lo = op.minimum(op.min(x), r._const(0.0, f32))
    hi = op.maximum(op.max(x), r._const(0.0, f32))
    scale = r._emit(op.maximum(op.divide(op.subtract(hi, lo), r._const(qmax - qmin, f32)),
                               r._const(np.finfo(np.float32).tiny, f32)))
    zp = r._emit(r.clamp(op.round(op.subtract(r._const(qmin, f32), op.divide(lo, scale))),
                         qmin, qmax))
    xq = op.astype(r.clamp(op.add(op.round(op.divide(x, scale)), zp), qmin, qmax),
                   r.config.activation_dtype)
    qw = quantize_weight(weight, node.kind, per_channel=r.config.per_channel)
    w_q, s_w = qw.codes, qw.channel_scales()
    acc = r._emit(op.matmul(r._emit(xq), r._const(w_q, "int8"), out_dtype="int32"))
    column_sums = w_q.astype(np.int32).sum(axis=0)
    acc = op.subtract(acc, op.multiply(op.astype(zp, "int32"),
                                       r._const(column_sums, "int32")))
    out = r._emit(op.multiply(op.astype(acc, f32), op.multiply(scale, r._const(s_w, f32))))
    r.layers.append(LayerResult(node.name, node.kind, "int8-dynamic",
                                weight_scales=[float(v) for v in s_w],
                                weight_sqnr_db=qw.sqnr_db, output_var=node.var))
    return out


def _float_reason(r: Realizer) -> str:
    if r.config.weight_codes is not None:
        return "the pre-quantized model keeps it in float (no QDQ on its input or weights)"
    return "its input has no calibration"


def _integer_inputs(r: Realizer, node: Node) -> bool:
    return any(isinstance(r.lookup(a), QValue) for a in node.args)


@handles("add")
def handle_add(r: Realizer, node: Node):
    a, b = node.args
    if constant_value(a) is not None or constant_value(b) is not None or \
            not _integer_inputs(r, node) or not r.wants_integers(node) or \
            node.var not in r.qparams or \
            not (r.has_qparams(a) and r.has_qparams(b)) or node.shape != _shape(a) or \
            node.shape != _shape(b):
        return NotImplemented
    qp = r.qparams[node.var]
    qa, qb = r.quant_of(a), r.quant_of(b)
    op = r.relax.op
    total = op.add(r.centered(qa, qa.qp.scale / qp.scale), r.centered(qb, qb.qp.scale / qp.scale))
    return QValue(r.requantize_float(total, qp), qp)


def _shape(expr) -> tuple[int, ...]:
    return tuple(int(d) for d in expr.ty.shape)


def _rescaled(r: Realizer, node: Node, compute):
    """A linear op on one integer input (mean, average pool): `compute` applied to the input
    centered and rescaled to the output's scale, then requantized."""
    x = r.lookup(node.args[0])
    if not isinstance(x, QValue) or node.var not in r.qparams or not r.wants_integers(node):
        return NotImplemented
    qp = r.qparams[node.var]
    return QValue(r.requantize_float(compute(r.centered(x, x.qp.scale / qp.scale)), qp), qp)


@handles("mean")
def handle_mean(r: Realizer, node: Node):
    axis = [int(a) for a in node.attr("axis")]
    return _rescaled(r, node, lambda x: r.relax.op.mean(
        x, axis=axis, keepdims=bool(node.attr("keepdims"))))


@handles("avg_pool2d")
def handle_avg_pool(r: Realizer, node: Node):
    return _rescaled(r, node, lambda x: r.relax.Call(node.value.op, [x], node.value.attrs))


@handles("max_pool2d")
def handle_max_pool(r: Realizer, node: Node):
    x = r.lookup(node.args[0])
    if not isinstance(x, QValue):
        return NotImplemented
    relax = r.relax
    return QValue(r._emit(relax.Call(node.value.op, [x.expr], node.value.attrs)), x.qp)


@handles(*sorted(PASS_THROUGH))
def handle_pass_through(r: Realizer, node: Node):
    x = r.lookup(node.args[0])
    if not isinstance(x, QValue):
        return NotImplemented
    relax = r.relax
    value = node.value
    return QValue(r._emit(relax.Call(value.op, [x.expr, *value.args[1:]], value.attrs,
                                     value.ty_args)), x.qp)


@handles("concat")
def handle_concat(r: Realizer, node: Node):
    if not _integer_inputs(r, node) or node.var not in r.qparams or \
            not r.wants_integers(node) or not all(r.has_qparams(a) for a in node.args):
        return NotImplemented
    qp = r.qparams[node.var]
    parts = [r.quant_of(a, qp).expr for a in node.args]
    return QValue(r._emit(r.relax.op.concat(parts, axis=int(node.attr("axis")))), qp)


@handles("relu", "max", "min", "clip")
def handle_clip(r: Realizer, node: Node):
    x = r.lookup(node.args[0])
    if not isinstance(x, QValue):
        return NotImplemented
    qp = x.qp
    if node.kind == "relu":
        lo, hi = 0.0, None
    elif node.kind == "max":
        lo, hi = node.bound, None
    elif node.kind == "min":
        lo, hi = None, node.bound
    else:
        lo, hi = (float(getattr(v, "value", v)) for v in node.value.args[1:3])
    lo_q = qp.qmin if lo is None else max(qp.qmin, qp.zero_point + int(np.round(lo / qp.scale)))
    hi_q = qp.qmax if hi is None else min(qp.qmax, qp.zero_point + int(np.round(hi / qp.scale)))
    return QValue(r._emit(r.clamp(x.expr, lo_q, hi_q, qp.dtype)), qp)


def qdq_params(node: Node) -> QParams | None:
    """The scalar scale and zero point of a quantize/dequantize node (None if per-axis)."""
    scale = constant_value(node.value.args[1])
    zp = constant_value(node.value.args[2])
    if scale is None or zp is None or scale.size != 1 or zp.size != 1:
        return None
    dtype = str(zp.dtype)
    if dtype not in ("uint8", "int8"):
        return None
    return QParams(float(np.float32(scale.reshape(()))), int(zp.reshape(())), dtype)


@handles("quantize")
def handle_quantize(r: Realizer, node: Node):
    qp = qdq_params(node)
    if qp is None:
        return NotImplemented
    return r.quant_of(node.args[0], qp)


@handles("dequantize")
def handle_dequantize(r: Realizer, node: Node):
    x = r.lookup(node.args[0])
    qp = qdq_params(node)
    if not isinstance(x, QValue) or qp is None or qp != x.qp:
        return NotImplemented
    return x  # stays an integer tensor until something needs its float value


def graph_qparams(graph: Graph) -> dict:
    """{var: QParams} of every tensor that a QuantizeLinear quantizes (a QDQ model)."""
    found = {}
    for node in graph.nodes:
        if node.kind == "quantize":
            qp = qdq_params(node)
            if qp is not None:
                found[node.args[0]] = qp
    return found
