"""Which channels can be removed from an ONNX graph: hidden channels between two layers.

A *hidden group* is a layer's output channels (the producer: a conv with one group, a MatMul
or Gemm with a constant weight) that reach exactly one other layer (the consumer: a 1x1 conv,
MatMul or Gemm, which sums over them) only through ops that treat each channel on its own:
activations, a bias or scale per channel, a depthwise conv, pooling. An inverted bottleneck's
expanded channels (1x1 expand, ReLU6, depthwise, ReLU6, 1x1 project) and a transformer FFN's
neurons (MatMul, bias, GELU, MatMul) are such groups. Removing channel c then removes the
producer's output c, slice c of every per-channel constant and the consumer's input c; the
kernels stay dense, only smaller.

Channels that meet anything else (a residual add with another tensor, a reshape, a concat, a
model output, a second consumer) cannot be removed alone: their group is not formed, and
`find_groups` says why for each layer it passed over.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..frontend import layer_name
from ..quantize.onnx_view import value_shapes

UNARY = frozenset({"Relu", "Clip", "Sigmoid", "Tanh", "Erf", "HardSigmoid", "HardSwish",
                   "LeakyRelu", "Elu", "Selu", "Softplus", "Gelu", "Identity", "Neg", "Abs",
                   "Mish", "PRelu"})
BINARY = frozenset({"Add", "Sub", "Mul", "Div", "Max", "Min", "Pow"})
POOLS = frozenset({"GlobalAveragePool", "GlobalMaxPool", "AveragePool", "MaxPool"})
MAX_PASSED = 32  # ops between two layers; more: the channels go on through the model


@dataclass
class HiddenGroup:
    """One producer's output channels, the ops they pass, and the consumer that sums them."""

    producer: int                 # node index
    consumer: int                 # node index
    channels: int
    axis: int                     # the channel axis of the tensors in between (1: NCHW)
    slices: list = field(default_factory=list)  # (initializer name, axis to slice)
    depthwise: list = field(default_factory=list)  # node indices of depthwise convs
    consumer_input: str = ""      # the tensor the consumer reads
    name: str = ""                # the producer's layer name
    consumer_name: str = ""
    macs_per_channel: int = 0     # MACs that one channel costs (producer, between, consumer)


def _attrs(node) -> dict:
    import onnx

    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def find_groups(model) -> tuple[list[HiddenGroup], dict[str, str]]:
    """The hidden groups of `model` (simplified, static shapes), and {layer name: why its
    output channels cannot be removed} for the other layers."""
    inits = {i.name: i for i in model.graph.initializer}
    shapes = value_shapes(model)
    nodes = list(model.graph.node)
    # the outputs of Constant nodes: values too (scalars here; never sliced)
    constants = {name: tuple(i.dims) for name, i in inits.items()}
    for node in nodes:
        if node.op_type == "Constant":
            value = _attrs(node).get("value")
            constants[node.output[0]] = tuple(value.dims) if value is not None else (0,)
    readers: dict[str, list[int]] = {}
    for i, node in enumerate(nodes):
        for t in node.input:
            if t:
                readers.setdefault(t, []).append(i)
    outputs = {o.name for o in model.graph.output}
    groups, refused = [], {}
    for i, node in enumerate(nodes):
        channels = _producer(node, inits)
        if channels is None:
            continue
        name = layer_name(node, i)
        found = _walk(nodes, i, channels, inits, constants, shapes, readers, outputs)
        if isinstance(found, str):
            refused[name] = found
            continue
        found.name = name
        found.consumer_name = layer_name(nodes[found.consumer], found.consumer)
        found.macs_per_channel = _macs_per_channel(nodes, found, inits, shapes)
        groups.append(found)
    return groups, refused


def _producer(node, inits) -> int | None:
    """The output channel count of a layer whose outputs can be removed (None: not one)."""
    if len(node.input) < 2 or node.input[1] not in inits:
        return None
    dims = list(inits[node.input[1]].dims)
    attrs = _attrs(node)
    if node.op_type == "Conv" and attrs.get("group", 1) == 1 and len(dims) == 4:
        return dims[0]
    if node.op_type == "MatMul" and len(dims) == 2:
        return dims[1]
    if node.op_type == "Gemm" and not attrs.get("transA", 0) and \
            attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0:
        return dims[0] if attrs.get("transB", 0) else dims[1]
    return None


def _walk(nodes, start, channels, inits, constants, shapes, readers, outputs):
    """The HiddenGroup from producer `start`, or why there is none."""
    producer = nodes[start]
    axis = 1 if producer.op_type == "Conv" else len(shapes.get(producer.output[0], (0, 0))) - 1
    group = HiddenGroup(start, -1, channels, axis)
    weight = producer.input[1]
    if _readers_of(weight, readers) != 1:
        return "its weight is shared with another node"
    w_axis = 0 if producer.op_type == "Conv" or (producer.op_type == "Gemm" and
                                                 _attrs(producer).get("transB", 0)) else 1
    group.slices.append((weight, w_axis))
    if len(producer.input) > 2 and producer.input[2]:
        if not _sliceable(producer.input[2], inits, readers, channels, 0):
            return "its bias is not one value per channel"
        group.slices.append((producer.input[2], 0))
    # the tensors the channels reach (up to the layers that sum them, breadth first), then
    # each node on the way checked against all of them: GELU's x * (1 + erf(x)) reads two
    region, pending, passed, blocked = {producer.output[0]}, [producer.output[0]], [], None
    while pending:
        tensor = pending.pop(0)
        for index in readers.get(tensor, []):
            node = nodes[index]
            if _sums(node, tensor, inits, channels):
                if group.consumer not in (-1, index):
                    return "its channels reach more than one layer"
                group.consumer, group.consumer_input = index, tensor
                continue
            if not _passable(node, channels, inits):
                blocked = blocked or (f"its channels reach {node.op_type} node '{node.name}' "
                                      "(an op that mixes or moves channels)")
                continue
            if index not in passed:
                passed.append(index)
            if len(passed) > MAX_PASSED:
                return "its channels pass too many ops before a layer sums them"
            if node.output[0] not in region:
                region.add(node.output[0])
                pending.append(node.output[0])
    for index in passed:
        node = nodes[index]
        tensor = next(t for t in node.input if t in region)
        step = _through(node, tensor, region, inits, constants, shapes, readers, channels,
                        axis)
        if isinstance(step, str):
            return f"its channels reach {node.op_type} node '{node.name}' ({step})"
        slices, depthwise = step
        group.slices.extend(slices)
        if depthwise:
            group.depthwise.append(index)
    if blocked:
        return blocked
    if region & outputs:
        return "its output is a model output"
    if group.consumer == -1:
        return "its channels reach no layer that sums them"
    problem = _consumer_problem(nodes[group.consumer], inits, readers, channels)
    if problem:
        return f"its channels reach {nodes[group.consumer].op_type} node " \
            f"'{nodes[group.consumer].name}' ({problem})"
    return group


def _through(node, tensor, region, inits, constants, shapes, readers, channels, axis):
    """How `node` (reading region tensor `tensor`) passes the channels: (initializer slices,
    is it a depthwise conv), or why it does not."""
    op = node.op_type
    if op == "Conv":  # a depthwise conv (_passable)
        if node.input[0] != tensor:
            return "a weight computed from the channels"
        slices = [(node.input[1], 0)]
        if len(node.input) > 2 and node.input[2]:
            slices.append((node.input[2], 0))
        return (slices, True)
    if op in UNARY:
        slices = []
        for extra in node.input[1:]:
            if not extra:
                continue
            if extra not in constants:
                return "a bound that is not a constant"
            if int(np.prod(constants[extra])) != 1:
                if op != "PRelu" or not _sliceable(extra, inits, readers, channels,
                                                   _const_axis(inits[extra], shapes, tensor,
                                                               axis)):
                    return "a parameter that is not one value"
                slices.append((extra, _const_axis(inits[extra], shapes, tensor, axis)))
        return (slices, False)
    if op in BINARY:
        slices = []
        for other in node.input:
            if other in region or not other:
                continue
            if other not in constants:
                return "a tensor from outside the channels' path"
            if int(np.prod(constants[other])) != 1:
                const_axis = _const_axis(inits[other], shapes, tensor, axis)
                if not _sliceable(other, inits, readers, channels, const_axis):
                    return "a constant that is not one value per channel"
                slices.append((other, const_axis))
        return (slices, False)
    if op in POOLS and axis == 1:
        return ([], False)
    if op == "BatchNormalization" and axis == 1:
        if not all(_sliceable(t, inits, readers, channels, 0) for t in node.input[1:5]):
            return "parameters that are not constants per channel"
        return ([(t, 0) for t in node.input[1:5]], False)
    return "an op that mixes or moves channels"


def _consumer_problem(node, inits, readers, channels) -> str:
    """Why the layer that sums the channels cannot lose inputs ("": it can): a 1x1 conv with
    one group and no padding, a MatMul or a Gemm (not transA), with a weight of its own."""
    dims = list(inits[node.input[1]].dims)
    attrs = _attrs(node)
    if _readers_of(node.input[1], readers) != 1:
        return "a weight shared with another node"
    if node.op_type == "Conv":
        if attrs.get("group", 1) != 1 or dims[1] != channels or dims[2:] != [1, 1] or \
                any(attrs.get("pads", [])) or attrs.get("auto_pad", b"NOTSET") not in \
                (b"NOTSET", "NOTSET"):
            return "a conv other than 1x1 with one group and no padding"
        return ""
    if node.op_type == "MatMul":
        return "" if len(dims) == 2 and dims[0] == channels else "not a 2-D weight"
    if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or \
            dims[1 if attrs.get("transB", 0) else 0] != channels:
        return "a Gemm with transA, alpha or a weight that does not match"
    return ""


def _passable(node, channels, inits) -> bool:
    """Whether `node` is of a kind that may keep channels apart (checked in full later)."""
    op = node.op_type
    if op == "Conv":
        dims = list(inits[node.input[1]].dims) if node.input[1] in inits else []
        return _attrs(node).get("group", 1) == channels and dims[:2] == [channels, 1]
    return op in UNARY or op in BINARY or op in POOLS or op == "BatchNormalization"


def _sums(node, tensor, inits, channels) -> bool:
    """Whether `node` is a layer that sums over the channels of `tensor` (its data input)
    with a constant weight: not a depthwise conv, which keeps them apart."""
    if node.op_type not in ("Conv", "MatMul", "Gemm") or node.input[0] != tensor or \
            len(node.input) < 2 or node.input[1] not in inits:
        return False
    dims = list(inits[node.input[1]].dims)
    return not (node.op_type == "Conv" and _attrs(node).get("group", 1) == channels and
                dims[0] == channels and dims[1] == 1)


def _const_axis(init, shapes, tensor, axis) -> int | None:
    """The axis of constant `init` that broadcasts along the tensor's channel axis (None:
    the constant has no such axis)."""
    rank = len(shapes.get(tensor, ())) or (axis + 1)
    const_axis = axis - (rank - len(init.dims))
    return const_axis if const_axis >= 0 else None


def _sliceable(name, inits, readers, channels, axis) -> bool:
    if name not in inits or axis is None or _readers_of(name, readers) != 1:
        return False
    dims = list(inits[name].dims)
    return axis < len(dims) and dims[axis] == channels and \
        int(np.prod(dims)) == channels


def _readers_of(name, readers) -> int:
    return len(readers.get(name, []))


def _macs_per_channel(nodes, group, inits, shapes) -> int:
    """The multiply-adds that one hidden channel costs: its producer row, its depthwise
    filters, its consumer column."""
    producer = nodes[group.producer]
    weight = inits[producer.input[1]]
    per_output = int(np.prod(weight.dims)) // group.channels
    macs = _positions(shapes.get(producer.output[0]), group.axis) * per_output
    for index in group.depthwise:
        node = nodes[index]
        macs += _positions(shapes.get(node.output[0]), 1) * \
            int(np.prod(inits[node.input[1]].dims)) // group.channels
    consumer = nodes[group.consumer]
    cw = inits[consumer.input[1]]
    per_input = int(np.prod(cw.dims)) // group.channels
    macs += _positions(shapes.get(consumer.output[0]),
                       1 if consumer.op_type == "Conv" else None) * per_input
    return macs


def _positions(shape, axis) -> int:
    """Output positions per channel: all elements but the channel axis (the last for a
    matmul when `axis` is None)."""
    if not shape:
        return 1
    shape = list(shape)
    del shape[axis if axis is not None else len(shape) - 1]
    return int(np.prod(shape)) if shape else 1


__all__ = ["HiddenGroup", "find_groups"]
