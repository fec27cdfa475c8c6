"""MetaSchedule's XGBoost cost model under the installed xgboost build: what it predicts, how
long it trains, and a short real tune. Run it once per build to compare them, e.g. PyPI's
`xgboost` (which pulls the 350 MB `nvidia-nccl-cu12` on Linux) against `xgboost-cpu`:

    python bench/cost_model.py --out bench/results/cost-model-xgboost.json
    pip uninstall -y xgboost nvidia-nccl-cu12 && pip install xgboost-cpu==<same version>
    python bench/cost_model.py --out bench/results/cost-model-xgboost-cpu.json \
        --compare bench/results/cost-model-xgboost.json

1. Deterministic: the cost model is trained, kernel by kernel as a tune does, on every record
   of the tuning log that ships for the host (tuning_logs/host), then scores each of them.
   The model's seed is fixed, so equal builds give equal scores; `--compare` prints the
   largest difference from another run's.
2. A real tune (noisy: measured on this machine): the tests' small int8 conv net for the host,
   `--trials` per kernel into a new log (`--log DIR` keeps it); its time and each kernel's best
   latency as measured while tuning.
3. `--time-logs A B ...`: the conv net built with each kept log, timed round-robin in one
   process: what the tunes found, compared without the noise of when each ran.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the small models live with the tests
sys.path.insert(0, str(ROOT))


def xgboost_build() -> str:
    for name in ("xgboost-cpu", "xgboost"):
        try:
            return f"{name}=={metadata.version(name)}"
        except metadata.PackageNotFoundError:
            continue
    return "none"


def scores_on_shipped_log() -> dict:
    """Train the cost model on the shipped host log, workload by workload; score every record."""
    from tvm.s_tir import meta_schedule as ms

    from qcompile.tune import COST_MODEL_WARMUP
    from qcompile.tuning_log import open_database, shipped_dir, workload_key

    database = open_database(shipped_dir() / "host")
    groups: dict[str, tuple] = {}
    for record in database.get_all_tuning_records():
        if not record.run_secs:
            continue
        key = workload_key(record.workload.mod)
        groups.setdefault(key, (record.workload.mod, record.target, []))[2].append(record)
    model = ms.cost_model.XGBModel(num_tuning_cores=os.cpu_count() or 1,
                                   num_warmup_samples=COST_MODEL_WARMUP)
    contexts = []
    start = time.perf_counter()
    for mod, target, records in groups.values():
        context = ms.TuneContext(mod=mod, target=target)
        candidates = [r.as_measure_candidate() for r in records]
        results = [ms.runner.RunnerResult(run_secs=[float(t) for t in r.run_secs],
                                          error_msg=None) for r in records]
        model.update(context, candidates, results)
        contexts.append((context, candidates))
    trained = time.perf_counter() - start
    scores = np.concatenate([np.asarray(model.predict(context, candidates), dtype=np.float64)
                             for context, candidates in contexts])
    return {"kernels": len(groups), "records": int(scores.size),
            "train_seconds": round(trained, 2),
            "scores_sha256": hashlib.sha256(np.round(scores, 9).tobytes()).hexdigest(),
            "scores": scores.tolist()}


def _convnet(work: Path) -> tuple[Path, list]:
    """The tests' packed_convnet saved in `work`, and its int8 calibration samples."""
    import onnx

    from models import packed_convnet, random_inputs

    path = work / "model.onnx"
    onnx.save(packed_convnet(), str(path))
    return path, [random_inputs(packed_convnet(), seed=10 + i) for i in range(8)]


def short_tune(trials: int, log_dir: Path) -> dict:
    """The tests' packed_convnet in int8, tuned for the host into `log_dir`: time and the best
    latency of each kernel as measured while tuning."""
    import qcompile

    with tempfile.TemporaryDirectory() as work:
        path, calibration = _convnet(Path(work))
        start = time.perf_counter()
        log = qcompile.tune(path, "host", log_dir, trials=trials, quantize="int8",
                            calibration=calibration)
        seconds = time.perf_counter() - start
    best = {t.name: t.best_us for t in log.tasks if t.best_us is not None}
    return {"trials_per_kernel": trials, "kernels": len(log.tasks),
            "tune_seconds": round(seconds, 1), "sum_best_us": round(sum(best.values()), 1),
            "best_us": best}


def time_logs(logs: list[Path], rounds: int = 5) -> dict[str, float]:
    """The convnet compiled with each log, timed in this one process, round-robin: the
    median over rounds of each build's median latency (us). Compares what tunes found
    without the noise of when each tune ran."""
    import qcompile

    medians: dict[str, list[float]] = {str(d): [] for d in logs}
    with tempfile.TemporaryDirectory() as work:
        path, calibration = _convnet(Path(work))
        models = {}
        for i, log_dir in enumerate(logs):
            built = qcompile.compile(path, "host", Path(work) / f"build{i}", quantize="int8",
                                     calibration=calibration, tuning_log=log_dir)
            models[str(log_dir)] = qcompile.load(built.directory)
        feeds = calibration[0]
        for _ in range(rounds):
            for name, model in models.items():
                medians[name].append(model.benchmark(feeds, repeat=20).median_ms * 1e3)
    return {name: round(float(np.median(values)), 1) for name, values in medians.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=32)
    parser.add_argument("--log", type=Path, help="tune into this (new) log and keep it")
    parser.add_argument("--no-tune", action="store_true", help="only the deterministic part")
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/cost-model.json")
    parser.add_argument("--compare", type=Path, help="another run's JSON: difference of scores")
    parser.add_argument("--time-logs", type=Path, nargs="+", metavar="LOG",
                        help="only: time the convnet built with each of these logs")
    args = parser.parse_args()

    if args.time_logs:
        for name, us in time_logs(args.time_logs).items():
            print(f"{name}: median {us} us")
        return 0
    result = {"xgboost": xgboost_build(), "shipped_log": scores_on_shipped_log()}
    if not args.no_tune:
        with tempfile.TemporaryDirectory() as work:
            result["tune"] = short_tune(args.trials, args.log or Path(work) / "log")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    rows = [json.loads(args.compare.read_text())] if args.compare else []
    print("| build | records | train s | scores sha256 | tune s | sum of best us |")
    print("|---|---|---|---|---|---|")
    for row in rows + [result]:
        tune = row.get("tune", {})
        print(f"| {row['xgboost']} | {row['shipped_log']['records']} | "
              f"{row['shipped_log']['train_seconds']} | "
              f"{row['shipped_log']['scores_sha256'][:12]} | {tune.get('tune_seconds', '')} | "
              f"{tune.get('sum_best_us', '')} |")
    if rows:
        other = np.asarray(rows[0]["shipped_log"]["scores"])
        mine = np.asarray(result["shipped_log"]["scores"])
        print(f"largest score difference: {np.max(np.abs(other - mine)):.3g} "
              f"(scores span {mine.min():.3g} .. {mine.max():.3g})")
    print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
