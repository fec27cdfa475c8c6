"""Side-by-side benchmark: qcompile vs onnxruntime on the same machine, in one run.

    python bench/run.py [--threads 2] [--repeat 30] [--out bench/results/latest.json]

For each model and each engine configuration it measures, with the same thread count:
latency (median and p90 over repeats, after warm-up), model file size, top-1 agreement and
output cosine against onnxruntime fp32 on held-out real photos, peak memory (RSS) of the
process that runs it, and compile (or quantization) time. Each configuration runs in a fresh
subprocess so that RSS is its own. Prints a Markdown table and writes JSON. No asserts: goals
are read off the table.

Configurations: onnxruntime fp32 and int8 (its quantize_static: QDQ, per-channel, uint8
activations, minmax), qcompile fp32, int8 with default schedules (no tuning log), and int8 with
the tuning log shipped in tuning_logs/host (its tuning time is read from the log: how long the
tune that wrote it took). All int8 calibrated on the same 32 photos.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ("onnxruntime-fp32", "onnxruntime-int8", "qcompile-fp32", "qcompile-int8",
           "qcompile-int8-tuned")


def _photos():
    """(calibration, held-out evaluation) inputs: 32 photos spread over the collection, and
    all the others (accuracy is measured on the held-out photos only)."""
    from qcompile.examples import efficientnet_lite0 as effnet
    from qcompile.examples.photos import calibration_split, photo_collection

    xs = [effnet.preprocess(image) for _, image in photo_collection()]
    return calibration_split(xs)


def _ort_session(path: Path, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _ort_quantize(onnx_path: Path, out: Path, calibration) -> Path:
    """onnxruntime's static int8: QDQ, per-channel int8 weights, uint8 activations, minmax."""
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType,
                                          quantize_static)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.samples = iter(calibration)

        def get_next(self):
            x = next(self.samples, None)
            return None if x is None else {"images": x}

    quantize_static(str(onnx_path), str(out), Reader(), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8)
    return out


def _time(fn, repeat: int, warmup: int = 3) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def measure_one(config: str, onnx_path: Path, work: Path, threads: int, repeat: int) -> dict:
    """Run one configuration in this process; return its figures (outputs saved to work)."""
    calibration, images = _photos()
    compile_s = 0.0
    extra: dict = {}
    if config.startswith("onnxruntime"):
        path = onnx_path
        if config == "onnxruntime-int8":
            start = time.perf_counter()
            path = _ort_quantize(onnx_path, work / "ort-int8.onnx", calibration)
            compile_s = time.perf_counter() - start
        session = _ort_session(path, threads)
        name = session.get_inputs()[0].name

        def infer(x):
            return session.run(None, {name: x})[0]

        size = path.stat().st_size
    elif config in ("qcompile-fp32", "qcompile-int8", "qcompile-int8-tuned"):
        import qcompile

        start = time.perf_counter()
        if config.startswith("qcompile-int8"):
            artifact = qcompile.compile(onnx_path, "host", work / config, quantize="int8",
                                        calibration=[{"images": x} for x in calibration],
                                        tuning_log=None if config.endswith("tuned") else False)
        else:
            artifact = qcompile.compile(onnx_path, "host", work / config)
        compile_s = time.perf_counter() - start
        kernels = artifact.manifest.kernels
        extra["tuned_kernels"] = f"{kernels['tuned']}/{kernels['total']}"
        if kernels["tuning_log"] and kernels["tuned"]:
            info = json.loads((Path(kernels["tuning_log"]) / "qcompile-log.json").read_text())
            extra["tuning_s"] = info.get("tuning_seconds")
        model = qcompile.load(artifact.directory)
        name = model.inputs[0].name

        def infer(x):
            return next(iter(model.run({name: x}).values()))

        size = artifact.manifest.library_bytes
    else:
        raise SystemExit(f"unknown configuration {config}")
    outputs = np.stack([infer(x) for x in images])
    np.save(work / f"{config}.npy", outputs)
    times = _time(lambda: infer(images[0]), repeat)
    return {"config": config, "median_ms": float(np.median(times)),
            "p90_ms": float(np.percentile(times, 90)), "size_bytes": size,
            "compile_s": compile_s, **extra,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _agreement(outputs: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    top1 = float(np.mean(outputs.reshape(len(outputs), -1).argmax(1)
                         == reference.reshape(len(reference), -1).argmax(1)))
    a, b = outputs.reshape(len(outputs), -1), reference.reshape(len(reference), -1)
    cosine = float(np.mean(np.sum(a * b, 1) / (np.linalg.norm(a, axis=1)
                                               * np.linalg.norm(b, axis=1))))
    return top1, cosine


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "latest.json")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ["TVM_NUM_THREADS"] = str(args.threads)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)

    if args.one:  # child process: one configuration
        result = measure_one(args.one, args.work / "model.onnx", args.work, args.threads,
                             args.repeat)
        print(json.dumps(result))
        return 0

    from qcompile.examples import efficientnet_lite0 as effnet

    calibration, held_out = _photos()

    rows = []
    with tempfile.TemporaryDirectory(prefix="qcompile-bench-") as tmp:
        work = Path(tmp)
        effnet.export(work / "model.onnx")
        for config in CONFIGS:
            print(f"bench: efficientnet-lite0 / {config} ...", file=sys.stderr, flush=True)
            proc = subprocess.run([sys.executable, __file__, "--one", config, "--work",
                                   str(work), "--threads", str(args.threads), "--repeat",
                                   str(args.repeat)], capture_output=True, text=True,
                                  env=os.environ)
            if proc.returncode != 0:
                print(proc.stderr, file=sys.stderr)
                return proc.returncode
            rows.append({"model": "efficientnet-lite0",
                         **json.loads(proc.stdout.strip().splitlines()[-1])})
        reference = np.load(work / "onnxruntime-fp32.npy")
        for row in rows:
            row["top1_agreement"], row["cosine"] = _agreement(
                np.load(work / f"{row['config']}.npy"), reference)
    base = {r["model"]: r for r in rows if r["config"] == "onnxruntime-fp32"}
    base_int8 = {r["model"]: r for r in rows if r["config"] == "onnxruntime-int8"}
    for row in rows:
        row["latency_vs_ort_fp32"] = row["median_ms"] / base[row["model"]]["median_ms"]
        row["latency_vs_ort_int8"] = row["median_ms"] / base_int8[row["model"]]["median_ms"]
        row["size_vs_ort_fp32"] = row["size_bytes"] / base[row["model"]]["size_bytes"]

    machine = {"machine": platform.machine(), "processor": _cpu_name(),
               "cores": os.cpu_count(), "threads": args.threads,
               "python": platform.python_version(), "calibration_photos": len(calibration),
               "held_out_photos": len(held_out)}
    header = ("| model | config | median ms | p90 ms | x ort fp32 | x ort int8 | size MB | "
              "x size | top-1 agree | cosine | peak RSS MB | compile s | tuned kernels | "
              "tuning s |")
    print(f"\nMachine: {machine['processor']}, {machine['cores']} cores, "
          f"{args.threads} threads; int8 calibrated on {len(calibration)} photos, agreement "
          f"on {len(held_out)} held-out photos\n")
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for r in rows:
        print(f"| {r['model']} | {r['config']} | {r['median_ms']:.2f} | {r['p90_ms']:.2f} | "
              f"{r['latency_vs_ort_fp32']:.2f} | {r['latency_vs_ort_int8']:.2f} | "
              f"{r['size_bytes'] / 1e6:.1f} | "
              f"{r['size_vs_ort_fp32']:.2f} | {r['top1_agreement']:.3f} | {r['cosine']:.6f} | "
              f"{r['peak_rss_mb']:.0f} | {r['compile_s']:.1f} | {r.get('tuned_kernels', '')} | "
              f"{r.get('tuning_s') or ''} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": machine, "rows": rows}, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return 0


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


if __name__ == "__main__":
    raise SystemExit(main())
