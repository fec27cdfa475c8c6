"""Side-by-side benchmark: qcompile vs onnxruntime on the same machine, in one run.

    python bench/run.py [--threads 2] [--repeat 30] [--out bench/results/latest.json]

For each model and each engine configuration it measures, with the same thread count:
latency (median and p90 over repeats, after warm-up), model file size, top-1 agreement and
output cosine against onnxruntime fp32 on real photos, peak memory (RSS) of the process that
runs it, and compile time. Each configuration runs in a fresh subprocess so that RSS is its
own. Prints a Markdown table and writes JSON. No asserts: goals are read off the table.

Configurations so far: onnxruntime fp32, qcompile fp32 (untuned). int8, tuned and mixed
precision rows join as those features land.
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
CONFIGS = ("onnxruntime-fp32", "qcompile-fp32")


def _photos_batch():
    from qcompile.examples import efficientnet_lite0 as effnet
    from qcompile.examples.photos import photos

    return [effnet.preprocess(image) for image in photos().values()]


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
    images = _photos_batch()
    compile_s = 0.0
    if config == "onnxruntime-fp32":
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        session = ort.InferenceSession(str(onnx_path), options,
                                       providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name

        def infer(x):
            return session.run(None, {name: x})[0]

        size = onnx_path.stat().st_size
    elif config == "qcompile-fp32":
        import qcompile

        start = time.perf_counter()
        artifact = qcompile.compile(onnx_path, "host", work / config)
        compile_s = time.perf_counter() - start
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
            "compile_s": compile_s,
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
    from qcompile.examples.photos import PHOTOS

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
    for row in rows:
        row["latency_vs_ort_fp32"] = row["median_ms"] / base[row["model"]]["median_ms"]
        row["size_vs_ort_fp32"] = row["size_bytes"] / base[row["model"]]["size_bytes"]

    machine = {"machine": platform.machine(), "processor": _cpu_name(),
               "cores": os.cpu_count(), "threads": args.threads,
               "python": platform.python_version()}
    header = ("| model | config | median ms | p90 ms | x ort fp32 | size MB | x size | "
              "top-1 agree | cosine | peak RSS MB | compile s |")
    print(f"\nMachine: {machine['processor']}, {machine['cores']} cores, "
          f"{args.threads} threads, {len(PHOTOS)} photos for agreement\n")
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for r in rows:
        print(f"| {r['model']} | {r['config']} | {r['median_ms']:.2f} | {r['p90_ms']:.2f} | "
              f"{r['latency_vs_ort_fp32']:.2f} | {r['size_bytes'] / 1e6:.1f} | "
              f"{r['size_vs_ort_fp32']:.2f} | {r['top1_agreement']:.3f} | {r['cosine']:.6f} | "
              f"{r['peak_rss_mb']:.0f} | {r['compile_s']:.1f} |")
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
