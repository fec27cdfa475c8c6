"""Structured pruning after training: hidden channels removed to meet a MACs budget, each
consumer refitted to make up for them, on the calibration data.

    groups   channels.find_groups: the hidden channels that can be removed, and why others not
    stats    the fp32 model run on the calibration samples: each consumer's input moments
    order    select.removal_order: OBS, one channel at a time, per group
    choose   select.allocate: the budget spread over the groups, least error per MAC first
    apply    every tensor sliced, each consumer's weights and bias updated, in one new model

The result is an ONNX model with smaller dense layers: the int8 kernels and the tuner see
ordinary shapes. Nothing is stored as zeros.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from ..errors import InputError
from ..quantize.onnx_view import conv_shape, weighted_layers
from ..quantize.rounding import conv_patches
from .channels import HiddenGroup, _attrs, find_groups
from .select import WIDTH, allocate, limit_for, removal_order

log = logging.getLogger(__name__)

REPORT_FILE = "pruning.json"
# calibration rows (pixels or tokens times samples) a group's consumer needs per channel: with
# fewer, the refit follows the samples (EfficientNet-Lite0's 7x7 stages see 32 x 49 rows for
# 1152 channels; pruned anyway, 3% fewer MACs cost 25 points of held-out top-1, against 10;
# MiniLM's FFNs see 64 x 64 tokens for 1536 neurons, and prune well)
ROWS_PER_CHANNEL = 2


@dataclass
class PruneResult:
    onnx: object
    macs_before: int
    macs_after: int
    groups: list = field(default_factory=list)    # per group: what was removed
    refused: dict = field(default_factory=dict)   # {layer: why its channels stay}
    seconds: float = 0.0

    def to_json(self) -> dict:
        return {"macs_before": self.macs_before, "macs_after": self.macs_after,
                "macs_fraction": round(self.macs_after / max(self.macs_before, 1), 4),
                "seconds": round(self.seconds, 1), "groups": self.groups,
                "kept_whole": [{"layer": k, "why": v} for k, v in self.refused.items()]}

    def save(self, directory: Path) -> Path:
        path = Path(directory) / REPORT_FILE
        path.write_text(json.dumps(self.to_json(), indent=1) + "\n")
        return path


def prune_structured(model, calibration: Sequence[Mapping[str, np.ndarray]],
                     macs_budget: float) -> PruneResult:
    """`model` (an ONNX model with static shapes) with hidden channels removed until its
    layers' MACs are at most `macs_budget` (a fraction) of what they were, or as close as the
    groups allow."""
    check_budget(macs_budget)
    start = time.perf_counter()
    groups, refused = find_groups(model)
    total = sum(layer.macs for layer in weighted_layers(model))
    log.info("pruning: %d group(s) of hidden channels can be removed; %d layer(s) keep their "
             "outputs whole", len(groups), len(refused))
    if not groups:
        return PruneResult(model, total, total, [], refused, time.perf_counter() - start)
    inits = {i.name: i for i in model.graph.initializer}
    nodes = list(model.graph.node)
    moments = _consumer_moments(model, nodes, inits, groups, calibration)
    removals, rows = {}, {}
    for index, group in enumerate(groups, start=1):
        rows[group.name] = _consumer_rows(nodes[group.consumer], inits, group.channels)
        seen = int(moments[group.name][-1, -1])  # the constant input's count: the rows
        limit = limit_for(group.channels)
        if seen < ROWS_PER_CHANNEL * group.channels:
            limit = 0
            refused[group.name] = (f"its consumer saw {seen} calibration rows for "
                                   f"{group.channels} channels (fewer than "
                                   f"{ROWS_PER_CHANNEL} a channel): the refit would follow the "
                                   "samples; pass more calibration samples")
        removals[group.name] = removal_order(rows[group.name], moments[group.name], limit)
        log.info("pruning %d/%d: %s (%d channels) ordered (%.0f s)", index, len(groups),
                 group.name, group.channels, time.perf_counter() - start)
    macs = {g.name: g.macs_per_channel for g in groups}
    chosen = allocate(removals, macs, (1.0 - macs_budget) * total)
    pruned = _apply(model, nodes, inits, groups, removals, chosen)
    # counted again on the pruned model: a layer that loses both inputs and outputs (one
    # group's consumer, the next one's producer) saves less than the two counts add up to
    saved = total - sum(layer.macs for layer in weighted_layers(pruned))
    report = [{"layer": g.name, "consumer": g.consumer_name, "channels": g.channels,
               "kept": g.channels - chosen[g.name],
               "error": float(removals[g.name].error[chosen[g.name]])} for g in groups]
    result = PruneResult(pruned, total, total - saved, report, refused,
                         time.perf_counter() - start)
    log.info("pruning: %d of %d hidden channels removed, MACs %.1f%% of the model's (budget "
             "%.1f%%)", sum(chosen.values()), sum(g.channels for g in groups),
             100.0 * result.macs_after / max(total, 1), 100.0 * macs_budget)
    if result.macs_after > macs_budget * total:
        log.warning("pruning: the budget of %.0f%% of the MACs is not reached (%.0f%%): at "
                    "most 3/4 of a group's channels go, and %d layer(s) keep their outputs "
                    "(%s says why)", 100 * macs_budget, 100 * result.macs_after / max(total, 1),
                    len(refused), REPORT_FILE)
    return result


def check_budget(macs_budget: float) -> None:
    if not 0.0 < macs_budget <= 1.0:
        raise InputError(f"--macs-budget is the fraction of the layers' multiply-adds to keep, "
                         f"in (0, 1], not {macs_budget}.")


def _consumer_moments(model, nodes, inits, groups: list[HiddenGroup], calibration):
    """{group: H over its consumer's input rows, extended by a constant 1}."""
    from ..quantize.simulate import ort_session
    import onnx

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    known = {o.name for o in probe.graph.output}
    names = list(dict.fromkeys(g.consumer_input for g in groups))
    for name in names:
        if name not in known:
            probe.graph.output.append(onnx.ValueInfoProto(name=name))
    session = ort_session(probe)
    result = {g.name: None for g in groups}
    for feed in calibration:
        values = dict(zip(names, session.run(names, dict(feed))))
        for g in groups:
            consumer = nodes[g.consumer]
            x = values[g.consumer_input].astype(np.float32)
            if consumer.op_type == "Conv":
                cols = conv_patches(x, conv_shape(consumer, tuple(inits[consumer.input[1]]
                                                                   .dims)))[0]
            else:
                cols = x.reshape(-1, x.shape[-1]).T
            cols = np.concatenate([cols, np.ones((1, cols.shape[1]), cols.dtype)])
            h = (cols @ cols.T).astype(np.float64)
            result[g.name] = h if result[g.name] is None else result[g.name] + h
    return result


def _consumer_rows(node, inits, channels: int) -> np.ndarray:
    """The consumer's weight as rows [outputs, C + 1], its bias last."""
    from onnx import numpy_helper

    w = numpy_helper.to_array(inits[node.input[1]]).astype(np.float64)
    if node.op_type == "Conv":
        rows = w.reshape(w.shape[0], channels)
    elif node.op_type == "Gemm" and _attrs(node).get("transB", 0):
        rows = w
    else:
        rows = w.T
    bias = np.zeros(rows.shape[0])
    if len(node.input) > 2 and node.input[2] in inits:
        bias = np.broadcast_to(numpy_helper.to_array(inits[node.input[2]]).reshape(-1),
                               (rows.shape[0],)).astype(np.float64)
    return np.concatenate([rows, bias[:, None]], axis=1)


def _apply(model, nodes, inits, groups, removals, chosen):
    """The model with each group's chosen channels removed: its consumer's weights and bias
    updated first (on the whole tensors), then every tensor sliced."""
    import onnx
    from onnx import helper, numpy_helper

    arrays = {name: numpy_helper.to_array(init) for name, init in inits.items()}
    new_nodes = [_copy(node) for node in nodes]
    extra_nodes, extra_inits = {}, []
    for g in groups:
        n = chosen[g.name]
        if not n:
            continue
        consumer = new_nodes[g.consumer]
        w = removals[g.name].weights[n // WIDTH]
        rows, bias = w[:, :g.channels], w[:, g.channels].astype(np.float32)
        old = arrays[consumer.input[1]]
        if consumer.op_type == "Conv":
            arrays[consumer.input[1]] = rows.reshape(old.shape).astype(np.float32)
        elif consumer.op_type == "Gemm" and _attrs(consumer).get("transB", 0):
            arrays[consumer.input[1]] = rows.astype(np.float32)
        else:
            arrays[consumer.input[1]] = rows.T.astype(np.float32)
        if len(consumer.input) > 2 and consumer.input[2] in arrays:
            arrays[consumer.input[2]] = bias.reshape(arrays[consumer.input[2]].shape)
        elif consumer.op_type in ("Conv", "Gemm"):
            name = f"{consumer.input[1]}__pruned_bias"
            arrays[name] = bias
            extra_inits.append(name)
            while len(consumer.input) < 2:
                consumer.input.append("")
            consumer.input.append(name)
        else:  # MatMul: the bias after it
            name = f"{consumer.input[1]}__pruned_bias"
            arrays[name] = bias
            extra_inits.append(name)
            out = consumer.output[0]
            consumer.output[0] = f"{out}__before_bias"
            extra_nodes[g.consumer] = helper.make_node("Add", [consumer.output[0], name], [out],
                                                       name=f"{consumer.name}__bias")
    for g in groups:
        n = chosen[g.name]
        if not n:
            continue
        keep = np.setdiff1d(np.arange(g.channels), removals[g.name].order[:n])
        for name, axis in g.slices:
            arrays[name] = np.take(arrays[name], keep, axis=axis)
        consumer = new_nodes[g.consumer]
        in_axis = 1 if consumer.op_type == "Conv" or (consumer.op_type == "Gemm" and
                                                       _attrs(consumer).get("transB", 0)) else 0
        arrays[consumer.input[1]] = np.take(arrays[consumer.input[1]], keep, axis=in_axis)
        for index in g.depthwise:
            for a in new_nodes[index].attribute:
                if a.name == "group":
                    a.i = len(keep)
    pruned = onnx.ModelProto()
    pruned.CopyFrom(model)
    del pruned.graph.node[:]
    for i, node in enumerate(new_nodes):
        pruned.graph.node.append(node)
        if i in extra_nodes:
            pruned.graph.node.append(extra_nodes[i])
    names = [i.name for i in model.graph.initializer] + extra_inits
    del pruned.graph.initializer[:]
    pruned.graph.initializer.extend(numpy_helper.from_array(np.ascontiguousarray(arrays[n]), n)
                                    for n in names)
    del pruned.graph.value_info[:]  # the shapes in between changed
    return pruned


def _copy(node):
    import onnx

    copy = onnx.NodeProto()
    copy.CopyFrom(node)
    return copy


__all__ = ["PruneResult", "REPORT_FILE", "check_budget", "prune_structured"]
