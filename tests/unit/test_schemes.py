"""The scheme registry: every scheme under its own name, the rules file's precisions from it,
LayerSettings mapped to schemes, and each scheme's count of int8 MACs."""

import pytest

from qcompile.quantize.rules import PRECISIONS, LayerSettings
from qcompile.quantize.schemes import (SCHEMES, Dynamic, Fp16, Fp32, Int4, Int8, Int8A16,
                                       WeightOnly, scheme_for)
from qcompile.quantize.search import int8_fraction, precision_label


def test_every_scheme_is_registered_under_its_name():
    assert all(cls.name == name for name, cls in SCHEMES.items())
    assert set(PRECISIONS) == {"int8", "int4", "lut4", "fp16", "fp32"}


@pytest.mark.parametrize("settings, mode, expected", [
    (LayerSettings("int8", "entropy", False, "int8", True), "static",
     Int8("entropy", False, "int8", True)),
    (LayerSettings("int8", activations="uint16"), "static", Int8A16(activations="uint16")),
    (LayerSettings("fp16"), "static", Fp16()),
    (LayerSettings("int4", "entropy", group_size=64), "static", Int4("entropy", group_size=64)),
    (LayerSettings("fp32"), "dynamic", Fp32()),
    (LayerSettings("int8", per_channel=False), "weight-only", WeightOnly(per_channel=False)),
    (LayerSettings("int8", activations="int8"), "dynamic", Dynamic(activations="int8")),
])
def test_settings_map_to_schemes(settings, mode, expected):
    assert scheme_for(settings, mode) == expected


def test_int8_mac_accounting():
    plan = {"a": LayerSettings("int8"), "b": LayerSettings("int8", activations="uint16"),
            "c": LayerSettings("fp16")}
    macs = {"a": 60, "b": 30, "c": 10}
    assert int8_fraction(plan, macs) == pytest.approx(0.6)
    assert int8_fraction(plan, macs, weights_only=True) == pytest.approx(0.9)
    assert [precision_label(plan[n]) for n in "abc"] == ["int8", "int8-a16", "fp16"]
