"""Quantization schemes: how one weighted layer (conv2d, matmul) is computed.

A precision plan maps each layer to a scheme object. Each scheme is a small frozen dataclass
in its own file that knows how to emit its layer into the Relax graph (`emit`, called by the
realizer's linear-op handler), how to fake itself in the precision search's ONNX simulator
(`fake`), and how many of its MACs count as int8. Adding a scheme is one file here and one
line in SCHEMES.

    int8          static int8: int8 x (u)int8 -> int32 kernels, requantization fused
    int8-a16      int8 weights, 16-bit inputs taken as two bytes through the int8 kernel
    fp16          fp16 input and weight, fp32 accumulation
    fp32          float, with the reason it stayed so
    int8-weights  weight-only int8: int8 weights widened in fp32 kernels
    int8-dynamic  MatMul/Gemm on int8 with the input quantized at run time (per row, or per
                  row and group on the 4-bit layers' kernel)
    int4          W4A8: group-wise 4-bit weights on the int8 dot-product instructions
    int4-weights  W4A16: group-wise 4-bit weights widened in fp32 kernels
    int4-dynamic  W4A8 with the input quantized at run time, per row and group
    lut4          W4A8 on palette weights: 4-bit codes indexing 16 int8 values per layer
"""

from __future__ import annotations

from ...errors import InputError
from .base import Scheme, SimLayerOp
from .dynamic import Dynamic
from .fp16 import Fp16
from .fp32 import Fp32
from .int4 import Int4
from .int4_dynamic import Int4Dynamic
from .int4_weights import Int4Weights
from .int8 import Int8
from .int8_a16 import Int8A16
from .lut4 import Lut4
from .weight_only import WeightOnly

SCHEMES: dict[str, type[Scheme]] = {
    "int8": Int8,
    "int8-a16": Int8A16,
    "fp16": Fp16,
    "fp32": Fp32,
    "int8-weights": WeightOnly,
    "int8-dynamic": Dynamic,
    "int4": Int4,
    "int4-weights": Int4Weights,
    "int4-dynamic": Int4Dynamic,
    "lut4": Lut4,
}
# what a rules file's `precision` takes (int8-a16 is int8 with `activations` 16-bit)
RULE_PRECISIONS = tuple(name for name, scheme in SCHEMES.items() if scheme.in_rules)
# of those, the ones whose layers read a calibrated integer input (int8, int4, lut4), and the
# ones whose weights come in groups of group_size (int4, lut4)
CALIBRATED = tuple(name for name in RULE_PRECISIONS if SCHEMES[name].takes_integers)
FOUR_BITS = tuple(name for name in RULE_PRECISIONS if issubclass(SCHEMES[name], Int4))


def scheme_for(settings, mode: str = "static", input_groups: bool = False) -> Scheme:
    """The scheme of a layer's rules.LayerSettings. mode: the model's int8 flavour for its
    int8 layers: static (calibrated), weight-only or dynamic; `input_groups`: dynamic int8
    layers quantize their input in groups of the settings' group_size."""
    precision = settings.precision
    if precision == "lut4" and mode != "static":
        raise InputError("Palette weights (lut4, --palettes) multiply a calibrated int8 input: "
                         "use them with --quantize int8 or auto, not in the "
                         f"{mode} mode; or ask for int4 there.")
    if precision == "int4" and mode == "weight-only":
        return Int4Weights.from_settings(settings)
    if precision == "int4" and mode == "dynamic":
        return Int4Dynamic.from_settings(settings)
    if precision == "int8" and mode == "weight-only":
        return WeightOnly(per_channel=settings.per_channel)
    if precision == "int8" and mode == "dynamic":
        return Dynamic(per_channel=settings.per_channel, activations=settings.activations,
                       group_size=settings.group_size if input_groups else 0)
    if precision == "int8":
        cls = Int8A16 if settings.activations in Int8A16.ACTIVATIONS else Int8
        return cls(method=settings.method, per_channel=settings.per_channel,
                   activations=settings.activations, symmetric=settings.symmetric)
    return SCHEMES[precision].from_settings(settings)


__all__ = ["CALIBRATED", "Dynamic", "FOUR_BITS", "Fp16", "Fp32", "Int4", "Int4Dynamic",
           "Int4Weights", "Int8", "Int8A16", "Lut4", "RULE_PRECISIONS", "SCHEMES", "Scheme",
           "SimLayerOp", "WeightOnly", "scheme_for"]
