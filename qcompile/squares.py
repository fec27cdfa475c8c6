"""Squares as products: an imported `power(x, 2)` (RMSNorm's and LayerNorm's variance, ONNX
Pow with a constant exponent 2) becomes `multiply(x, x)`.

TVM lowers `power` to the C library's `powf` per element even when the exponent is a constant
2, and passes it as a tensor argument that LLVM cannot see into: on a language model's prompt it
took about a tenth of the time. A product is one vector instruction, and the correctly rounded
square.
"""

from __future__ import annotations


def squares_to_products(mod):
    """`mod` with each `power(x, c)` in main whose constant c is 2 (a scalar, or a tensor of
    one element of x's dtype) as `multiply(x, x)`."""
    import tvm
    from tvm import relax

    from .relax_main import rewrite_main

    power = tvm.ir.Op.get("relax.power")

    def product(value):
        if not (isinstance(value, relax.Call) and value.op.same_as(power) and
                isinstance(value.args[1], tvm.ir.expr.GenericConst)):
            return None
        base, exponent = value.args
        constant = exponent.value.numpy()
        if constant.size == 1 and float(constant.reshape(())) == 2.0 and \
                str(constant.dtype) == str(base.ty.dtype) and base.ty.ndim >= constant.ndim:
            return relax.op.multiply(base, base)
        return None

    return rewrite_main(mod, product)
