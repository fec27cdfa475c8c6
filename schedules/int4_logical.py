"""The 4-bit kernels in their logical form, the same on every target kind: what realize emits
for a layer with group-wise 4-bit weights (and for 8-bit weights whose input is quantized in
groups at run time: the same kernel on int8 codes [N, K]). W4A8 (`logical_te`), before a
target's lowering packs it (cpu/packed_int4.py):

    y[m, n] = sum_g scale[g, n] * acc[m, g, n]
    acc[m, g, n] = sum_{k in g} x[m, k] * (c[n, k] - 8)      (exact, int32)

x: the (u)int8 input; c: codes in [0, 15], two per byte in [N, K/2] (code 2j in the low
nibble); scale: [K/group, N]. With a palette p (16 int8 values), c[n, k] - 8 is p[c[n, k]].
The input's zero point is not subtracted here: its share,
zx * sum_g scale[g, n] * sum_{k in g} (c[n, k] - 8), is a constant per output that the caller
folds into the bias, so the kernel reads nothing per group but the codes and the scales.

An input quantized per group at run time (`GroupTerms`) has its own scale per row and group,
and each group's term becomes

    sx[m, g] * (scale[g, n] * (acc[m, g, n] - 128 * offset[g, n]) + t[g, n] * s[m, g])

offset: an int16 per group and output whose 128 times the accumulator drops exactly (the
group's sum of weight values, codes less 8, for an int8 input carried as uint8 by adding
128); t, s: a weight's own zero
points (t = scale * (8 - zero)) times the group's sum of the input's codes. Each of the four
may be absent.

W4A16 (`float_te`): the float input times the weight widened from its codes inside the kernel,
scheduled like any float matmul (cpu/float_default.py).
"""

from __future__ import annotations

LOGICAL = "qcompile_int4_matmul"   # the logical kernel's accumulation block
FUNC_ATTR = "qcompile.int4_matmul"  # on its PrimFunc: its group size
FLOAT = "qcompile_int4_float_matmul"  # the W4A16 kernel's block (float_te)
TERMS_ATTR = "qcompile.int4_terms"  # on its PrimFunc: GroupTerms.present(), comma-separated
PALETTE_ATTR = "qcompile.int4_palette"  # on its PrimFunc: its last input is a palette


class GroupTerms:
    """The optional per-group terms of a W4A8 kernel (the module docstring), in the order the
    kernel takes them: row_scales [..., G] float32, offsets [G, N] int16, sum_weights [G, N]
    float32, row_sums [..., G] float32. The [G, N] ones are per output, the others per row."""

    NAMES = ("row_scales", "offsets", "sum_weights", "row_sums")
    PER_OUTPUT = ("offsets", "sum_weights")

    def __init__(self, **given):
        self.given = {name: given.get(name) for name in self.NAMES}

    def present(self) -> list[str]:
        return [name for name in self.NAMES if self.given[name] is not None]

    def args(self) -> list:
        return [self.given[name] for name in self.present()]

    @classmethod
    def of(cls, names, tensors) -> "GroupTerms":
        return cls(**dict(zip(names, tensors)))

    def term(self, acc, scale, rows, g, output):
        """One group's float term; output(t) reads a [G, N] tensor t at (g, n)."""
        t = self.given
        a = acc
        if t["offsets"] is not None:
            a = a - output(t["offsets"]).astype("int32") * 128
        value = a.astype("float32") * scale
        if t["sum_weights"] is not None:
            value = value + output(t["sum_weights"]) * t["row_sums"][(*rows, g)]
        if t["row_scales"] is not None:
            value = value * t["row_scales"][(*rows, g)]
        return value


def logical_te(data, codes, scales, group: int, *terms, names=(), palette=None):
    """[..., K] (u)int8 x codes [N, K/2] (two 4-bit codes per byte) -> [..., N] float32, one
    scale per group of `group` reduction elements (scales: [K/group, N]; fp16 is widened);
    `terms`: the GroupTerms named by `names`. Codes of type int8 [N, K] are 8-bit weights
    (their values), taken the same way. `palette` (int8 [16]): each 4-bit code's value is its
    entry (quantize/palettes.py), not the code less 8."""
    from tvm import te

    eight = str(codes.dtype) == "int8"
    n_out, half = int(codes.shape[0]), int(codes.shape[1]) // (2 if eight else 1)
    groups = int(scales.shape[0])
    k = te.reduce_axis((0, group), "k")

    def code(n, j):
        if eight:
            return codes[n, j].astype("int32")
        byte = codes[n, j // 2]
        nibble = (byte >> ((j % 2) * 4).astype("uint8")) & 15
        if palette is not None:
            return palette[nibble.astype("int32")].astype("int32")
        return nibble.astype("int32") - 8

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
    extra = GroupTerms.of(names, terms)
    return te.compute(
        (*rows, n_out),
        lambda *idx: te.sum(extra.term(acc[(*idx[:-1], g, idx[-1])],
                                       scales[g, idx[-1]].astype("float32"), idx[:-1], g,
                                       lambda t: t[g, idx[-1]]), axis=[g]),
        name=LOGICAL + "_groups")


def group_quantize_te(x, group: int, padded: int, dtype: str, with_sums: bool):
    """The input of a W4A8 kernel quantized at run time in groups, in one kernel: x [..., K]
    float32, zero-padded to `padded`, in groups of `group` along its last axis; per group the
    scale max |x| / 127 and int8 codes round(x / scale) (carried as uint8 plus 128 for
    dtype uint8). Returns [codes [..., padded], scales [..., groups]] and, `with_sums`, each
    group's sum of codes [..., groups] as float32."""
    import numpy as np
    from tvm import te, tirx

    k = int(x.shape[-1])
    lead = tuple(x.shape[:-1])
    groups = padded // group

    def value(idx, j):
        return tirx.if_then_else(j < k, x[(*idx, tirx.min(j, k - 1))], tirx.const(0, "float32"))

    r = te.reduce_axis((0, group), "r")
    amax = te.compute((*lead, groups), lambda *i: te.max(
        tirx.abs(value(i[:-1], i[-1] * group + r)), axis=[r]), name="qcompile_group_amax")
    tiny = tirx.const(float(np.finfo(np.float32).tiny), "float32")
    scales = te.compute((*lead, groups), lambda *i: tirx.max(
        amax[i] / tirx.const(127.0, "float32"), tiny), name="qcompile_group_scale")
    codes = te.compute((*lead, padded), lambda *i: tirx.max(tirx.min(tirx.round(
        value(i[:-1], i[-1]) / scales[(*i[:-1], i[-1] // group)]),
        tirx.const(127.0, "float32")), tirx.const(-127.0, "float32")),
        name="qcompile_group_codes")
    shift = 128.0 if dtype == "uint8" else 0.0
    data = te.compute((*lead, padded), lambda *i: (
        codes[i] + tirx.const(shift, "float32")).astype(dtype), name="qcompile_group_data")
    if not with_sums:
        return [data, scales]
    s = te.reduce_axis((0, group), "s")
    sums = te.compute((*lead, groups), lambda *i: te.sum(
        codes[(*i[:-1], i[-1] * group + s)], axis=[s]), name="qcompile_group_sums")
    return [data, scales, sums]


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


__all__ = ["FLOAT", "FUNC_ATTR", "GroupTerms", "LOGICAL", "PALETTE_ATTR", "TERMS_ATTR",
           "float_te", "group_quantize_te", "logical_te"]
