"""Float matmuls on constant weights packed into column panels.

A matmul's constant weight [K, N] is stored row-major: the kernel's tile of output columns
reads, for each k, a few dozen bytes and then jumps a whole row (N elements) ahead. A
matrix-vector product (a classifier's last layer, a decoder's one new token) has nothing to
reuse those bytes for, and its time is how fast those scattered reads come from memory: the
1280 x 1000 classifier of EfficientNet-Lite0 took 0.12 ms with its 5 MB weight in cache and
0.66 ms inside the model, where it comes from DRAM (onnxruntime: 0.17 ms).

Packed as [N/P, K, P], each panel of P columns is one contiguous run that the kernel's tile
reads from start to end, which the hardware prefetchers stream (the classifier: 0.66 -> 0.20 ms
inside the model). P is the tile's width in the default schedule (float_default.py): the
widest divisor of N up to WIDE_VECTOR, so that no vector straddles two panels. The packing is
done here, at compile time, in numpy; the kernel's output is the plain matmul's.

Only matmuls of one row are packed. With more rows, each weight vector loaded is reused by a
tile of rows, and panels measured slower: paraphrase-MiniLM-L3-v2 in fp32 (64 tokens) 5.05 ->
5.47 ms. A decoder's matmuls, whose rows (tokens) are known only at run time, keep the plain
layout too (not measured).
"""

from __future__ import annotations

import numpy as np


def panel_width(columns: int) -> int:
    """The panel for a [K, columns] weight: the default schedule's tile of a one-row matmul."""
    from .float_default import WIDE_VECTOR
    from .tiles import largest_divisor

    return largest_divisor(columns, WIDE_VECTOR)


def pack_weight(w_kn: np.ndarray, panel: int) -> np.ndarray:
    """[K, N] -> [N/panel, K, panel]."""
    k, n = w_kn.shape
    return np.ascontiguousarray(w_kn.reshape(k, n // panel, panel).transpose(1, 0, 2))


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


def legalize_matmul(bb, call, otherwise):
    """The float matrix-vector product `call` on a packed constant weight; `otherwise(bb,
    call)` for any other matmul (integer, several rows, a non-constant or batched weight)."""
    import tvm
    from tvm import relax

    from .packed_int8 import matmul_rows

    weight = call.args[1]
    data_dtype, weight_dtype = str(call.args[0].ty.dtype), str(weight.ty.dtype)
    out_dtype = str(call.attrs.out_dtype or "") or data_dtype
    out_dtype = data_dtype if out_dtype == "void" else out_dtype
    if not isinstance(weight, tvm.ir.expr.GenericConst) or "float" not in weight_dtype or \
            data_dtype != weight_dtype or out_dtype != data_dtype or \
            len(weight.ty.shape) != 2 or matmul_rows(call) != 1:
        return otherwise(bb, call)
    columns = int(weight.ty.shape[1])
    panel = panel_width(columns)
    if panel == columns:  # one panel: the plain layout already (and no copy of the weight)
        return otherwise(bb, call)
    packed = pack_weight(weight.value.numpy(), panel)
    return bb.call_te(matmul_te, call.args[0], relax.const(packed, weight_dtype), out_dtype,
                      primfunc_name_hint="matmul")
