"""Transcendental functions the CPU's vector units compute: `exp`, `sigmoid`, `softmax`,
`silu`, `erf`, `tanh` and the two GELUs rewritten onto TVM's `fast_exp`, `fast_erf` and
`fast_tanh` (plain arithmetic: a range reduction and a polynomial, or a rational function),
before they are legalized.

LLVM has no vector `exp`, `erf` or `tanh` of its own: a float kernel with one calls the C
library per element and stays scalar around it. Measured on this machine's x86 (2 threads):
a SwiGLU over a [32, 1536] chunk 151 -> 25 us; erf over 98,304 values 867 -> 13 us, tanh
340 -> 13 us (a BERT's GELU epilogue was 40% of its float time). The errors stay at a few
float32 roundings: exp and sigmoid 1e-7 of the largest output; erf and tanh at most 5 units
in the last place, 3e-7 absolute (against float64). `fast_exp` clamps its input to
[-88.4, 88.4], where float32's exp is finite and normal. float16 tensors are computed in
float32, as TVM's own erf is.
"""

from __future__ import annotations

import math

def _in_float32(f):
    """f on a float32 tensor, or on a float16 one through float32."""
    from tvm import topi

    def run(x, *args):
        if x.dtype == "float32":
            return f(x, *args)
        return topi.cast(f(topi.cast(x, "float32"), *args), x.dtype)

    return run


def _sigmoid(x):
    from tvm import te, topi

    e = topi.fast_exp(topi.negative(x))
    one = te.const(1.0, x.dtype)
    return te.compute(x.shape, lambda *i: one / (one + e(*i)), name="fast_sigmoid")


def _silu(x):
    from tvm import topi

    return topi.multiply(x, _sigmoid(x))


def _gelu(x):
    from tvm import te, topi

    erf = topi.fast_erf(topi.multiply(x, te.const(0.5 ** 0.5, x.dtype)))
    half = te.const(0.5, x.dtype)
    return te.compute(x.shape, lambda *i: x(*i) * (half + erf(*i) * half), name="fast_gelu")


def _gelu_tanh(x):
    from tvm import te, topi

    c, a = te.const(math.sqrt(2.0 / math.pi), x.dtype), te.const(0.044715, x.dtype)
    inner = te.compute(x.shape, lambda *i: c * x(*i) * (1 + a * x(*i) * x(*i)), name="inner")
    t = topi.fast_tanh(inner)
    half, one = te.const(0.5, x.dtype), te.const(1.0, x.dtype)
    return te.compute(x.shape, lambda *i: half * x(*i) * (one + t(*i)), name="fast_gelu_tanh")


def _lowerings():
    from tvm import topi

    return {"relax.exp": (topi.fast_exp, "fast_exp"),
            "relax.sigmoid": (_sigmoid, "sigmoid"),
            "relax.nn.silu": (_silu, "silu"),
            "relax.erf": (topi.fast_erf, "erf"),
            "relax.tanh": (topi.fast_tanh, "tanh"),
            "relax.nn.gelu": (_gelu, "gelu"),
            "relax.nn.gelu_tanh": (_gelu_tanh, "gelu_tanh"),
            "relax.nn.softmax": (topi.nn.fast_softmax, "softmax")}


def rewrite(mod):
    """`mod` with every relax op that _lowerings names, on a float32 or float16 tensor,
    computed by TVM's fast functions."""
    from tvm import relax

    from .. import rewrite_relax_functions

    lowerings = _lowerings()

    @relax.expr_functor.mutator
    class Rewrite(relax.PyExprMutator):
        def visit_call_(self, call):
            call = super().visit_call_(call)
            name = getattr(call.op, "name", "")
            if name not in lowerings or \
                    str(getattr(call.ty, "dtype", "")) not in ("float32", "float16"):
                return call
            te_func, hint = lowerings[name]
            args = [int(call.attrs.axis)] if name == "relax.nn.softmax" else []
            return self.builder_.call_te(_in_float32(te_func), call.args[0], *args,
                                         primfunc_name_hint=hint)

    return rewrite_relax_functions(mod, Rewrite(mod))


__all__ = ["rewrite"]
