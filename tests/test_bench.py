"""The benchmarks' command lines (bench/run.py, bench/error_budget.py, bench/corpus.py): what
they measure is read off their tables, but a wrong model name must fail at once with the names
it knows, before any work."""

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
