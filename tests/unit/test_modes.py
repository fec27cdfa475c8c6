"""The quantization mode as a type: each mode checks its arguments when made, and the loose
options of compile() and the command line map onto them, refusing what does not go together."""

import pytest

from qcompile.errors import InputError
from qcompile.modes import (AutoPrecision, DynamicInt8, Float16, Float32, StaticInt8,
                            WeightOnlyInt8, mode_from)
from qcompile.quantize import QuantConfig


def test_loose_options_map_to_modes():
    assert mode_from(None) == Float32() and mode_from("fp16") == Float16()
    assert mode_from("int8", "calib.npz") == StaticInt8("calib.npz", QuantConfig())
    assert isinstance(mode_from("int8-weights"), WeightOnlyInt8)
    assert isinstance(mode_from("int8-dynamic"), DynamicInt8)
    auto = mode_from("auto", "calib.npz", accuracy_budget=0.99, metric="cosine")
    assert isinstance(auto, AutoPrecision) and auto.metric.name == "cosine"


@pytest.mark.parametrize("make, message", [
    (lambda: StaticInt8(None), "needs calibration data"),
    (lambda: StaticInt8("c.npz", QuantConfig(method="magic")), "Unknown calibration method"),
    (lambda: AutoPrecision("c.npz"), "needs --accuracy-budget"),
    (lambda: AutoPrecision("c.npz", 0.9, metric="nope"), "Unknown metric"),
    (lambda: AutoPrecision("c.npz", 0.9, fallback="int4"), "--fallback-precision must be"),
    (lambda: AutoPrecision("c.npz", 0.9, fallback="int8-a16",
                           config=QuantConfig(activations="uint16")), "16-bit inputs already"),
    (lambda: DynamicInt8(QuantConfig(activations="int16")), "needs static int8"),
    (lambda: mode_from("int4"), "Unknown --quantize mode"),
    (lambda: mode_from("int8-weights", "c.npz", QuantConfig(weight_rounding="nearest")),
     "uses calibration data only to round the weights by GPTQ"),
    (lambda: mode_from("int8", "c.npz", accuracy_budget=0.9), "belong to --quantize auto"),
    (lambda: mode_from("int8", "c.npz", tracker=True), "only with --quantize auto"),
    (lambda: mode_from(None, "c.npz"), "add --quantize int8"),
    (lambda: StaticInt8("c.npz", QuantConfig(weight_bits=3)), "stored in 4 or 8 bits, not 3"),
    (lambda: StaticInt8("c.npz", QuantConfig(weight_bits=4, group_size=48)),
     "one of 32, 64, 128 reduction elements, not 48"),
    (lambda: DynamicInt8(QuantConfig(reconstruct=True)), "Use --quantize int8"),
    (lambda: StaticInt8("c.npz", QuantConfig(reconstruct_seconds=60)),
     "with --reconstruct, not 60 without it"),
    (lambda: StaticInt8("c.npz", QuantConfig(reconstruct=True, reconstruct_seconds=0)),
     "a positive number of seconds with --reconstruct, not 0."),
    (lambda: WeightOnlyInt8(QuantConfig(reconstruct=True)), "quantizes no activations"),
    (lambda: AutoPrecision("c.npz", 0.9, config=QuantConfig(reconstruct=True)),
     "--precision-rules OUT_DIR/precision-rules.toml --reconstruct"),
    (lambda: StaticInt8("c.npz", QuantConfig(tables="int2")),
     "Lookup tables are stored in int8, int4 or fp32, not 'int2'"),
])
def test_invalid_combinations_cannot_be_made(make, message):
    with pytest.raises(InputError, match=message):
        make()
