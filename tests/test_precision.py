"""Mixed precision: rules files, and the accuracy-aware automatic search (--quantize auto)."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

import qcompile
from qcompile.cli import main
from qcompile.errors import InputError
from qcompile.inspection import inspect_path
from qcompile.quantize import QuantConfig
from qcompile.quantize.rules import PrecisionRules

from models import (gemm_matmul, onnxruntime_outputs, outlier_chain, packed_convnet,
                    random_inputs, spiky_chain, spiky_inputs)

RULES = """
[[rule]]
op = "Gemm"
precision = "fp16"

[[rule]]
name = "point*"
precision = "fp32"

[[rule]]
name = "no_such_layer*"
precision = "fp32"

[[rule]]
first = 1
weights = "per-tensor"
calibration = "percentile"
"""


def samples(model, count, seed):
    return [random_inputs(model, seed=seed + i) for i in range(count)]


def precisions(out_dir) -> dict[str, str]:
    manifest = json.loads((out_dir / "model.json").read_text())
    return {layer["name"]: layer["precision"] for layer in manifest["layers"]}


def cosine(a, b) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_rules_keep_exactly_the_chosen_layers(save_model, tmp_path, caplog):
    model = packed_convnet()
    path = save_model(model)
    rules_file = tmp_path / "rules.toml"
    rules_file.write_text(RULES)
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING, logger="qcompile"):
        qcompile.compile(path, "host", out, quantize="int8",
                         calibration=samples(model, 8, 0),
                         quant_config=QuantConfig(rules=PrecisionRules.load(rules_file)))
    assert precisions(out) == {"conv3x3": "int8", "pointwise": "fp32", "depthwise": "int8",
                               "fc": "fp16"}
    report = {row["layer"]: row for row in
              json.loads((out / "quantization.json").read_text())["layers"]}
    assert {name: row["precision"] for name, row in report.items()} == precisions(out)
    first = report["conv3x3"]
    assert first["weight_scale_min"] == first["weight_scale_max"]  # per-tensor, by rule 4
    assert report["depthwise"]["weight_scale_min"] != report["depthwise"]["weight_scale_max"]
    assert "rule 3 (name=['no_such_layer*']) matches no layer" in caplog.text
    assert "rule 1" not in caplog.text and "rule 2" not in caplog.text
    x = random_inputs(model, seed=50)
    assert cosine(qcompile.load(out).run(x)["y"], onnxruntime_outputs(model, x)["y"]) > 0.99


def test_fp16_layers_compute_in_half_precision(save_model, tmp_path):
    model = gemm_matmul()
    rules = PrecisionRules.from_dict({"rule": [{"op": ["Gemm", "MatMul"],
                                                "precision": "fp16"}]})
    out = tmp_path / "out"
    qcompile.compile(save_model(model), "host", out, quantize="int8",
                     calibration=samples(model, 4, 0), quant_config=QuantConfig(rules=rules))
    assert precisions(out) == {"gemm": "fp16", "matmul": "fp16"}
    x = random_inputs(model, seed=3)
    actual = qcompile.load(out).run(x)["y"]
    expected = onnxruntime_outputs(model, x)["y"]
    # fp16 inputs and weights, fp32 accumulation: about 3 decimal digits
    np.testing.assert_allclose(actual, expected, rtol=0, atol=5e-3)
    assert not np.array_equal(actual, expected)


@pytest.mark.parametrize("text, message", [
    ('[[rule]]\nname = "a"\nprecision = "int2"', "rule 1: precision must be one of int8, "
                                                  "fp16, fp32, int4"),
    ('[[rule]]\nprecision = "fp32"', "rule 1: no selector"),
    ('[[rule]]\nname = "a"\nprecison = "fp32"', "unknown key(s) precison"),
    ('[[rule]]\nop = "Conv"\nprecision = "fp16"\n[[rule]]\nfirst = 0\nprecision = "fp32"',
     "rule 2: 'first' must be a positive integer"),
    ('[[rule]]\nname = "a"', "rule 1: sets nothing"),
    ('[defaults]\ncalibration = "kl"', "[defaults]: calibration must be one of"),
    ('[[rule]\nname = "a"', "is not valid TOML"),
    ('[layers]\nfc = "fp32"', "unknown table(s) layers"),
])
def test_bad_rules_files_name_the_rule_and_the_field(tmp_path, text, message):
    path = tmp_path / "rules.toml"
    path.write_text(text)
    with pytest.raises(InputError) as error:
        PrecisionRules.load(path)
    assert message in str(error.value)


def test_cli_refuses_a_bad_rules_file_before_work(save_model, tmp_path, capsys):
    model = packed_convnet()
    rules = tmp_path / "rules.toml"
    rules.write_text('[[rule]]\nname = "fc"\nprecision = "bf16"\n')
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=np.stack([random_inputs(model, seed=i)["x"] for i in range(4)]))
    code = main(["compile", str(save_model(model)), "--quantize", "int8", "--calibration",
                 str(calib), "--precision-rules", str(rules), "-o", str(tmp_path / "out")])
    assert code == 2
    assert "rule 1: precision must be one of int8, fp16, fp32, int4, lut4, not 'bf16'" in \
        capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_auto_keeps_only_the_layer_that_costs_accuracy(save_model, tmp_path):
    model = outlier_chain()
    path = save_model(model)
    out = tmp_path / "auto"
    qcompile.compile(path, "host", out, quantize="auto", calibration=samples(model, 16, 0),
                     validation=samples(model, 16, 100), accuracy_budget=0.999,
                     metric="cosine", latency=False)  # accuracy alone (timing: below)
    search = json.loads((out / "search.json").read_text())
    assert [k["layer"] for k in search["kept_in_higher_precision"]] == ["conv3"]
    assert search["latency_measured_on"] is None
    assert search["all_int8_estimate"] < 0.9 <= 0.999 <= search["chosen_estimate"]
    assert search["verified"] >= 0.999  # measured with the compiled model
    assert search["evaluations"] >= 2 * 4 and search["seconds"] > 0
    sensitivity = sorted(search["sensitivity"], key=lambda r: r["alone_sqnr_db"])
    assert sensitivity[0]["layer"] == "conv3"
    assert precisions(out) == {"conv1": "int8", "conv2": "int8", "conv3": "fp32",
                               "conv4": "int8"}
    # the written rules reproduce the mix without searching
    again = tmp_path / "again"
    qcompile.compile(path, "host", again, quantize="int8", calibration=samples(model, 16, 0),
                     quant_config=QuantConfig(
                         rules=PrecisionRules.load(out / "precision-rules.toml")))
    assert precisions(again) == precisions(out)
    text = inspect_path(out)
    assert "precision search: cosine budget 0.999" in text and "conv3" in text


def test_auto_keeps_a_wide_input_layer_in_int8_with_16_bit_inputs(save_model, tmp_path,
                                                                   caplog):
    """--fallback-precision int8-a16: the layer whose input range int8 cannot hold (spikes)
    keeps its int8 weights and gets 16-bit inputs; the compiled model meets the budget, every
    MAC has int8 weights, and the rules file reproduces the mix."""
    model = spiky_chain()
    path = save_model(model)
    calibration = [spiky_inputs(model, seed=i) for i in range(16)]
    validation = [spiky_inputs(model, seed=100 + i) for i in range(16)]
    out = tmp_path / "auto"
    with caplog.at_level(logging.INFO, logger="qcompile"):
        qcompile.compile(path, "host", out, quantize="auto", calibration=calibration,
                         validation=validation, accuracy_budget=0.999, metric="cosine",
                         fallback_precision="int8-a16")
    assert "never faster than int8" in caplog.text  # so the layers were not timed
    search = json.loads((out / "search.json").read_text())
    assert search["kept_in_higher_precision"] == [{"layer": "conv1", "precision": "int8-a16"}]
    assert search["all_int8_estimate"] < 0.99 and search["verified"] >= 0.999
    assert search["int8_weight_mac_fraction"] == 1.0
    assert search["int8_mac_fraction"] == pytest.approx(2 / 3)
    assert search["latency_measured_on"] is None
    assert precisions(out) == {"conv1": "int8-a16", "conv2": "int8", "conv3": "int8"}
    assert 'activations = "uint16"' in (out / "precision-rules.toml").read_text()
    text = inspect_path(out)
    assert "66.7% of MACs in int8 (100.0% with int8 weights, int8-a16 included)" in text
    assert "int8-a16 us" in text
    conv1 = [line.split() for line in text.splitlines() if line.startswith("conv1 ")]
    # the report's layer table (layer, op, precision, ...) and the search's (... chosen)
    assert [conv1[0][2], conv1[1][-1]] == ["int8-a16", "int8-a16"]
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=np.stack([f["x"] for f in calibration]))
    again = tmp_path / "again"
    assert main(["compile", str(path), "--quantize", "int8", "--calibration", str(calib),
                 "--precision-rules", str(out / "precision-rules.toml"), "-o",
                 str(again)]) == 0
    assert precisions(again) == precisions(out)
    compiled = qcompile.load(again)
    assert np.mean([cosine(compiled.run(f)["y"], onnxruntime_outputs(model, f)["y"])
                    for f in validation]) >= 0.999


def test_a_fallback_that_cannot_meet_the_budget_is_said_and_keeps_every_layer(caplog):
    """int8-a16 cannot save outlier_chain's conv3 (its int8 weights drop the outlier
    channel's tiny weights): with every layer in int8-a16 the budget is still missed; the
    search says so, names the precision that would do, and keeps the best mix it tried."""
    from qcompile.quantize.metrics import load_metric
    from qcompile.quantize.rules import LayerSettings
    from qcompile.quantize.search import search

    model = outlier_chain()
    with caplog.at_level(logging.WARNING, logger="qcompile"):
        result = search(model, samples(model, 16, 0), samples(model, 16, 100),
                        LayerSettings("int8", activations="uint8"), load_metric("cosine"),
                        0.999, fallback="int8-a16")
    assert result.kept[0] == "conv3"  # the most sensitive
    assert 0.99 < result.estimate < 0.999  # measured, not assumed
    assert "short of the budget" in caplog.text and "--fallback-precision fp32" in caplog.text
    assert {n for n, s in result.plan.items() if s.activations == "uint16"} == \
        set(result.kept)


def test_int8_mac_fractions_count_the_layers_rules_fix():
    """The MAC fractions are over every layer, the ones rules fix included, before and after
    the compiled check keeps more layers out of int8 (outlier_chain's 4 convs have equal
    MACs: conv1 fixed in fp32, conv3 kept by the search, then one more)."""
    from qcompile.quantize.metrics import load_metric
    from qcompile.quantize.rules import LayerSettings
    from qcompile.quantize.search import keep_more, search

    model = outlier_chain()
    base = LayerSettings("int8", activations="uint8")
    result = search(model, samples(model, 16, 0), samples(model, 16, 100), base,
                    load_metric("cosine"), 0.999, fixed={"conv1": LayerSettings("fp32")})
    assert result.kept == ["conv3"] and result.int8_mac_fraction == pytest.approx(2 / 4)
    more = keep_more(result, 1)
    assert len(more.kept) == 2 and more.int8_mac_fraction == pytest.approx(1 / 4)
    assert more.to_json()["int8_mac_fraction"] == pytest.approx(1 / 4)


def test_layers_slower_in_int8_by_the_margin():
    from qcompile.layer_latency import LayerLatency
    from qcompile.quantize.search import slower_in_int8

    timed = {"slower": LayerLatency(100.0, 50.0, "fp32"),
             "faster": LayerLatency(50.0, 100.0, "fp32"),
             "barely": LayerLatency(105.0, 100.0, "fp32"),  # 5% slower: within the margin
             "equal": LayerLatency(100.0, 100.0, "fp32"),
             "unmeasured": LayerLatency(None, 10.0, "fp32", "did not build")}
    names = ["slower", "faster", "barely", "equal", "unmeasured", "absent"]
    assert slower_in_int8(timed, names) == ["slower"]
    assert slower_in_int8(timed, names, margin=0.0) == ["slower", "barely"]


def test_search_keeps_layers_slower_in_int8_in_the_fallback():
    """With conv1 timed slower in int8, it stays fp32 from the start; the accuracy search
    still keeps conv3 (the outlier reader), and reports both reasons apart."""
    from qcompile.layer_latency import LayerLatency
    from qcompile.quantize.metrics import load_metric
    from qcompile.quantize.rules import LayerSettings
    from qcompile.quantize.search import search

    model = outlier_chain()
    timed = {"conv1": LayerLatency(80.0, 40.0, "fp32"), "conv2": LayerLatency(20.0, 40.0, "fp32"),
             "conv3": LayerLatency(20.0, 40.0, "fp32"), "conv4": LayerLatency(20.0, 40.0, "fp32")}
    result = search(model, samples(model, 16, 0), samples(model, 16, 100),
                    LayerSettings("int8", activations="uint8"), load_metric("cosine"), 0.999,
                    latencies=timed, latency_where="host, this machine")
    assert result.slower_in_int8 == ["conv1"] and result.kept == ["conv3"]
    assert {n: s.precision for n, s in result.plan.items()} == {
        "conv1": "fp32", "conv2": "int8", "conv3": "fp32", "conv4": "int8"}
    assert "conv1" not in result.ranking
    assert "1 because int8 is slower (timed on host, this machine in 0 s)" in \
        result.summary()
    data = result.to_json()
    assert data["kept_because_int8_is_slower"] == [{"layer": "conv1", "precision": "fp32"}]
    row = next(r for r in data["sensitivity"] if r["layer"] == "conv1")
    assert row["int8_us"] == 80.0 and row["fallback_us"] == 40.0
    assert "because int8 is slower" in result.rules_text()


def test_auto_times_each_layer_here_and_leaves_int8_only_where_slower(save_model, tmp_path):
    """--quantize auto on the host times every layer's kernel in int8 and fp32 (real builds,
    real runs) and keeps in fp32 exactly the layers whose int8 kernel is slower."""
    from qcompile.quantize.search import LATENCY_MARGIN

    model = packed_convnet()
    out = tmp_path / "auto"
    qcompile.compile(save_model(model), "host", out, quantize="auto",
                     calibration=[random_inputs(model, seed=i) for i in range(8)],
                     validation=[random_inputs(model, seed=50 + i) for i in range(4)],
                     accuracy_budget=0.9, metric="cosine")
    search = json.loads((out / "search.json").read_text())
    from qcompile.devices import LocalDevice

    assert search["latency_measured_on"] == \
        f"host, this machine with {LocalDevice().threads()} thread(s)"
    rows = {r["layer"]: r for r in search["sensitivity"]}
    assert set(rows) == {"conv3x3", "pointwise", "depthwise", "fc"}
    assert all(r["int8_us"] > 0 and r["fallback_us"] > 0 for r in rows.values()), rows
    slower = {name for name, r in rows.items()
              if r["int8_us"] > r["fallback_us"] * (1 + LATENCY_MARGIN)}
    assert {k["layer"] for k in search["kept_because_int8_is_slower"]} == slower
    built = precisions(out)
    assert all(built[name] == "fp32" for name in slower), built
    assert "int8 us" in inspect_path(out) and "fp32 us" in inspect_path(out)


def test_auto_says_a_cross_target_cannot_be_timed_here(save_model, tmp_path, caplog):
    model = outlier_chain()
    with caplog.at_level(logging.WARNING, logger="qcompile"):
        qcompile.compile(save_model(model), "arm64-dotprod", tmp_path / "out", quantize="auto",
                         calibration=samples(model, 8, 0), accuracy_budget=0.9,
                         metric="cosine")
    assert "layers not timed" in caplog.text and "--rpc-tracker" in caplog.text
    search = json.loads((tmp_path / "out" / "search.json").read_text())
    assert search["latency_measured_on"] is None


METRIC = '''
import numpy as np

def worst_cosine(references, outputs, feeds):
    """The lowest per-sample cosine similarity (stricter than the mean)."""
    values = []
    for ref, out in zip(references, outputs):
        r, o = ref[0].ravel(), out[0].ravel()
        values.append(float(r @ o / (np.linalg.norm(r) * np.linalg.norm(o))))
    return min(values)
'''


def test_cli_auto_with_a_python_metric_and_fp16_fallback(save_model, tmp_path, capsys):
    model = outlier_chain()
    metric = tmp_path / "my_metric.py"
    metric.write_text(METRIC)
    calib, val = tmp_path / "calib.npz", tmp_path / "val.npz"
    np.savez(calib, x=np.stack([f["x"] for f in samples(model, 16, 0)]))
    np.savez(val, x=np.stack([f["x"] for f in samples(model, 12, 200)]))
    out = tmp_path / "out"
    code = main(["compile", str(save_model(model)), "--quantize", "auto", "--calibration",
                 str(calib), "--validation", str(val), "--accuracy-budget", "0.99",
                 "--metric", f"python:{metric}:worst_cosine", "--fallback-precision", "fp16",
                 "-o", str(out)])
    assert code == 0
    search = json.loads((out / "search.json").read_text())
    assert search["metric"].endswith(":worst_cosine") and search["verified"] >= 0.99
    assert precisions(out)["conv3"] == "fp16"
    assert main(["inspect", str(out)]) == 0
    assert "conv3" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--quantize", "auto"], "needs --accuracy-budget"),
    (["--quantize", "int8", "--accuracy-budget", "0.9"], "belong to --quantize auto"),
    (["--quantize", "auto", "--accuracy-budget", "0.9", "--metric", "f1"],
     "Unknown metric 'f1'"),
    (["--quantize", "auto", "--accuracy-budget", "0.9", "--metric",
      "python:no_such_metric_file.py:score"], "cannot import no_such_metric_file.py"),
    (["--quantize", "auto", "--accuracy-budget", "0.9", "--metric", "python:json:no_such"],
     "json has no function 'no_such'"),
    (["--quantize", "int8", "--precision-rules", "no_such_rules.toml"],
     "Precision rules file no_such_rules.toml does not exist"),
    (["--quantize", "int8", "--rpc-tracker", "127.0.0.1:9190"],
     "compile uses --rpc-tracker only with --quantize auto"),
    (["--quantize", "auto", "--accuracy-budget", "0.9", "--fallback-precision", "int8-a16",
      "--activations", "uint16"], "gives every layer 16-bit inputs already"),
])
def test_auto_option_errors(save_model, tmp_path, capsys, args, message):
    model = outlier_chain()
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=np.stack([f["x"] for f in samples(model, 4, 0)]))
    code = main(["compile", str(save_model(model)), "--calibration", str(calib), *args,
                 "-o", str(tmp_path / "out")])
    assert code == 2 and message in capsys.readouterr().err


def test_precision_rules_need_a_quantize_mode(save_model, tmp_path, capsys):
    rules = tmp_path / "rules.toml"
    rules.write_text('[[rule]]\nname = "fc"\nprecision = "fp32"\n')
    code = main(["compile", str(save_model(packed_convnet())), "--precision-rules", str(rules),
                 "-o", str(tmp_path / "out")])
    assert code == 2 and "--precision-rules needs --quantize" in capsys.readouterr().err


def test_inspect_lists_the_layers_rules_name(save_model, capsys):
    model = packed_convnet()
    assert main(["inspect", str(save_model(model))]) == 0
    text = capsys.readouterr().out
    for name in ("conv3x3", "pointwise", "depthwise", "fc"):
        assert name in text
    assert "4 weighted layers" in text


@pytest.mark.parametrize("make, message", [
    (lambda d: d / "missing.onnx", "is neither an .onnx model nor a directory"),
    (lambda d: d, "has no model.json"),
])
def test_inspect_names_what_it_cannot_read(tmp_path, capsys, make, message):
    assert main(["inspect", str(make(tmp_path))]) == 2
    assert message in capsys.readouterr().err


def minilm_auto(tmp_path, **options) -> tuple[dict, list[float]]:
    """--quantize auto on paraphrase-MiniLM-L3-v2 and real sentences (64 to calibrate, 48 to
    validate) with a cosine budget: (search.json, the sentence embeddings' cosines to
    onnxruntime fp32 on 48 sentences the search never saw)."""
    import onnxruntime as ort

    import sentences

    path = sentences.minilm_onnx_path()
    feeds = sentences.encode(sentences.fortunes(160), seq_len=64)
    calibration, validation, untouched = feeds[:64], feeds[64:112], feeds[112:]
    out = tmp_path / "auto"
    qcompile.compile(path, "host", out, input_shapes={n: (1, 64) for n in sentences.INPUT_NAMES},
                     quantize="auto", calibration=calibration, validation=validation,
                     metric="cosine", **options)
    model = qcompile.load(out)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    cosines = [sentences.cosine(model.run(feed)[sentences.SENTENCE_EMBEDDING],
                                session.run([sentences.SENTENCE_EMBEDDING], feed)[0])
               for feed in untouched]
    return json.loads((out / "search.json").read_text()), cosines


@pytest.mark.slow
def test_auto_on_minilm_keeps_int8_where_the_cosine_budget_allows(tmp_path):
    """The precision search on a real transformer: a cosine budget of 0.99."""
    search, cosines = minilm_auto(tmp_path, accuracy_budget=0.99, latency=False)
    # every weighted layer (18 MatMul/Gemm; the attention's two matmuls of activations stay
    # float) is int8: all-int8 already meets the budget once the residual adds feeding
    # LayerNorm stay float (requantizing them gave a cosine of 0.91)
    assert search["int8_mac_fraction"] == 1.0 and not search["kept_in_higher_precision"]
    assert search["verified"] >= 0.99
    report = json.loads((tmp_path / "auto" / "quantization.json").read_text())
    int8 = [layer for layer in report["layers"] if layer["precision"] == "int8"]
    assert len(int8) == 18
    # the FFN's output projections feed a residual add and LayerNorm: dequantized from int32
    assert all(layer["output"] == "float" for layer in int8 if layer["layer"] in
               ("Gemm_11", "Gemm_22", "Gemm_33"))
    assert np.mean(cosines) >= 0.99, cosines


@pytest.mark.slow
def test_auto_on_minilm_with_int8_a16_fallback_keeps_every_weight_int8(tmp_path):
    """A tighter budget (cosine 0.999) than all-int8 meets (0.997): with
    --fallback-precision int8-a16 the layers kept are int8 with 16-bit inputs, so every
    weight stays int8 and the budget holds on sentences the search never saw."""
    search, cosines = minilm_auto(tmp_path, accuracy_budget=0.999,
                                  fallback_precision="int8-a16")
    assert search["all_int8_estimate"] < 0.999 <= search["verified"]
    kept = search["kept_in_higher_precision"]
    assert kept and {k["precision"] for k in kept} == {"int8-a16"}
    assert search["int8_weight_mac_fraction"] == 1.0 > search["int8_mac_fraction"] > 0.5
    report = json.loads((tmp_path / "auto" / "quantization.json").read_text())
    assert {layer["layer"] for layer in report["layers"] if layer["precision"] == "int8-a16"} \
        == {k["layer"] for k in kept}
    assert np.mean(cosines) >= 0.998, cosines
