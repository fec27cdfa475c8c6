"""The KV cache of a decoder, kept in place: `concat(past, new)` -> a write into a fixed buffer.

An exported decoder takes the keys and values of the tokens so far (`past_key_values.N.key`,
[batch, kv_heads, past, head_dim]) and returns them with the new tokens' appended
(`present.N.key`, made by Concat along the sequence axis). Run like that, every token copies
the whole cache twice (into the concat, and back as an output). Here each cache is one buffer
of the maximum context, [1, kv_heads, max_context, head_dim], that the caller allocates once
and passes to every call: the new tokens' keys are written into it at their positions by a
kernel that updates it in place, and attention reads the first `past + new` positions
through a slice (today a copy inside the call, per layer; only the new tokens' keys and values
are written across calls). The function's interface becomes

    fn(input_ids [1, new], cache_0_key, cache_0_value, ..., past [1] int64) -> logits

with the attention mask (all ones) and the positions (past .. past + new - 1) made inside.
The past length comes as a one-element tensor, not as a Shape, because TVM's RPC cannot send
a Shape; inside, it becomes the symbolic length the kernels' shapes use.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ModelError
from ..relax_main import substitute, without_main

WRITE_KERNEL = "kv_cache_write"


@dataclass(frozen=True)
class CacheLayout:
    """Where the cache is in the model: the past inputs in order, their present outputs."""

    past: tuple[str, ...]      # input names, e.g. past_key_values.0.key
    present: tuple[str, ...]   # the matching output names
    heads: int
    head_dim: int
    dtype: str


def write_kernel(heads: int, max_context: int, head_dim: int, dtype: str):
    """cache[0, h, past + i, d] = new[0, h, i, d] for the new tokens' positions that are inside
    the cache (the count of new tokens is the `values` buffer's, known at run time)."""
    from tvm.script import tirx as T

    @T.prim_func(private=True)
    def kernel(cache_handle: T.handle, values_handle: T.handle, past: T.int64):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8})
        new = T.int64()
        cache = T.match_buffer(cache_handle, (1, heads, max_context, head_dim), dtype)
        values = T.match_buffer(values_handle, (1, heads, new, head_dim), dtype)
        for h, i, d in T.grid(heads, new, head_dim):
            if past + i < T.int64(max_context):
                cache[0, h, past + i, d] = values[0, h, i, d]

    return kernel


def cache_in_place(mod, layout: CacheLayout, input_names: list[str], output_names: list[str],
                   max_context: int, new_tokens, past_var):
    """`mod` whose main keeps the KV cache in place (the module docstring). `input_names`:
    the model's inputs in the order of main's parameters, `output_names` its outputs in the
    order main returns them; `new_tokens` and `past_var`: the count of new tokens (an int, or
    the tir.Var in main's shapes) and the tir.Var of the past length."""
    from tvm import relax

    main = mod["main"]
    params = dict(zip(input_names, main.params))
    heads, dim, dtype = layout.heads, layout.head_dim, layout.dtype
    cache_type = relax.TensorType((1, heads, max_context, dim), dtype)
    caches = {name: relax.Var(name.replace(".", "_"), cache_type) for name in layout.past}
    past = relax.Var("past", relax.TensorType([1], "int64"))
    new_params = [params["input_ids"], *caches.values(), past]
    bb = relax.BlockBuilder(without_main(mod))
    kernel = bb.add_func(write_kernel(heads, max_context, dim, dtype), WRITE_KERNEL)
    total = past_var + new_tokens
    past_of = {params[name]: name for name in layout.past}
    body = main.body
    outputs = dict(zip(output_names, _results(body)))
    with bb.function("main", new_params, attrs={"num_input": len(new_params)}):
        # RPC hands arguments to the VM as DLTensor*, which tensor_to_shape does not take: it
        # reads a copy the VM made (one scalar add)
        copied = bb.emit(relax.op.add(past, relax.const(0, "int64")))
        bb.match_cast(bb.emit(relax.op.tensor_to_shape(copied)), relax.ShapeType([past_var]))
        with bb.dataflow():
            remap = {}
            if "attention_mask" in params:  # in the dtype the model takes it in
                mask = params["attention_mask"]
                remap[mask] = bb.emit(relax.op.ones(relax.ShapeExpr([1, total]),
                                                    str(mask.ty.dtype)))
            if "position_ids" in params:
                ids = params["position_ids"]
                positions = bb.emit(relax.op.arange(past_var, total, 1, str(ids.ty.dtype)))
                remap[ids] = bb.emit(relax.op.reshape(positions, [1, new_tokens]))
            for block in body.blocks:
                for binding in block.bindings:
                    value = substitute(binding.value, remap)
                    appended = _appended(value, past_of)
                    if appended is not None:
                        name, new = appended
                        written = bb.emit(relax.op.call_tir_inplace(
                            kernel, relax.Tuple([caches[name], new,
                                                 relax.prim_value(past_var)]),
                            [0], cache_type))
                        value = relax.op.strided_slice(written, [2], [0], [total], assume_inbound=True)
                    elif any(_uses(value, params[name]) for name in layout.past):
                        raise ModelError(_unexpected_use(binding))
                    remap[binding.var] = bb.emit(value)
            logits = bb.emit_output(substitute(outputs["logits"], remap))
        bb.emit_func_output(logits)
    return relax.transform.DeadCodeElimination()(bb.get())


def _results(body) -> list:
    """The expressions main returns, in order: the fields of the tuple it returns (written
    in place, or bound to the variable it returns)."""
    from tvm import relax

    result = body.body
    if isinstance(result, relax.Var):
        bound = {b.var: b.value for block in body.blocks for b in block.bindings}
        result = bound.get(result, result)
    return list(result.fields) if isinstance(result, relax.Tuple) else [result]


def _appended(value, past_of):
    """(past input name, new keys) when `value` is concat((past, new), axis=2)."""
    from tvm import relax

    if not isinstance(value, relax.Call) or getattr(value.op, "name", "") != "relax.concat":
        return None
    fields = value.args[0].fields if isinstance(value.args[0], relax.Tuple) else ()
    if len(fields) != 2 or fields[0] not in past_of or int(value.attrs.axis) != 2:
        return None
    return past_of[fields[0]], fields[1]


def _uses(expr, var) -> bool:
    from tvm import relax

    return var in relax.analysis.free_vars(expr) if isinstance(expr, relax.Expr) else False


def _unexpected_use(binding) -> str:
    return (f"The decoder uses a past key or value other than by appending the new tokens' to "
            f"it along the sequence axis (in {binding.var.name}), so its cache cannot be "
            "kept in place. qcompile reads the common export layout: present.N.key = "
            "Concat(past_key_values.N.key, new keys, axis=2). Compile it with static shapes "
            "instead (--input-shape for every input).")

