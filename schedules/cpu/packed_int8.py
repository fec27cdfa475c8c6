"""Int8 conv2d and matmul on packed weights, so that their inner loops are a dot-product
instruction (see intrinsics.py).

MetaSchedule (and our default schedules) tensorize an int8 kernel only when the weight already
sits in the instruction's block: `lanes` output channels x 4 reduction elements, contiguous.
On TVM's default layouts nothing tensorizes and tuned int8 is slower than tuned fp32.

- conv2d: data NHWC (the whole int8 graph is converted to NHWC first, so no transposes sit
  between layers), weight OHWI packed as [O/lanes, KH, KW, I/reduce, lanes, reduce];
- matmul: weight [K, N] packed as [N/lanes, K/reduce, lanes, reduce].

(lanes x reduce: 16 x 4 for VNNI, 4 x 4 for sdot, 2 x 8 for smmla.) smmla also takes two
activation rows at a time, so a layer uses it only when its output pixels per image row (a conv
with a horizontal stride of 1) or its rows (matmul) pair up; otherwise the target's next
instruction (sdot). The block of an smmla kernel is named after it
(`qcompile_packed_conv2d_smmla`): that is how the default schedules (int8_default.py) know
which instruction to emit.

A depthwise conv (one channel per group, no dilation, channels a multiple of 16): data NHWC,
weight HWIO packed as [C/16, KH, ceil(KW/4), 16, 4], each kernel row's taps in groups of 4
(zero weights fill the last group), for the depthwise intrinsic (intrinsics.py), which takes 4
neighbouring pixels' bytes of 16 channels: one vpdpbusd, or four sdot (smmla targets too). The
input gets as many more columns of padding as the last group has zero taps, so that every
group reads inside it. The integer sums are the unpacked kernel's; EfficientNet-Lite0's
depthwise convs ran 1.1-2.5x faster than unpacked (docs/studies/2026-12-06-depthwise-int8.md).

Weights are constants: they are packed here, at compile time, in numpy. A layer whose channels
do not divide into blocks, or whose weight is not a constant, keeps TVM's own legalization.
"""

from __future__ import annotations

import numpy as np

from .intrinsics import DEPTHWISE_LANES, DotProduct

CONV_BLOCK = "qcompile_packed_conv2d"
MATMUL_BLOCK = "qcompile_packed_matmul"
DEPTHWISE_BLOCK = "qcompile_packed_depthwise"
TAPS = 4  # taps of a depthwise window per intrinsic


def default_legalize(bb, call):
    import tvm

    return tvm.ir.Op.get(call.op.name).get_attr("FLegalize")(bb, call)


def _pad_rows(w: np.ndarray, axis: int, multiple: int) -> np.ndarray:
    """`w` with zero output channels added along `axis` up to a multiple of `multiple`."""
    extra = -w.shape[axis] % multiple
    if not extra:
        return w
    widths = [(0, 0)] * w.ndim
    widths[axis] = (0, extra)
    return np.pad(w, widths)


def pack_conv_weight(w_ohwi: np.ndarray, lanes: int, reduce: int) -> np.ndarray:
    """OHWI -> [O/lanes, KH, KW, I/reduce, lanes, reduce], O padded with zero channels."""
    w_ohwi = _pad_rows(w_ohwi, 0, lanes)
    o, kh, kw, i = w_ohwi.shape
    blocks = w_ohwi.reshape(o // lanes, lanes, kh, kw, i // reduce, reduce)
    return np.ascontiguousarray(blocks.transpose(0, 2, 3, 4, 1, 5))


def pack_matmul_weight(w_kn: np.ndarray, lanes: int, reduce: int) -> np.ndarray:
    """[K, N] -> [N/lanes, K/reduce, lanes, reduce], N padded with zero columns."""
    w_kn = _pad_rows(w_kn, 1, lanes)
    k, n = w_kn.shape
    blocks = w_kn.reshape(k // reduce, reduce, n // lanes, lanes)
    return np.ascontiguousarray(blocks.transpose(2, 0, 3, 1))


def _constant(expr):
    import tvm

    return expr.value.numpy() if isinstance(expr, tvm.ir.expr.GenericConst) else None


def _is_int8_layer(call, dot: DotProduct) -> bool:
    data, weight = call.args[0], call.args[1]
    return (str(call.attrs.out_dtype) == "int32"
            and data.ty.dtype == dot.activation_dtype
            and weight.ty.dtype == "int8")


def block_name(kind: str, dot: DotProduct) -> str:
    """The packed block's name: `kind`, suffixed with the instruction when it pairs rows (so
    that the names, and the tuning records keyed by them, of vpdpbusd/sdot kernels stay)."""
    return f"{kind}_{dot.instruction}" if dot.rows > 1 else kind


def conv2d_te(data, packed, strides, padding, dilation, channels: int, lanes: int,
              reduce: int, name: str = CONV_BLOCK):
    """NHWC int8 conv on an [O/lanes, KH, KW, I/reduce, lanes, reduce] weight -> int32."""
    from tvm import te, topi

    top, left, bottom, right = padding
    if any(padding):
        data = topi.nn.pad(data, [0, top, left, 0], [0, bottom, right, 0], pad_value=0)
    n, h, w, _ = data.shape
    _, kh, kw, i_blocks, _, _ = packed.shape
    sh, sw = strides
    dh, dw = dilation
    out_h = (h - (kh - 1) * dh - 1) // sh + 1
    out_w = (w - (kw - 1) * dw - 1) // sw + 1
    r = te.reduce_axis((0, kh), "r")
    s = te.reduce_axis((0, kw), "s")
    io = te.reduce_axis((0, i_blocks), "io")
    ii = te.reduce_axis((0, reduce), "ii")
    return te.compute(
        (n, out_h, out_w, channels),
        lambda b, y, x, o: te.sum(
            data[b, y * sh + r * dh, x * sw + s * dw, io * reduce + ii].astype("int32")
            * packed[o // lanes, r, s, io, o % lanes, ii].astype("int32"),
            axis=[r, s, io, ii]),
        name=name)


def pack_depthwise_weight(w_hwio: np.ndarray, lanes: int) -> np.ndarray:
    """HWIO [KH, KW, 1, C] -> [C/lanes, KH, ceil(KW/4), lanes, 4], zero taps after KW."""
    kh, kw, _, channels = w_hwio.shape
    groups = -(-kw // TAPS)
    taps = np.zeros((kh, groups * TAPS, channels), w_hwio.dtype)
    taps[:, :kw] = w_hwio[:, :, 0, :]
    blocks = taps.reshape(kh, groups, TAPS, channels // lanes, lanes)
    return np.ascontiguousarray(blocks.transpose(3, 0, 1, 4, 2))


def depthwise_te(data, packed, strides, padding, kernel_width: int, lanes: int):
    """NHWC int8 depthwise conv on a [C/lanes, KH, G, lanes, 4] weight -> int32."""
    from tvm import te, topi

    top, left, bottom, right = padding
    _, kh, groups, _, _ = packed.shape
    extra = int(groups) * TAPS - kernel_width  # columns read only by zero taps
    if any(padding) or extra:
        data = topi.nn.pad(data, [0, top, left, 0], [0, bottom, right + extra, 0], pad_value=0)
    n, h, w, channels = data.shape
    sh, sw = strides
    out_h = (h - kh) // sh + 1
    out_w = (w - extra - kernel_width) // sw + 1
    r = te.reduce_axis((0, kh), "r")
    g = te.reduce_axis((0, groups), "g")
    k = te.reduce_axis((0, TAPS), "k")
    return te.compute(
        (n, out_h, out_w, channels),
        lambda b, y, x, c: te.sum(
            data[b, y * sh + r, x * sw + g * TAPS + k, c].astype("int32")
            * packed[c // lanes, r, g, c % lanes, k].astype("int32"),
            axis=[r, g, k]),
        name=DEPTHWISE_BLOCK)


def matmul_te(data, packed, channels: int, lanes: int, reduce: int, name: str = MATMUL_BLOCK):
    """[..., K] int8 x [N/lanes, K/reduce, lanes, reduce] weight -> [..., N] int32."""
    from tvm import te

    ko = te.reduce_axis((0, packed.shape[1]), "ko")
    ki = te.reduce_axis((0, reduce), "ki")
    return te.compute(
        (*data.shape[:-1], channels),
        lambda *idx: te.sum(
            data[(*idx[:-1], ko * reduce + ki)].astype("int32")
            * packed[idx[-1] // lanes, ko, idx[-1] % lanes, ki].astype("int32"),
            axis=[ko, ki]),
        name=name)


def _conv_out_width(call) -> int:
    attrs = call.attrs
    width = int(call.args[0].ty.shape[2])
    kw = int(call.args[1].ty.shape[2])
    _, left, _, right = [int(v) for v in attrs.padding]
    return (width + left + right - (kw - 1) * int(attrs.dilation[1]) - 1) \
        // int(attrs.strides[1]) + 1


def _pairs_pixels(call, dot: DotProduct) -> bool:
    """Whether `dot` can take this conv's output pixels `dot.rows` at a time: an even output
    width, and a horizontal stride of 1 (two pixels' inputs are then one row stride apart)."""
    return dot.rows == 1 or (int(call.attrs.strides[1]) == 1
                             and _conv_out_width(call) % dot.rows == 0)


def matmul_rows(call) -> int | None:
    """The matmul's rows, or None when they are known only at run time."""
    rows = 1
    for dim in list(call.args[0].ty.shape)[:-1]:
        value = getattr(dim, "value", None)
        if not isinstance(value, int):
            return None
        rows *= value
    return rows


def _pads_little(channels: int, lanes: int) -> bool:
    """Whether `channels` output channels fill blocks of `lanes` with at most a third of them
    padding (24 or 40 channels on 16 VNNI lanes: 33% / 20%): the zero channels cost less than
    the unpacked kernel, which was 3-7x slower than the packed one (EfficientNet-Lite0)."""
    padded = -(-channels // lanes) * lanes
    return (padded - channels) * 3 <= padded


def _first_channels(bb, out, channels: int, padded: int, axis: int):
    """The conv/matmul result without its padding channels: a slice, which the requantize
    after it fuses with (one more pass over the int32 result)."""
    from tvm import topi

    if padded == channels:
        return out
    return bb.call_te(topi.strided_slice, bb.emit(out), [0], [channels], [1], [axis],
                      primfunc_name_hint="packed_channels")


def _is_depthwise(call, weight: np.ndarray, dot: DotProduct) -> bool:
    """An int8 NHWC depthwise conv (HWIO weights, one input channel per output channel, no
    dilation) whose channels fill blocks of DEPTHWISE_LANES."""
    attrs = call.attrs
    channels = int(weight.shape[3])
    return (attrs.data_layout == "NHWC" and attrs.kernel_layout == "HWIO"
            and attrs.out_layout == "NHWC" and _is_int8_layer(call, dot)
            and weight.ndim == 4 and int(weight.shape[2]) == 1
            and int(attrs.groups) == channels == int(call.args[0].ty.shape[3])
            and not channels % DEPTHWISE_LANES
            and all(int(d) == 1 for d in attrs.dilation))


def legalize_map(dot: DotProduct) -> dict:
    """LegalizeOps overrides that put int8 conv2d/matmul on packed weights for `dot` (or its
    fallback instruction, for layers whose shape does not fit it)."""
    from tvm import relax

    def conv2d(bb, call):
        attrs = call.attrs
        weight = _constant(call.args[1])
        if weight is not None and _is_depthwise(call, weight, dot):
            packed = pack_depthwise_weight(weight, DEPTHWISE_LANES)
            return bb.call_te(depthwise_te, call.args[0], relax.const(packed, "int8"),
                              [int(v) for v in attrs.strides], [int(v) for v in attrs.padding],
                              int(weight.shape[1]), DEPTHWISE_LANES,
                              primfunc_name_hint="packed_depthwise")
        if (weight is None or not _is_int8_layer(call, dot) or int(attrs.groups) != 1
                or attrs.data_layout != "NHWC" or attrs.kernel_layout != "OHWI"
                or attrs.out_layout != "NHWC"):
            return default_legalize(bb, call)
        fits = [d for d in dot.choices() if _pads_little(weight.shape[0], d.lanes)
                and not weight.shape[3] % d.reduce and _pairs_pixels(call, d)]
        if not fits:
            return default_legalize(bb, call)
        chosen = fits[0]
        packed = pack_conv_weight(weight, chosen.lanes, chosen.reduce)
        out = bb.call_te(conv2d_te, call.args[0], relax.const(packed, "int8"),
                         [int(v) for v in attrs.strides], [int(v) for v in attrs.padding],
                         [int(v) for v in attrs.dilation], packed.shape[0] * chosen.lanes,
                         chosen.lanes, chosen.reduce, block_name(CONV_BLOCK, chosen),
                         primfunc_name_hint="packed_conv2d")
        return _first_channels(bb, out, int(weight.shape[0]), packed.shape[0] * chosen.lanes, 3)

    def matmul(bb, call):
        weight = _constant(call.args[1])
        if weight is None or weight.ndim != 2 or not _is_int8_layer(call, dot):
            return default_legalize(bb, call)
        fits = [d for d in dot.choices() if _pads_little(weight.shape[1], d.lanes)
                and not weight.shape[0] % d.reduce
                and (d.rows == 1 or (matmul_rows(call) or 1) % d.rows == 0)]
        if not fits:
            return default_legalize(bb, call)
        chosen = fits[0]
        packed = pack_matmul_weight(weight, chosen.lanes, chosen.reduce)
        out = bb.call_te(matmul_te, call.args[0], relax.const(packed, "int8"),
                         packed.shape[0] * chosen.lanes, chosen.lanes, chosen.reduce,
                         block_name(MATMUL_BLOCK, chosen), primfunc_name_hint="packed_matmul")
        return _first_channels(bb, out, int(weight.shape[1]), packed.shape[0] * chosen.lanes,
                               len(call.args[0].ty.shape) - 1)

    return {"relax.nn.conv2d": conv2d, "relax.matmul": matmul}


def conv_weight_dtypes(mod) -> set[str]:
    """The dtypes of the weights of `mod`'s conv2d calls."""
    from tvm import relax

    from .. import visit_relax_functions

    found: set[str] = set()

    def visit(expr):
        if isinstance(expr, relax.Call) and getattr(expr.op, "name", "") == "relax.nn.conv2d":
            found.add(str(expr.args[1].ty.dtype))

    visit_relax_functions(mod, visit)
    return found
