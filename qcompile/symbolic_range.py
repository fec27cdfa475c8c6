"""ONNX Range with symbolic bounds, for TVM's importer.

TVM 0.27's importer turns a Range whose start or limit is a symbolic size (a decoder's causal
mask: Range(past, past + seq) from Shape nodes) into a tensor of a fresh, unknown length
(`range_len_N`), so that the mask's shape no longer matches the attention scores' and every
shape after it is lost. When the bounds are sizes (PrimExprs or integer constants) and the
step a constant, the length is an expression of them: R.arange keeps it. Everything else goes
to TVM's own converter. Used while importing with `symbolic_range()`.
"""

from __future__ import annotations

import contextlib


def _converter():
    import tvm
    from tvm import relax, tirx
    from tvm.relax.frontend.onnx import onnx_frontend as frontend

    class SymbolicRange(frontend.Range):
        @classmethod
        def _impl_v12(cls, bb, inputs, attr, params):
            bounds = [_scalar(_elements(bb, x)) for x in inputs[:3]]
            if any(b is None for b in bounds) or not isinstance(bounds[2], int) or \
                    bounds[2] == 0 or all(isinstance(b, int) for b in bounds[:2]):
                return super()._impl_v12(bb, inputs, attr, params)
            dtype = str(inputs[0].ty.dtype)
            if dtype not in ("int32", "int64"):
                return super()._impl_v12(bb, inputs, attr, params)
            start, limit, step = (tirx.const(b, "int64") if isinstance(b, int) else b
                                  for b in bounds)
            return relax.op.arange(start, limit, step, dtype)

    def _scalar(values):
        return values[0] if values is not None and len(values) == 1 else None

    def _elements(bb, expr, depth=0):
        """The integer elements of a small tensor computed from shapes (Shape, Gather, Sub,
        ...) as ints and PrimExprs, or None."""
        if depth > 16:
            return None
        if tvm.ir.is_prim_expr(expr):  # the importer's Gather on a shape gives the size
            dtype = str(getattr(expr, "dtype", None) or expr.ty)
            return [expr] if dtype.startswith("int") else None
        value = getattr(expr, "value", None)  # an R.prim_value
        if tvm.ir.is_prim_expr(value):
            return _elements(bb, value, depth + 1)
        if isinstance(expr, relax.Var):
            bound = bb.lookup_binding(expr)
            return None if bound is None else _elements(bb, bound, depth + 1)
        if isinstance(expr, tvm.ir.GenericConst):
            value = expr.value.numpy()
            if value.dtype.kind in "iu" and value.size <= 8:
                return [int(v) for v in value.ravel()]
            return None
        if not isinstance(expr, relax.Call) or not isinstance(expr.op, tvm.ir.Op):
            return None
        name = expr.op.name
        args = list(expr.args)
        if name == "relax.shape_to_tensor" and isinstance(args[0], relax.ShapeExpr):
            return list(args[0].values)
        if name == "relax.shape_of":
            shape = getattr(args[0].ty, "shape", None)
            return list(shape.values) if isinstance(shape, relax.ShapeExpr) else None
        if name in ("relax.reshape", "relax.squeeze", "relax.expand_dims", "relax.astype"):
            return _elements(bb, args[0], depth + 1)
        if name == "relax.take":
            data, index = _elements(bb, args[0], depth + 1), _elements(bb, args[1], depth + 1)
            if data is None or index is None or not all(isinstance(i, int) for i in index):
                return None
            return [data[i] for i in index]
        if name in ("relax.add", "relax.subtract", "relax.multiply"):
            left, right = _elements(bb, args[0], depth + 1), _elements(bb, args[1], depth + 1)
            if left is None or right is None or 1 not in (len(left), len(right)) and \
                    len(left) != len(right):
                return None
            size = max(len(left), len(right))
            left, right = left * (size // len(left)), right * (size // len(right))
            op = {"relax.add": lambda a, b: a + b, "relax.subtract": lambda a, b: a - b,
                  "relax.multiply": lambda a, b: a * b}[name]
            return [op(a, b) for a, b in zip(left, right)]
        if name in _COMPARE:  # Gather's index made non-negative: where(i < 0, i + n, i)
            left, right = _elements(bb, args[0], depth + 1), _elements(bb, args[1], depth + 1)
            if left is None or right is None or len(left) != len(right) or \
                    not all(isinstance(v, int) for v in left + right):
                return None
            return [int(_COMPARE[name](a, b)) for a, b in zip(left, right)]
        if name == "relax.where":
            condition = _elements(bb, args[0], depth + 1)
            if condition is None or not all(isinstance(c, int) for c in condition):
                return None
            chosen = {args[1] if c else args[2] for c in condition}  # the other may be unknown
            if len(chosen) != 1:
                return None
            values = _elements(bb, chosen.pop(), depth + 1)
            return values if values is None or len(values) == len(condition) else None
        if name == "relax.concat":
            fields = args[0].fields if isinstance(args[0], relax.Tuple) else None
            parts = [_elements(bb, f, depth + 1) for f in fields or ()]
            return None if not parts or any(p is None for p in parts) else sum(parts, [])
        return None

    return SymbolicRange


_COMPARE = {"relax.less": lambda a, b: a < b, "relax.less_equal": lambda a, b: a <= b,
            "relax.greater": lambda a, b: a > b, "relax.greater_equal": lambda a, b: a >= b,
            "relax.equal": lambda a, b: a == b}


@contextlib.contextmanager
def symbolic_range():
    """TVM's ONNX importer, with Range converted by SymbolicRange while inside."""
    from tvm.relax.frontend.onnx import onnx_frontend as frontend

    original = frontend._get_convert_map
    converter = _converter()

    def convert_map():
        table = original()
        table["Range"] = converter
        return table

    frontend._get_convert_map = convert_map
    try:
        yield
    finally:
        frontend._get_convert_map = original
