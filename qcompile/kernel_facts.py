"""What each kernel of a build computes, read from its TIR when it is built and kept in the
manifest (`kernels.functions`), since the compiled library no longer has the TIR:

    {kernel name: {"ops": 2 x MACs of its conv/matmul (None: it has none),
                   "precision": "int8" | "fp16" | "fp32" | ...,
                   "tuned": whether a tuning-log record scheduled it}}

MACs are counted on the fused kernel before scheduling, where each multiply-accumulate block
iterates over its whole domain: a block that reduces `acc += a * b` over two different buffers
does one MAC per point of its domain (a packed int8 conv computes its padded output channels
too, a packed depthwise conv the zero taps that fill its windows' groups of 4). The precision is that of the operands the conv/matmul multiplies, or for other kernels
that of the buffers they read: int8 if any is an 8-bit integer, else fp16, else fp32.
`qcompile profile` joins these facts to the times it measures.
"""

from __future__ import annotations

import logging
from typing import Iterable

from .errors import last_line

log = logging.getLogger(__name__)

_LABELS = {"int8": "int8", "uint8": "int8", "float16": "fp16", "bfloat16": "bf16",
           "float32": "fp32", "int16": "int16", "uint16": "int16"}
_ORDER = ("int8", "int16", "fp16", "bf16", "fp32")


def precision_of(dtypes: Iterable[str]) -> str:
    """The precision label of a kernel that reads (or multiplies) these dtypes."""
    labels = {_LABELS.get(str(d), str(d)) for d in dtypes}
    for label in _ORDER:
        if label in labels:
            return label
    return min(labels) if labels else "?"


def _unwrap(expr):
    import tvm

    while isinstance(expr, tvm.tirx.Cast):
        expr = expr.value
    return expr


def _mac_operands(stmt):
    """The two buffers `acc += a * b` multiplies, if `stmt` (a block) is such a reduction
    over two different buffers; else None."""
    import tvm

    if not any(iv.iter_type == tvm.tirx.IterVar.CommReduce for iv in stmt.iter_vars):
        return None
    store = stmt.body
    if not isinstance(store, tvm.tirx.BufferStore) or not isinstance(store.value, tvm.tirx.Add):
        return None
    load = tvm.ir.TensorLoad  # what TIR's BufferLoad makes in TVM 0.27
    for acc, product in ((store.value.a, store.value.b), (store.value.b, store.value.a)):
        acc, product = _unwrap(acc), _unwrap(product)
        if (isinstance(acc, load) and acc.source.same_as(store.buffer)
                and isinstance(product, tvm.tirx.Mul)):
            a, b = _unwrap(product.a), _unwrap(product.b)
            if isinstance(a, load) and isinstance(b, load) and not a.source.same_as(b.source):
                return a.source, b.source
    return None


def _ops_and_precision(func) -> tuple[int | None, str]:
    import tvm

    sch = tvm.s_tir.Schedule(tvm.IRModule({"main": func}))
    macs, multiplied, written, read = 0, [], set(), {}
    for block in sch.get_child_blocks(sch.get_sblock("root")):
        stmt = sch.get(block)
        written.update(region.source.name for region in stmt.writes)
        read.update((region.source.name, str(region.source.dtype)) for region in stmt.reads)
        operands = _mac_operands(stmt)
        if operands is None:
            continue
        points = 1
        for iv in stmt.iter_vars:
            points *= int(iv.dom.extent)
        macs += points
        multiplied += [str(buffer.dtype) for buffer in operands]
    if multiplied:
        return 2 * macs, precision_of(multiplied)
    return None, precision_of(dtype for name, dtype in read.items() if name not in written)


def _called(mod) -> set[str]:
    """The names of the functions that `mod`'s Relax functions refer to."""
    import tvm

    from .schedules import visit_relax_functions

    found: set[str] = set()

    def visit(expr):
        if isinstance(expr, tvm.ir.GlobalVar):
            found.add(expr.name_hint)

    visit_relax_functions(mod, visit)
    return found


def describe(fused, lowered) -> dict[str, dict]:
    """The facts of every kernel of `lowered` (what tvm.compile builds), counted on the same
    kernel in `fused` (lower.kernels' output, unscheduled)."""
    import tvm

    from .schedules import SCHEDULE_ATTR

    names = {gvar.name_hint for gvar in fused.get_global_vars()}
    called = _called(lowered)
    facts = {}
    for gvar, func in lowered.functions.items():
        if not isinstance(func, tvm.tirx.PrimFunc) or gvar.name_hint not in called:
            continue  # a kernel that only reshapes became a view of its input: never called
        name = gvar.name_hint
        attrs = func.attrs if func.attrs is not None else {}
        ops, precision = None, None
        if name in names:
            try:
                ops, precision = _ops_and_precision(fused[name])
            except Exception as exc:  # noqa: BLE001 - a fact is not worth the build
                log.debug("kernel %s: no facts (%s)", name, last_line(str(exc)))
        facts[name] = {"ops": ops, "precision": precision,
                       "tuned": "tirx.is_scheduled" in attrs and SCHEDULE_ATTR not in attrs}
    return facts
