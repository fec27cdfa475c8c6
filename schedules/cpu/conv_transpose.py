"""Transposed convolutions whose windows do not overlap (kernel = stride, no padding: the
2x upsampling of segmentation and detection heads) rewritten as a 1x1 convolution followed by
a reshuffle of its output channels into pixels.

Such a layer sends each input pixel to its own `kh x kw` block of output pixels:
y[n, co, i*kh + a, j*kw + b] = sum_ci x[n, ci, i, j] * w[ci, co, a, b]. That is one matrix
product with `kh * kw * Cout` output channels, then a depth-to-space. TVM legalizes a
conv2d_transpose as a convolution over the input dilated with zeros (3 of every 4 multiplies
are by zero at stride 2), kept in NCHW, which no default schedule here vectorizes well:
PP-OCRv4's text detector spent 18 of its 26 ms of float kernels in its two transposed
convolutions (7.5 GOPS). As a 1x1 convolution the layer joins the NHWC graph and the
register-tiled conv schedule; the reshuffle is a copy that fuses with the elementwise steps
after it.

Other transposed convolutions (overlapping windows, padding, groups, dilation) keep TVM's
lowering.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def _ints(values) -> list[int]:
    return [int(v) for v in values]


def splits_into_blocks(attrs, weight_shape) -> bool:
    """Whether a conv2d_transpose (its attrs and IOHW weight shape) writes each input pixel to
    a block of its own: kernel = stride, no padding, no output padding, dilation 1, one
    group, NCHW data and IOHW weights."""
    kh, kw = weight_shape[2], weight_shape[3]
    return (str(attrs.data_layout) == "NCHW" and str(attrs.kernel_layout) == "IOHW"
            and int(attrs.groups) == 1 and _ints(attrs.strides) == [kh, kw]
            and not any(_ints(attrs.padding)) and not any(_ints(attrs.output_padding))
            and _ints(attrs.dilation) == [1, 1]
            and attrs.out_layout in (None, "", "NCHW"))


def rewrite(mod):
    """`mod` with each such conv2d_transpose on a constant float weight replaced by a 1x1
    conv2d and a depth-to-space (fold constants after it: the weight is reordered by ops)."""
    import tvm
    from tvm import relax

    from .. import rewrite_relax_functions

    @relax.expr_functor.mutator
    class Rewrite(relax.PyExprMutator):
        def visit_call_(self, call):
            call = super().visit_call_(call)
            if getattr(call.op, "name", "") != "relax.nn.conv2d_transpose":
                return call
            data, weight = call.args[0], call.args[1]
            if not isinstance(weight, tvm.ir.expr.GenericConst) or \
                    "float" not in str(weight.ty.dtype):
                return call
            weight_shape = _ints(weight.ty.shape)
            data_shape = getattr(data.ty, "shape", None)
            if not splits_into_blocks(call.attrs, weight_shape) or data_shape is None:
                return call
            cin, cout, kh, kw = weight_shape
            n, _, h, w = list(data_shape)
            # [Cin, Cout, kh, kw] -> [kh, kw, Cout, Cin] -> OIHW 1x1 with kh*kw*Cout outputs
            w1 = relax.op.reshape(relax.op.permute_dims(weight, [2, 3, 1, 0]),
                                  (kh * kw * cout, cin, 1, 1))
            y = relax.op.nn.conv2d(data, w1, data_layout="NCHW", kernel_layout="OIHW",
                                   out_dtype=call.attrs.out_dtype)
            y = relax.op.reshape(y, (n, kh, kw, cout, h, w))
            y = relax.op.permute_dims(y, [0, 3, 4, 1, 5, 2])  # n, co, i, a, j, b
            return relax.op.reshape(y, (n, cout, h * kh, w * kw))

    return rewrite_relax_functions(mod, Rewrite(mod))


__all__ = ["rewrite", "splits_into_blocks"]
