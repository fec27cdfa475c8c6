"""The weights of the convolutions the packed int8 kernels do not take (float convs, and
grouped or depthwise convs of any type) stored HWIO: output channels last, contiguous along the
axis the NHWC conv's default schedule vectorizes.

ConvertLayout gives every conv2d of the NHWC graph OHWI weights, the layout the packed int8
kernels start from (packed_int8.py). Any other conv then reads its weights with a stride of
`I` elements along the vector axis: the default schedule either copies them into HWIO on every
call (small weights) or gathers (large ones). This rewrite transposes such a conv's constant
weights once, at compile time. EfficientNet-Lite0 in float here: its 1x1 convs 100 -> 180
GOPS, the whole model 9.0 -> 7.3 ms.
"""

from __future__ import annotations

# OHWI -> HWIO
_PERMUTATION = (1, 2, 3, 0)


def rewrite(mod):
    """`mod` with each NHWC conv2d on constant OHWI weights that is float or grouped given them
    as HWIO (fold constants after it)."""
    import tvm
    from tvm import relax

    from .. import rewrite_relax_functions

    @relax.expr_functor.mutator
    class Rewrite(relax.PyExprMutator):
        def visit_call_(self, call):
            call = super().visit_call_(call)
            if getattr(call.op, "name", "") != "relax.nn.conv2d":
                return call
            attrs, weight = call.attrs, call.args[1]
            if str(attrs.data_layout) != "NHWC" or str(attrs.kernel_layout) != "OHWI" or \
                    not isinstance(weight, tvm.ir.expr.GenericConst) or \
                    ("float" not in str(weight.ty.dtype) and int(attrs.groups) == 1):
                return call  # an int8 conv with groups 1: the packed kernels' OHWI
            return relax.op.nn.conv2d(
                call.args[0], relax.op.permute_dims(weight, _PERMUTATION),
                strides=attrs.strides, padding=attrs.padding, dilation=attrs.dilation,
                groups=attrs.groups, data_layout="NHWC", kernel_layout="HWIO",
                out_layout=attrs.out_layout, out_dtype=attrs.out_dtype)

    return rewrite_relax_functions(mod, Rewrite(mod))


__all__ = ["rewrite"]
