"""The benchmarks' command lines (bench/run.py, bench/error_budget.py, bench/corpus.py,
bench/compare_builds.py): what they measure is read off their tables, but a wrong model or
configuration name must fail at once with the names it knows, before any work."""

import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench" / "run.py"
ERROR_BUDGET = BENCH.parent / "error_budget.py"


def test_an_unknown_model_is_refused_with_the_known_names():
    proc = subprocess.run([sys.executable, str(BENCH), "--models", "efficientnet-lite0,resnet"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "unknown model 'resnet'" in proc.stderr
    assert "efficientnet-lite0" in proc.stderr and "minilm-l3" in proc.stderr
    assert "bench:" not in proc.stderr  # nothing was measured


def test_an_unknown_configuration_is_refused_with_the_known_names():
    proc = subprocess.run([sys.executable, str(BENCH), "--models", "small-matmul", "--configs",
                           "qcompile-int8,qcompile-int3"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    assert "unknown configuration 'qcompile-int3'" in proc.stderr
    assert "qcompile-int4" in proc.stderr and "qcompile-auto" in proc.stderr
    assert "bench:" not in proc.stderr  # nothing was measured


def test_help_lists_the_models():
    proc = subprocess.run([sys.executable, str(BENCH), "--help"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0
    assert "small-matmul" in proc.stdout and "--phone" in proc.stdout


def test_error_budget_help_says_what_it_measures():
    proc = subprocess.run([sys.executable, str(ERROR_BUDGET), "--help"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0
    assert "EfficientNet-Lite0" in proc.stdout and "--json" in proc.stdout


def test_the_corpus_bench_refuses_an_unknown_model_before_any_work():
    corpus = BENCH.parent / "corpus.py"
    proc = subprocess.run([sys.executable, str(corpus), "--models", "ppocr-det,resnet"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "no corpus model resnet" in proc.stderr and "silero-vad" in proc.stderr
    assert " / onnxruntime-fp32 ..." not in proc.stderr  # nothing was built


def test_the_corpus_bench_refuses_fewer_than_one_timing_round_before_any_work():
    corpus = BENCH.parent / "corpus.py"
    proc = subprocess.run([sys.executable, str(corpus), "--models", "ppocr-det", "--rounds",
                           "0"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "--rounds must be at least 1" in proc.stderr and "Traceback" not in proc.stderr
    assert " / onnxruntime-fp32 ..." not in proc.stderr  # nothing was built


def test_compare_builds_times_builds_side_by_side_and_compares_their_outputs(save_model,
                                                                             tmp_path):
    """Two fp32 builds of one model and an fp16 build: the table has a row per build, the
    first two identical, the fp16 one not; a directory that is not a build, or no rounds, is
    one paragraph, exit 2."""
    import json

    import numpy as np

    import qcompile
    from models import conv_relu, random_inputs

    model = conv_relu()
    path = save_model(model)
    builds = [qcompile.compile(path, "host", tmp_path / name, **options).directory
              for name, options in (("a", {}), ("b", {}), ("fp16", {"quantize": "fp16"}))]
    inputs = tmp_path / "x.npz"
    np.savez(inputs, **random_inputs(model))
    script = BENCH.parent / "compare_builds.py"
    out = tmp_path / "compare.json"
    proc = subprocess.run([sys.executable, str(script), *map(str, builds), "--inputs",
                           str(inputs), "--rounds", "2", "--repeat", "2", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stdout.splitlines() if str(tmp_path) in line]
    assert len(lines) == 3
    assert "identical" in lines[0] and "identical" in lines[1]
    assert "max |diff|" in lines[2]
    rows = json.loads(out.read_text())["builds"]
    assert [len(r["rounds_ms"]) for r in rows] == [2, 2, 2]
    assert rows[2]["max_abs_diff_vs_first"] > 0
    proc = subprocess.run([sys.executable, str(script), str(tmp_path), "--inputs", str(inputs)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "not a compiled model" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = subprocess.run([sys.executable, str(script), *map(str, builds), "--inputs",
                           str(inputs), "--rounds", "0"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2 and "--rounds and --repeat must be at least 1" in proc.stderr


def test_tuned_vs_default_builds_each_record_and_the_default_alike(tmp_path):
    """bench/tuned_vs_default.py on the shipped host log: every packed kernel built with its
    record and with today's default schedule computes the same outputs (the log was pruned to
    kernels whose results do not depend on their schedule); a directory that is not a log is
    one paragraph, exit 2."""
    import json

    import pytest

    from test_int8_kernels import host_has_vnni

    if not host_has_vnni():
        pytest.skip("the shipped host log is for AVX-512 VNNI CPUs")
    script = BENCH.parent / "tuned_vs_default.py"
    out = tmp_path / "tuned.json"
    proc = subprocess.run([sys.executable, str(script), "--out", str(out)], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) >= 20 and all(r["same_outputs"] for r in rows)  # 28 packed kernels
    assert all(r["default_us"] > 0 and r["tuned_us"] > 0 for r in rows)
    assert proc.stdout.count("| yes |") == len(rows)
    proc = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2 and "not a qcompile tuning log" in proc.stderr
    assert "Traceback" not in proc.stderr
