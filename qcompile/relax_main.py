"""Rebuilding a model's `main` Relax function (one dataflow block) with other bindings or
outputs, keeping the rest of the module (the TIR kernels main calls)."""

from __future__ import annotations

from typing import Any, Callable, Iterable


def module_copy(mod):
    """A new IRModule with the same functions, attributes and global infos as `mod`: what a
    pass that replaces some functions starts from, so that `mod` stays as it was."""
    import tvm

    return tvm.IRModule(dict(mod.functions.items()), attrs=mod.attrs,
                        global_infos=mod.global_infos)


def without_main(mod):
    """`mod` without its main function (the rest: TIR functions main calls)."""
    import tvm

    return tvm.IRModule({gv: f for gv, f in mod.functions.items() if gv.name_hint != "main"})


def function_attrs(function) -> dict | None:
    """A function's attributes as BlockBuilder.function takes them (no global_symbol)."""
    attrs = function.attrs
    if attrs is None:
        return None
    return {k: v for k, v in attrs.items() if k != "global_symbol"}


def rebuild_main(mod, bindings: Iterable[tuple[Any, Any]], result):
    """`mod` whose main binds (var, value) in order in one dataflow block and returns
    `result`: an expression of those vars, or one of the function's output vars."""
    from tvm import relax

    main = mod["main"]
    bb = relax.BlockBuilder(without_main(mod))
    with bb.function("main", list(main.params), attrs=function_attrs(main)):
        with bb.dataflow():
            for var, value in bindings:
                bb.emit_normalized(relax.VarBinding(var, bb.normalize(value)))
            if isinstance(result, relax.Var) and not isinstance(result, relax.DataflowVar):
                out = result  # already bound as an output of the block
            else:
                out = bb.emit_output(result)
        bb.emit_func_output(out)
    return bb.get()


def rewrite_main(mod, rewrite: Callable[[Any], Any]):
    """`mod` whose main (one dataflow block) binds each variable to `rewrite(value)`, or to
    its value where that is None; `mod` itself when no value changed, or when main is not
    one block."""
    from tvm import relax

    body = mod["main"].body
    if not isinstance(body, relax.SeqExpr) or len(body.blocks) != 1:
        return mod
    bindings = []
    changed = False
    for binding in body.blocks[0].bindings:
        value = rewrite(binding.value)
        changed = changed or value is not None
        bindings.append((binding.var, binding.value if value is None else value))
    return rebuild_main(mod, bindings, body.body) if changed else mod


def substitute(expr, remap: dict):
    """`expr` with the variables that are keys of `remap` replaced by its values (`remap` may
    grow between calls). The expression's arguments must be leaves (a normalized binding's
    value), since no block is open to bind nested calls in."""
    from tvm import relax

    if not remap:
        return expr

    @relax.expr_functor.mutator
    class Substitute(relax.PyExprMutator):
        def visit_var_(self, var):
            return remap.get(var, var)

        def visit_dataflow_var_(self, var):
            return remap.get(var, var)

    return Substitute().visit_expr(expr)
