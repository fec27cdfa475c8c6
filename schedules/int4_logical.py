"""The 4-bit kernels in their logical form, the same on every target kind: what realize emits
for a layer with group-wise 4-bit weights. W4A8 (`logical_te`), before a target's lowering
packs it (cpu/packed_int4.py):

    y[m, n] = sum_g scale[g, n] * acc[m, g, n]
    acc[m, g, n] = sum_{k in g} x[m, k] * (c[n, k] - 8)      (exact, int32)

x: the (u)int8 input; c: codes in [0, 15], two per byte in [N, K/2] (code 2j in the low
nibble); scale: [K/group, N]. The input's zero point is not subtracted here: its share,
zx * sum_g scale[g, n] * sum_{k in g} (c[n, k] - 8), is a constant per output that the caller
folds into the bias, so the kernel reads nothing per group but the codes and the scales.

W4A16 (`float_te`): the float input times the weight widened from its codes inside the kernel,
scheduled like any float matmul (cpu/float_default.py).
"""

from __future__ import annotations

LOGICAL = "qcompile_int4_matmul"   # the logical kernel's accumulation block
FUNC_ATTR = "qcompile.int4_matmul"  # on its PrimFunc: its group size
FLOAT = "qcompile_int4_float_matmul"  # the W4A16 kernel's block (float_te)


def logical_te(data, codes, scales, group: int):
    """[..., K] (u)int8 x codes [N, K/2] (two 4-bit codes per byte) -> [..., N] float32, one
    scale per group of `group` reduction elements (scales: [K/group, N]; fp16 is widened)."""
    from tvm import te

    n_out, half = int(codes.shape[0]), int(codes.shape[1])
    groups = int(scales.shape[0])
    k = te.reduce_axis((0, group), "k")

    def code(n, j):
        byte = codes[n, j // 2]
        return ((byte >> ((j % 2) * 4).astype("uint8")) & 15).astype("int32") - 8

    rows = tuple(data.shape[:-1])
    acc = te.compute(
        (*rows, groups, n_out),
        lambda *idx: te.sum(
            data[(*idx[:-2], idx[-2] * group + k)].astype("int32") * code(idx[-1],
                                                                          idx[-2] * group + k),
            axis=[k]),
        name=LOGICAL)
    g = te.reduce_axis((0, groups), "g")
    if half * 2 != groups * group:
        raise ValueError(f"{half * 2} codes per row are not {groups} groups of {group}")
    return te.compute(
        (*rows, n_out),
        lambda *idx: te.sum(
            acc[(*idx[:-1], g, idx[-1])].astype("float32")
            * scales[g, idx[-1]].astype("float32"), axis=[g]),
        name=LOGICAL + "_groups")


def float_te(data, codes, scales, zeros, group: int, rows: int):
    """W4A16: the float input [..., K] times the weight its 4-bit codes stand for,
    w[k, n] = (c[k, n] - zero[k // group, n]) * scale[k // group, n], widened inside the
    kernel. codes: [K_padded/2, N] (codes 2j and 2j + 1 of a column in one byte, the low
    nibble first; contiguous along N, the vector axis); scales, zeros: [K_padded/group, N];
    zeros None: 8 (symmetric codes). The reduction covers the first `rows` (K) codes."""
    from tvm import te

    n_out = int(codes.shape[1])
    k = te.reduce_axis((0, rows), "k")

    def weight(j, n):
        byte = codes[j // 2, n]
        code = ((byte >> ((j % 2) * 4).astype("uint8")) & 15).astype("float32")
        zero = 8.0 if zeros is None else zeros[j // group, n].astype("float32")
        return (code - zero) * scales[j // group, n].astype("float32")

    lead = tuple(data.shape[:-1])
    return te.compute((*lead, n_out),
                      lambda *idx: te.sum(data[(*idx[:-1], k)] * weight(k, idx[-1]), axis=[k]),
                      name=FLOAT)


__all__ = ["FLOAT", "FUNC_ATTR", "LOGICAL", "float_te", "logical_te"]
