"""Which tensors are integers: decided once, over a view that both graphs give.

Realize (on Relax) and the precision search's simulator (on ONNX) must agree on two things
that depend on the whole graph, not on one op:

- `integer_tensors`: a tensor is worth keeping in integers when it is not a model output and
  every reader takes integer input and uses it as such: an int8 layer (its data input), a
  quantize, or an integer op (add, concat, pooling, bounds, reshapes) whose own result is worth
  keeping in integers. An integer op whose result would only be dequantized runs in float, and
  the layers before it dequantize their int32 accumulators straight to float: in BERT, the
  FFN's output and the residual add feeding LayerNorm hold outliers that one int8 scale cannot
  (requantizing them cost paraphrase-MiniLM's embeddings a cosine of 0.91).
- `wide_tensors`: the inputs of int8 layers with 16-bit inputs and, backwards through integer
  ops, the tensors they are computed from: a residual stream stays 16-bit through its adds,
  so that only the layers' requantization rounds it.

Both work on a Flow: nodes with a kind (the vocabulary below, shared by both graphs), their
non-constant tensor inputs and their output. `graph.relax_flow` and `simulate.onnx_flow` make
one from each graph.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Hashable, Iterable, Mapping

# The kinds of node quantization reasons about (graph.py maps Relax ops, simulate.py ONNX ops).
LAYER_KINDS = frozenset({"conv2d", "matmul"})  # weighted: int8 x int8 -> int32 kernels
RESCALED_KINDS = frozenset({"add", "mean", "avg_pool2d", "concat"})  # requantize their result
BOUND_KINDS = frozenset({"relu", "clip", "max", "min"})  # integer bounds, parameters kept
SAME_PARAMS_KINDS = frozenset({"reshape", "permute_dims", "flatten", "squeeze",
                               "expand_dims", "max_pool2d"})  # integers moved, not changed
# ops that take integer input (and, all but layers and quantize, give integer output)
INTEGER_INPUT_KINDS = LAYER_KINDS | RESCALED_KINDS | BOUND_KINDS | SAME_PARAMS_KINDS | \
    frozenset({"quantize"})
# ops that carry a 16-bit tensor through: their inputs are 16-bit when their output is
WIDE_THROUGH_KINDS = RESCALED_KINDS | BOUND_KINDS | SAME_PARAMS_KINDS


@dataclass(frozen=True)
class FlowNode:
    kind: str
    inputs: tuple             # tensor keys of its non-constant inputs, in order
    output: Hashable          # its output's key
    layer: str | None = None  # a weighted node's layer name (a constant weight): plans name it


@dataclass
class Flow:
    """A model's dataflow in kinds: nodes in order, who reads each tensor, the outputs."""

    nodes: tuple[FlowNode, ...]
    outputs: frozenset
    readers: dict = field(default_factory=dict)   # tensor -> [FlowNode]
    producer: dict = field(default_factory=dict)  # tensor -> FlowNode

    @classmethod
    def of(cls, nodes: Iterable[FlowNode], outputs: Iterable[Hashable]) -> "Flow":
        nodes = tuple(nodes)
        readers: dict = {}
        for node in nodes:
            for tensor in node.inputs:
                readers.setdefault(tensor, []).append(node)
        return cls(nodes, frozenset(outputs), readers, {n.output: n for n in nodes})


def integer_tensors(flow: Flow, int8_layers: Iterable[str]) -> frozenset:
    """The tensors worth keeping in integers, when `int8_layers` (layer names) are int8."""
    int8 = set(int8_layers)
    memo: dict = {}

    def used(tensor) -> bool:
        if tensor not in memo:
            memo[tensor] = False  # a cycle (none in a dataflow graph) reads as float
            readers = flow.readers.get(tensor, [])
            memo[tensor] = tensor not in flow.outputs and bool(readers) and \
                all(_uses(reader, tensor) for reader in readers)
        return memo[tensor]

    def _uses(reader: FlowNode, tensor) -> bool:
        if reader.kind in LAYER_KINDS:
            return reader.layer in int8 and reader.inputs[:1] == (tensor,)
        if reader.kind == "quantize":
            return True
        return reader.kind in INTEGER_INPUT_KINDS and used(reader.output)

    return frozenset(t for t in flow.readers if used(t))


def wide_tensors(flow: Flow, wide_layers: Mapping[str, object],
                 keep: Iterable[Hashable] | None = None) -> dict:
    """{tensor: how} for the inputs of the layers in `wide_layers` ({layer name: how}, e.g.
    the 16-bit dtype) and, backwards through integer ops, what they are computed from. `keep`:
    the tensors that can be wide at all (e.g. those observed); others stop the walk."""
    allowed = None if keep is None else set(keep)
    wide: dict = {}
    pending = [(node.inputs[0], wide_layers[node.layer]) for node in flow.nodes
               if node.layer in wide_layers and node.inputs]
    while pending:
        tensor, how = pending.pop()
        if tensor in wide or (allowed is not None and tensor not in allowed):
            continue
        wide[tensor] = how
        producer = flow.producer.get(tensor)
        if producer is not None and producer.kind in WIDE_THROUGH_KINDS:
            pending.extend((t, how) for t in producer.inputs)
    return wide


__all__ = ["BOUND_KINDS", "Flow", "FlowNode", "INTEGER_INPUT_KINDS", "LAYER_KINDS",
           "RESCALED_KINDS", "SAME_PARAMS_KINDS", "WIDE_THROUGH_KINDS", "integer_tensors",
           "wide_tensors"]
