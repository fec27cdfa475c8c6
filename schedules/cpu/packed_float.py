"""Float matmuls and convolutions on constant weights packed into column panels.

A matmul's constant weight [K, N] (a conv's HWIO weight [KH, KW, I, O] alike) is stored
row-major: the kernel's tile of output columns reads, for each k, one vector and then jumps a
whole row (N elements) ahead. Once those rows are more than a page apart, each vector is a
fresh page for the hardware prefetchers, which then do not stream the weight: inside a model,
where each layer's weight comes from the last-level cache or DRAM, the kernel waits on every
read. EfficientNet-Lite0's 1x1 convs of its last stages (weights of 0.9 MB) took 2-2.5x their
time with the weight in cache; its 1280 x 1000 classifier 0.66 ms against 0.12 (onnxruntime:
0.17 ms).

Packed as [N/P, K, P] ([O/P, KH, KW, I, P]), each panel of P columns is one contiguous run
that the kernel's tile reads from start to end (the classifier: 0.66 -> 0.20 ms inside the
model). P is the tile's width in the default schedule (float_default.py), so that no vector
straddles two panels: for a matmul of one row, the widest divisor of N up to WIDE_VECTOR;
otherwise `float_default.vector_tile` (the register width where it divides N). The packing is
done here, at compile time, in numpy; the kernel's output is the plain op's.

A decoder's matmuls, whose rows (tokens) are known only at run time, keep the plain layout
(not measured); so do grouped and depthwise convs (their default schedule reads HWIO weights
one channel vector per tap).
"""

from __future__ import annotations

import numpy as np


def panel_width(columns: int, rows: int = 1, lanes: int | None = None) -> int:
    """The panel for a weight of `columns` output columns: the default schedule's vector tile
    for `rows` rows (one: a matrix-vector product's wide tile) on a CPU of `lanes` floats."""
    from .float_default import VECTOR, WIDE_VECTOR, vector_tile
    from .tiles import largest_divisor

    if rows == 1:
        return largest_divisor(columns, WIDE_VECTOR)
    return vector_tile(columns, lanes or VECTOR)


def pack_weight(w_kn: np.ndarray, panel: int) -> np.ndarray:
    """[K, N] -> [N/panel, K, panel]."""
    k, n = w_kn.shape
    return np.ascontiguousarray(w_kn.reshape(k, n // panel, panel).transpose(1, 0, 2))


def pack_conv_weight(w_hwio: np.ndarray, panel: int) -> np.ndarray:
    """[KH, KW, I, O] -> [O/panel, KH, KW, I, panel]."""
    kh, kw, ci, co = w_hwio.shape
    return np.ascontiguousarray(
        w_hwio.reshape(kh, kw, ci, co // panel, panel).transpose(3, 0, 1, 2, 4))


def matmul_te(data, packed, out_dtype: str):
    """[..., K] x [N/P, K, P] -> [..., N]."""
    from tvm import te

    panels, k_extent, panel = packed.shape
    k = te.reduce_axis((0, k_extent), "k")
    return te.compute(
        (*data.shape[:-1], panels * panel),
        lambda *idx: te.sum(
            data[(*idx[:-1], k)].astype(out_dtype)
            * packed[idx[-1] // panel, k, idx[-1] % panel].astype(out_dtype),
            axis=[k]),
        name="matmul")


def conv2d_te(data, packed, strides, padding, dilation, out_dtype: str):
    """NHWC data x [O/P, KH, KW, I, P] -> NHWC, as topi's conv2d_nhwc computes it (padding
    (top, left, bottom, right), the window's rows, columns and channels summed in that
    order)."""
    from tvm import te, topi

    n, height, width, _ = [int(d) for d in data.shape]
    panels, kh, kw, channels, panel = [int(d) for d in packed.shape]
    (sh, sw), (dh, dw) = strides, dilation
    top, left, bottom, right = padding
    if top or left or bottom or right:
        data = topi.nn.pad(data, [0, top, left, 0], [0, bottom, right, 0], name="pad_temp")
    out_h = (height + top + bottom - (kh - 1) * dh - 1) // sh + 1
    out_w = (width + left + right - (kw - 1) * dw - 1) // sw + 1
    ry = te.reduce_axis((0, kh), "ry")
    rx = te.reduce_axis((0, kw), "rx")
    rc = te.reduce_axis((0, channels), "rc")
    return te.compute(
        (n, out_h, out_w, panels * panel),
        lambda b, y, x, o: te.sum(
            data[b, y * sh + ry * dh, x * sw + rx * dw, rc].astype(out_dtype)
            * packed[o // panel, ry, rx, rc, o % panel].astype(out_dtype),
            axis=[ry, rx, rc]),
        name="conv2d_nhwc")


def _float_op(call) -> str | None:
    """The float dtype of a call whose data and constant weight are of it (and its output),
    else None."""
    import tvm

    weight = call.args[1]
    data_dtype, weight_dtype = str(call.args[0].ty.dtype), str(weight.ty.dtype)
    out_dtype = str(call.attrs.out_dtype or "") or data_dtype
    out_dtype = data_dtype if out_dtype == "void" else out_dtype
    if not isinstance(weight, tvm.ir.expr.GenericConst) or "float" not in weight_dtype or \
            data_dtype != weight_dtype or out_dtype != data_dtype:
        return None
    return data_dtype


def legalize_matmul(bb, call, otherwise, lanes: int | None = None):
    """The float matmul `call` on a packed constant weight; `otherwise(bb, call)` for any
    other matmul (integer, rows known only at run time, a non-constant or batched weight)."""
    from tvm import relax

    from .packed_int8 import matmul_rows

    dtype = _float_op(call)
    rows = matmul_rows(call)
    if dtype is None or len(call.args[1].ty.shape) != 2 or rows is None:
        return otherwise(bb, call)
    columns = int(call.args[1].ty.shape[1])
    panel = panel_width(columns, rows, lanes)
    if panel == columns:  # one panel: the plain layout already (and no copy of the weight)
        return otherwise(bb, call)
    packed = pack_weight(call.args[1].value.numpy(), panel)
    return bb.call_te(matmul_te, call.args[0], relax.const(packed, dtype), dtype,
                      primfunc_name_hint="matmul")


def legalize_conv2d(bb, call, otherwise, lanes: int | None = None):
    """The float NHWC conv2d `call` (one group, constant HWIO weight) on a packed weight;
    `otherwise(bb, call)` for any other conv2d."""
    from tvm import relax

    attrs = call.attrs
    dtype = _float_op(call)
    if dtype is None or int(attrs.groups) != 1 or attrs.data_layout != "NHWC" or \
            attrs.kernel_layout != "HWIO" or attrs.out_layout != "NHWC" or \
            any(getattr(d, "value", None) is None for d in call.args[0].ty.shape):
        return otherwise(bb, call)
    n, out_h, out_w, columns = [int(d) for d in call.ty.shape]  # the conv's NHWC output
    panel = panel_width(columns, n * out_h * out_w, lanes)
    if panel == columns:
        return otherwise(bb, call)
    packed = pack_conv_weight(call.args[1].value.numpy(), panel)
    return bb.call_te(conv2d_te, call.args[0], relax.const(packed, dtype),
                      *([int(v) for v in values] for values in
                        (attrs.strides, attrs.padding, attrs.dilation)),
                      dtype, primfunc_name_hint="conv2d")
