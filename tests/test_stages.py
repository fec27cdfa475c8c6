"""Static int8 as three public stages (plan, calibrate, realize): composed, they give what
`quantize` gives; a calibration table saved and loaded gives the same model; one table
serves plans with other rules; a table of another model is refused."""

import numpy as np
import pytest

import tvm
from models import conv_relu, gemm_matmul, random_inputs, residual_pool_concat
from qcompile import import_onnx
from qcompile.errors import InputError
from qcompile.quantize import (CalibrationTable, QuantConfig, calibrate, plan, quantize,
                               realize)
from qcompile.quantize.rules import PrecisionRules


def _samples(model, count=8):
    return [random_inputs(model, seed=1 + i) for i in range(count)]


def _rows(quantized):
    return [(r["layer"], r["precision"], r["input"], r["output"], r["weight_scale_max"])
            for r in quantized.report.rows]


@pytest.mark.parametrize("make", [residual_pool_concat, gemm_matmul], ids=lambda f: f.__name__)
def test_the_stages_give_what_quantize_gives(make, save_model, tmp_path):
    onnx_model = make()
    model = import_onnx(save_model(onnx_model))
    samples = _samples(onnx_model)
    config = QuantConfig(float_stem=False)
    whole = quantize(model, samples, config)

    p = plan(model, config)
    table = calibrate(p, samples)
    table.save(tmp_path / "table.npz")
    parts = realize(p, CalibrationTable.load(tmp_path / "table.npz"), measure_on=samples)

    tvm.ir.assert_structural_equal(whole.mod, parts.mod)
    assert _rows(whole) == _rows(parts)
    assert [r["error_vs_fp32"] for r in whole.report.rows] == \
        [r["error_vs_fp32"] for r in parts.report.rows]
    assert any(r.precision == "int8" for r in parts.layers)


def test_one_table_serves_plans_with_other_rules(save_model):
    onnx_model = residual_pool_concat()
    model = import_onnx(save_model(onnx_model))
    samples = _samples(onnx_model)
    first = model.layers[0].name
    rules = PrecisionRules.from_dict(
        {"rule": [{"name": first, "precision": "fp32"}]}, "rules.toml")
    config = QuantConfig(float_stem=False, rules=rules)
    whole = quantize(model, samples, config)

    table = calibrate(plan(model, QuantConfig(float_stem=False)), samples)
    parts = realize(plan(model, config), table)

    tvm.ir.assert_structural_equal(whole.mod, parts.mod)
    precisions = {layer.name: layer.precision for layer in parts.layers}
    assert precisions[first] == "fp32"
    assert list(precisions.values()).count("int8") == len(precisions) - 1


def test_a_table_of_another_model_is_refused(save_model):
    a, b = conv_relu(), gemm_matmul()
    table = calibrate(plan(import_onnx(save_model(a))), _samples(a, 2))
    with pytest.raises(InputError, match="does not belong to this model"):
        realize(plan(import_onnx(save_model(b))), table)


def test_the_plan_names_layers_and_observed_tensors(save_model):
    onnx_model = residual_pool_concat()
    model = import_onnx(save_model(onnx_model))
    p = plan(model, QuantConfig(float_stem=False))
    assert sorted(p.names.values()) == sorted(layer.name for layer in model.layers)
    assert {s.precision for s in p.settings.values()} == {"int8"}
    tensors = p.tensors()
    assert len(set(tensors)) == len(tensors) and "x" in tensors
    assert set(p.layer_inputs()) == set(p.names)
    everywhere = plan(model).with_int8_everywhere()
    assert {s.precision for s in everywhere.settings.values()} == {"int8"}
    assert np.all([isinstance(name, str) for name in tensors])
