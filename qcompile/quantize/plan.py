"""The plan stage: what quantization decides before any sample runs.

`plan(model, config, target)` reads the imported model once and returns a frozen QuantPlan:
each conv/matmul layer's identity (its ONNX node name, matched by the weight's values), its
settings from the precision rules (then --float-layer, then the image stem), and the tensors
that calibration observes. `calibrate` and `realize` (static.py) take the plan; the precision
search and the weight-only and dynamic modes read the same plan.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any, Mapping

from ..errors import InputError
from ..frontend import FloatModel, weight_key
from .graph import Graph, constant_value, read_graph
from .calibrate import LayerInput
from .config import QuantConfig, activation_dtype_for
from .rounding import conv_shape
from .ops.linear import is_pointwise
from .rules import LayerSettings, PrecisionRules, Rule
from .schemes import CALIBRATED, FOUR_BITS, Fp32, Scheme, scheme_for

log = logging.getLogger(__name__)

LAYER_KINDS = ("conv2d", "matmul")
STEM_REASON = ("first conv on the image: little compute, most sensitive (--int8-stem to "
               "quantize)")


@dataclass(frozen=True)
class QuantPlan:
    """The decisions made before calibration, about one folded Relax module."""

    model: FloatModel
    config: Any                          # quantize.QuantConfig
    activations: str                     # the 8-bit activation dtype: uint8 | int8
    plane_dtype: str                     # the target's: the bytes of a 16-bit input
    mod: Any                             # the folded module everything below is about
    graph: Graph
    names: Mapping[str, str]             # {relax layer: ONNX node name}
    settings: Mapping[str, LayerSettings]  # {relax layer: its settings}
    stem: str | None = None              # the image stem conv's relax layer, if any

    @property
    def base(self) -> LayerSettings:
        return self.config.base_settings(self.activations)

    def schemes(self, mode: str = "static") -> dict[str, Scheme]:
        """{relax layer: scheme}. mode: the int8 layers' flavour (static, weight-only,
        dynamic); the stem, when the plan keeps it in fp32, says why."""
        groups = self.config.input_groups
        plan = {var: scheme_for(settings, mode, input_groups=groups)
                for var, settings in self.settings.items()}
        if self.stem is not None and isinstance(plan.get(self.stem), Fp32):
            plan[self.stem] = Fp32(STEM_REASON)
        return plan

    def with_int8_everywhere(self) -> "QuantPlan":
        """This plan with every layer in int8, its other settings kept: a table calibrated on
        it serves every plan of the same model and config (the precision search's rounds)."""
        return dataclasses.replace(self, settings={
            var: dataclasses.replace(s, precision="int8") for var, s in self.settings.items()})

    def onnx_settings(self) -> dict[str, LayerSettings]:
        """{ONNX layer name: settings}, a plan as the simulator takes it; a layer the plan
        keeps in float (the image stem) with its float precision."""
        settings = {}
        for var, scheme in self.schemes().items():
            if var in self.names:
                own = self.settings.get(var, self.base)
                if scheme.name in ("fp32", "fp16"):
                    own = dataclasses.replace(own, precision=scheme.name)
                settings[self.names[var]] = own
        return settings

    def weighted(self) -> dict[str, Any]:
        """{relax layer: its graph node}."""
        return {n.name: n for n in self.graph.nodes if n.kind in LAYER_KINDS}

    def tensors(self) -> dict[str, Any]:
        """{name: relax var} of every float tensor calibration observes (the model's float
        inputs, then each float binding), named as a CalibrationTable keys them."""
        params = [p for p in self.graph.function.params if str(p.ty.dtype) == "float32"]
        found: dict[str, Any] = {}
        for var in params + [n.var for n in self.graph.nodes if _is_float_tensor(n.var)]:
            name, i = var.name, 1
            while name in found:  # names are unique in practice; never merge two tensors
                name, i = f"{var.name}#{i}", i + 1
            found[name] = var
        return found

    def layer_inputs(self) -> dict[str, LayerInput]:
        """{relax layer: what calibration collects for it} for every int8 or int4 layer."""
        gptq = self.config.weight_rounding == "gptq"
        names = {var: name for name, var in self.tensors().items()}
        weighted = self.weighted()
        return {var: LayerInput(names.get(node.args[0], node.args[0]), node.kind,
                                conv_shape(node),
                                moments=gptq and constant_value(node.args[1]) is not None)
                for var, node in weighted.items()
                if self.settings.get(var, self.base).precision in CALIBRATED}

    def needs_histograms(self) -> bool:
        return any(s.method != "minmax" for s in [self.base, *self.settings.values()])


def plan(model: FloatModel, config=None, target=None, *, mode: str = "static") -> QuantPlan:
    """The quantization plan of `model` for `target` (config: a QuantConfig; None: the
    defaults). mode "static" keeps an image stem in fp32 unless a rule or the config says
    otherwise; the weight-only and dynamic modes quantize it like any layer."""
    from tvm import relax

    config = config or QuantConfig()
    config.check()
    activations = config.activations or activation_dtype_for(target)
    mod = relax.transform.FoldConstant()(model.mod)
    graph = read_graph(mod)
    names = layer_names(model, graph)
    unknown = set(config.float_layers) - set(names.values())
    if unknown:
        log.warning("no layer is named %s: check the names with `qcompile inspect MODEL`",
                    ", ".join(sorted(unknown)))
    stem = _stem(graph) if mode == "static" else None
    by_onnx, explicit = layer_plan(
        model, config if mode == "static" else dataclasses.replace(config, float_stem=False),
        activations, names.get(stem.name) if stem else None)
    base = config.base_settings(activations)
    settings = {var: by_onnx.get(onnx_name, base) for var, onnx_name in names.items()}
    settings = _given_four_bits(graph, settings, model.weight_codes)
    _check_int4(graph, names, settings, explicit)
    return QuantPlan(model, config, activations, activation_dtype_for(target), mod, graph,
                     names, settings, stem.name if stem is not None else None)


def given_four_bits(graph: Graph, codes) -> dict:
    """{matmul node: its nbits.GroupCodes} for each matmul whose weight arrived in 4 bits
    (MatMulNBits, blocked DequantizeLinear); codes: the model's qdq.WeightCodes or None."""
    found = {}
    if codes is None or not codes.groups:
        return found
    for node in graph.nodes:
        weight = constant_value(node.args[1]) if node.kind == "matmul" else None
        given = codes.find_groups(weight) if weight is not None and weight.ndim == 2 else None
        if given is not None:
            found[node.name] = given
    return found


def _given_four_bits(graph: Graph, settings, codes) -> dict:
    """A layer whose weight arrived in 4 bits keeps its codes where its settings quantize it:
    int4 with the model's group size, not int8 rounded again from the 4-bit values."""
    kept = dict(settings)
    for name, given in given_four_bits(graph, codes).items():
        if name in settings and settings[name].precision in ("int8", "int4"):
            kept[name] = dataclasses.replace(settings[name], precision="int4",
                                             group_size=given.group)
    return kept


def _check_int4(graph: Graph, names, settings, explicit) -> None:
    """4-bit weights are matmul kernels (W4A8 with calibrated or run-time int8 inputs, or W4A16
    in weight-only mode), for MatMul/Gemm and pointwise convolutions: a rule may not ask for
    them on another convolution (the whole-model option leaves those int8)."""
    int4 = {var: s.precision for var, s in settings.items() if s.precision in FOUR_BITS}
    stay = []
    for node in graph.nodes:
        if node.name not in int4 or node.kind != "conv2d" or is_pointwise(node):
            continue
        stay.append(names[node.name])
        if names[node.name] in explicit:
            raise InputError(f"A precision rule sets layer '{names[node.name]}' (a convolution "
                             f"other than 1x1) to {int4[node.name]}, but 4-bit weights have "
                             "kernels for MatMul, Gemm and 1x1 convolutions (one group, no "
                             "padding) only. "
                             "Make the rule match those layers or keep this one int8.")
    if stay:
        log.warning("%d convolution(s) keep int8 weights: 4-bit kernels take MatMul, Gemm and "
                    "1x1 convolutions (one group, no padding) only: %s", len(stay),
                    ", ".join(stay[:6]) + (f" and {len(stay) - 6} more" if len(stay) > 6
                                           else ""))


def layer_plan(model: FloatModel, config, activations: str,
               stem: str | None = None) -> tuple[dict[str, LayerSettings], set[str]]:
    """({layer (ONNX node) name: settings}, the layers whose precision a rule sets).
    --float-layer is a rule in front of the user's (the first rule that sets a setting wins,
    and the option must win over the file); the image stem stays fp32 where no rule and no
    [defaults] set its precision."""
    layers = [(layer.name, layer.op) for layer in model.layers]
    rules = config.rules or PrecisionRules()
    if config.float_layers:
        front = Rule.for_layers(sorted(config.float_layers), {"precision": "fp32"},
                                "--float-layer")
        rules = dataclasses.replace(rules, rules=(front, *rules.rules))
    by_name, warnings, explicit = rules.resolve(layers, config.base_settings(activations))
    for warning in warnings:
        log.warning("%s", warning)
    if stem is not None and stem in by_name and stem not in explicit and config.float_stem:
        by_name[stem] = dataclasses.replace(by_name[stem], precision="fp32")
    return by_name, explicit


def _is_float_tensor(var) -> bool:
    from tvm import relax

    ty = var.ty
    return isinstance(ty, relax.TensorType) and str(ty.dtype) == "float32" and \
        ty.shape is not None


def _stem(graph: Graph):
    """The first conv, when it reads a model input of at most 4 channels (an image): little
    compute (about 3% of EfficientNet-Lite0's MACs), but its batch-norm-folded weights are
    large and cancel each other, so int8 costs it most of its accuracy (24 dB SQNR)."""
    params = set(graph.function.params)
    for node in graph.nodes:
        if node.kind == "conv2d":
            x = node.args[0]
            if x in params and len(x.ty.shape) == 4 and int(x.ty.shape[1]) <= 4:
                return node
            return None
    return None


def layer_names(model: FloatModel, graph: Graph) -> dict[str, str]:
    """{relax var name: ONNX node name} of every conv/matmul of the Relax graph. A layer is
    found by its weight's values (frontend.weight_key: the importer may transpose a weight, and
    fuse or reorder ops), then the layers left (no constant weight, or a weight the importer
    changed) by their order; a Relax layer with no ONNX counterpart keeps its own name."""
    relax_layers = [n for n in graph.nodes if n.kind in LAYER_KINDS]
    unmatched = {}
    for layer in model.layers:
        if layer.weight and layer.op != "ConvTranspose":
            unmatched.setdefault(layer.weight, []).append(layer)
    names: dict[str, str] = {}
    for node in relax_layers:
        weight = constant_value(node.args[1])
        candidates = unmatched.get(weight_key(weight)) if weight is not None else None
        if candidates:
            names[node.name] = candidates.pop(0).name
    taken = set(names.values())
    rest_relax = [n for n in relax_layers if n.name not in names]
    rest_onnx = [l for l in model.layers if l.name not in taken and l.op != "ConvTranspose"]
    if len(rest_relax) == len(rest_onnx):
        names.update((n.name, layer.name) for n, layer in zip(rest_relax, rest_onnx))
    else:
        names.update((n.name, n.name) for n in rest_relax)
    return names


__all__ = ["QuantPlan", "STEM_REASON", "layer_names", "layer_plan", "plan"]
