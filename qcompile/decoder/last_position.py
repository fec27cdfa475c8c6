"""The prompt function's logits at the chunk's last position only.

Generation reads the logits of a prompt's last token and nothing else, but an exported decoder
computes them at every position: on a 32-token chunk of SmolLM2-135M the output projection
(49152 x 576) was an eighth of the call. In the chunk's function (its token count fixed),
the hidden state is sliced to the last position right before that projection, so the
projection and what follows it (a bias, a scale, the reshapes around it) run on one row:

    logits = reshape(matmul(reshape(h, [T, H]), W), [1, T, V])
 -> logits = reshape(matmul(reshape(h[:, T-1:], [1, H]), W), [1, 1, V])

The walk back from `logits` passes reshapes, casts and elementwise steps with a constant
operand that holds no per-position values, and stops at a matmul whose weight is a constant.
A graph of another form (the projection not found, a step on the way used elsewhere) keeps
its logits at every position: correct, only slower.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)

PASSED = ("relax.reshape", "relax.astype", "relax.add", "relax.multiply", "relax.subtract",
          "relax.divide")


def last_position_logits(mod, tokens: int, logits_index: int):
    """`mod` whose main returns, as its output `logits_index`, the logits of the last of its
    `tokens` positions ([..., 1, V]); `mod` itself when the projection is not found."""
    import tvm
    from tvm import relax

    main = mod["main"]
    body = main.body
    if tokens <= 1 or not isinstance(body, relax.SeqExpr) or len(body.blocks) != 1:
        return mod
    bindings = list(body.blocks[0].bindings)
    bound = {b.var: b.value for b in bindings}
    results = body.body
    returned = [] if results in bound else [results]  # a returned tuple bound in main: counted
    results = bound.get(results, results)             # among the bindings' uses
    fields = list(results.fields) if isinstance(results, relax.Tuple) else [results]
    uses = _use_counts(bindings, returned)
    chain = []  # the bindings from the projection to the logits, last first
    var = fields[logits_index]
    while isinstance(var, relax.Var) and var in bound and uses.get(var, 0) == 1:
        value = bound[var]
        name = getattr(value.op, "name", "") if isinstance(value, relax.Call) else ""
        chain.append(var)
        if name == "relax.matmul" and isinstance(value.args[1], tvm.ir.expr.GenericConst):
            break
        if name not in PASSED or not _passes(value, tokens):
            return _unchanged(mod, f"{var.name} ({name or type(value).__name__})")
        var = value.args[0]
    else:
        return _unchanged(mod, "the logits' producers are shared or not bound in main")
    projection = bound[chain[-1]]
    hidden = projection.args[0]
    axis = _token_axis(hidden.ty.shape, tokens)
    if axis is None:
        return _unchanged(mod, "no single axis of the projection's input is the tokens'")
    replaced = {}  # var -> (builder, substitute) -> its new value, of the new shape

    def project(bb, substitute):
        sliced = bb.emit(relax.op.strided_slice(substitute(hidden), [axis], [tokens - 1],
                                                [tokens], assume_inbound=True))
        return relax.op.matmul(sliced, projection.args[1],
                               out_dtype=projection.attrs.out_dtype)

    replaced[chain[-1]] = project
    for var in reversed(chain[:-1]):
        value = bound[var]
        if value.op.name == "relax.reshape":
            shape = [int(d) for d in value.args[1].values]
            at = _token_axis(shape, tokens)
            if at is None:
                return _unchanged(mod, f"the reshape {var.name} merges the tokens' axis")
            shape[at] = 1
            replaced[var] = lambda bb, substitute, value=value, shape=shape: \
                relax.op.reshape(substitute(value.args[0]), shape)
    result = body.body
    if result in bound and isinstance(bound[result], relax.Tuple):  # returned as the tuple
        bindings = [b for b in bindings if not b.var.same_as(result)]  # itself, not a var
        result = bound[result]
    return _rebuild(mod, bindings, replaced, result)


def _passes(value, tokens: int) -> bool:
    """An elementwise step whose other operand is a constant without per-position values, or
    a reshape to a constant shape, or a cast."""
    import tvm

    name = value.op.name
    if name == "relax.astype":
        return True
    if name == "relax.reshape":
        return all(isinstance(getattr(d, "value", None), int)
                   for d in getattr(value.args[1], "values", [None]))
    other = value.args[1]
    return isinstance(other, tvm.ir.expr.GenericConst) and \
        all(int(d) == 1 for d in other.value.shape[:-1])


def _token_axis(shape, tokens: int) -> int | None:
    """The one axis before the last whose extent is `tokens` (None: none, or several)."""
    extents = [getattr(d, "value", d) for d in shape]
    found = [i for i, d in enumerate(extents[:-1]) if d == tokens]
    return found[0] if len(found) == 1 else None


def _use_counts(bindings, returned) -> dict:
    from tvm import relax

    counts: dict = {}
    for expr in [b.value for b in bindings] + list(returned):
        for var in relax.analysis.free_vars(expr) if not isinstance(expr, relax.Var) \
                else [expr]:
            counts[var] = counts.get(var, 0) + 1
    return counts


def _unchanged(mod, why: str):
    log.info("the prompt's function keeps its logits at every position: %s", why)
    return mod


def _rebuild(mod, bindings, replaced: dict, result):
    """`mod` whose main binds each var in `replaced` to what its builder makes (a new
    variable, of the new shape), and the bindings that use one to new variables too."""
    from tvm import relax

    from ..relax_main import function_attrs, substitute as substitute_vars, without_main

    main = mod["main"]
    remap = {}

    def substitute(expr):
        return substitute_vars(expr, remap)

    bb = relax.BlockBuilder(without_main(mod))
    with bb.function("main", list(main.params), attrs=function_attrs(main)):
        with bb.dataflow():
            for binding in bindings:
                var, value = binding.var, binding.value
                if var in replaced:
                    remap[var] = bb.emit(replaced[var](bb, substitute), var.name)
                elif any(v in remap for v in relax.analysis.free_vars(value)):
                    remap[var] = bb.emit(substitute(value), var.name)
                else:
                    bb.emit_normalized(relax.VarBinding(var, value))
            out = bb.emit_output(substitute(result))
        bb.emit_func_output(out)
    return bb.get()
