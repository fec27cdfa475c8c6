"""Side-by-side benchmark: qcompile vs onnxruntime on the same machine, in one run.

    python bench/run.py [--threads 2] [--repeat 30] [--models efficientnet-lite0,minilm-l3]
                        [--out bench/results/latest.json]

For each model (MODELS) and each engine configuration it measures, with the same thread count:
latency (median and p90 over repeats, after warm-up), model file size, accuracy against
onnxruntime fp32 on held-out real data (top-1 agreement and output cosine), peak memory (RSS)
of the process that runs it, and compile (or quantization) time. Each configuration runs in a
fresh subprocess so that RSS is its own. Prints a Markdown table and writes JSON. No asserts:
goals are read off the table.

Configurations: onnxruntime fp32 and int8 (its quantize_static: QDQ, per-channel, uint8
activations, minmax), qcompile fp32, int8 with default schedules (no tuning log), int8 with
the tuning log shipped in tuning_logs/host (its tuning time is read from the log: how long the
tune that wrote it took), and --quantize auto (the precision search against an accuracy
budget, validated on half of the held-out data; its accuracy is also given on the other,
untouched half). Every int8 configuration of a model is calibrated on the same samples.

Models: EfficientNet-Lite0 on real photos (top-1), paraphrase-MiniLM-L3-v2 on real sentences
(the sentence embedding's cosine), and a small conv net the tests build (random inputs).

A separate section (bench/phone.py, with --phone) builds EfficientNet-Lite0 int8
for arm64-dotprod and arm64-i8mm, counts sdot/udot/smmla/ummla in each library and runs it on
the emulated ARM64 device: correctness and instruction mix, never timings.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the sentences and the small models live with the tests
ALL_CONFIGS = ("onnxruntime-fp32", "onnxruntime-int8", "qcompile-fp32", "qcompile-int8",
               "qcompile-int8-tuned", "qcompile-auto")


@dataclass(frozen=True)
class BenchModel:
    """A model of the benchmark: how to write its ONNX file, its data, how to judge it."""

    name: str
    export: Callable[[Path], None]
    data: Callable[[], tuple[list[dict], list[dict]]]  # (calibration, held-out) feeds
    output: str | None = None      # the output compared (None: the first)
    input_shapes: dict | None = None
    configs: tuple[str, ...] = ALL_CONFIGS
    metric: str = "top1"           # the --quantize auto budget's metric
    budget: float = 0.99


def _effnet_export(path: Path) -> None:
    from qcompile.examples import efficientnet_lite0 as effnet

    effnet.export(path)


def _photos():
    """(calibration, held-out evaluation) feeds: 32 photos spread over the collection, and
    all the others (accuracy is measured on the held-out photos only)."""
    from qcompile.examples import efficientnet_lite0 as effnet
    from qcompile.examples.photos import calibration_split, photo_collection

    xs = [{"images": effnet.preprocess(image)} for _, image in photo_collection()]
    return calibration_split(xs)


def _minilm_export(path: Path) -> None:
    import shutil

    import sentences

    shutil.copyfile(sentences.minilm_onnx_path(), path)


def _sentences():
    """64 fortunes to calibrate, the next 96 held out (64 tokens each)."""
    import sentences

    feeds = sentences.encode(sentences.fortunes(160), seq_len=64)
    return feeds[:64], feeds[64:]


def _convnet_export(path: Path) -> None:
    import onnx

    onnx.save(_packed_convnet(), str(path))


def _random(model_fn, calibration: int = 32, held_out: int = 64):
    def data():
        from models import random_inputs

        model = model_fn()
        feeds = [random_inputs(model, seed) for seed in range(calibration + held_out)]
        return feeds[:calibration], feeds[calibration:]
    return data


def _packed_convnet():
    from models import packed_convnet

    return packed_convnet()


MODELS = {m.name: m for m in (
    BenchModel("efficientnet-lite0", _effnet_export, _photos),
    BenchModel("minilm-l3", _minilm_export, _sentences, output="461",
               input_shapes={"input_ids": (1, 64), "attention_mask": (1, 64)},
               configs=("onnxruntime-fp32", "onnxruntime-int8", "qcompile-fp32",
                        "qcompile-int8", "qcompile-auto"), metric="cosine"),
    BenchModel("small-convnet", _convnet_export, _random(_packed_convnet),
               configs=("onnxruntime-fp32", "onnxruntime-int8", "qcompile-fp32",
                        "qcompile-int8"), metric="cosine"),
)}


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
            return next(self.samples, None)

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


def measure_one(bench: BenchModel, config: str, work: Path, threads: int, repeat: int) -> dict:
    """Run one configuration in this process; return its figures (outputs saved in the
    model's directory under work, beside its model.onnx)."""
    directory = work / bench.name
    onnx_path = directory / "model.onnx"
    calibration, held_out = bench.data()
    compile_s = 0.0
    extra: dict = {}
    if config.startswith("onnxruntime"):
        path = onnx_path
        if config == "onnxruntime-int8":
            start = time.perf_counter()
            path = _ort_quantize(onnx_path, directory / "ort-int8.onnx", calibration)
            compile_s = time.perf_counter() - start
        session = _ort_session(path, threads)
        output = bench.output or session.get_outputs()[0].name

        def infer(feed):
            return session.run([output], feed)[0]

        size = path.stat().st_size
    elif config.startswith("qcompile"):
        import qcompile

        options: dict = {"input_shapes": bench.input_shapes}
        if config == "qcompile-auto":
            options.update(quantize="auto", calibration=calibration,
                           validation=held_out[::2], accuracy_budget=bench.budget,
                           metric=bench.metric, tuning_log=None)
        elif config.startswith("qcompile-int8"):
            options.update(quantize="int8", calibration=calibration,
                           tuning_log=None if config.endswith("tuned") else False)
        start = time.perf_counter()
        artifact = qcompile.compile(onnx_path, "host", directory / config, **options)
        compile_s = time.perf_counter() - start
        kernels = artifact.manifest.kernels
        extra["tuned_kernels"] = f"{kernels['tuned']}/{kernels['total']}"
        if kernels["tuning_log"] and kernels["tuned"]:
            info = json.loads((Path(kernels["tuning_log"]) / "qcompile-log.json").read_text())
            extra["tuning_s"] = info.get("tuning_seconds")
        search = artifact.directory / "search.json"
        if search.is_file():
            found = json.loads(search.read_text())
            extra["int8_mac_fraction"] = found["int8_mac_fraction"]
            extra["search_s"] = found["seconds"]
        model = qcompile.load(artifact.directory)
        output = bench.output

        def infer(feed):
            outputs = model.run(feed)
            return outputs[output] if output else next(iter(outputs.values()))

        size = artifact.manifest.library_bytes
    else:
        raise SystemExit(f"unknown configuration {config}")
    outputs = np.stack([np.asarray(infer(feed)) for feed in held_out])
    np.save(directory / f"{config}.npy", outputs)
    times = _time(lambda: infer(held_out[0]), repeat)
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


def _bench_model(bench: BenchModel, work: Path, args) -> list[dict]:
    (work / bench.name).mkdir(parents=True, exist_ok=True)
    onnx_path = work / bench.name / "model.onnx"
    bench.export(onnx_path)
    rows = []
    for config in bench.configs:
        print(f"bench: {bench.name} / {config} ...", file=sys.stderr, flush=True)
        started = time.perf_counter()
        proc = subprocess.run([sys.executable, __file__, "--one", config, "--model", bench.name,
                               "--work", str(work), "--threads", str(args.threads),
                               "--repeat", str(args.repeat)], capture_output=True, text=True,
                              env=os.environ)
        if proc.returncode != 0:
            print(proc.stderr, file=sys.stderr)
            raise SystemExit(proc.returncode)
        row = {"model": bench.name, **json.loads(proc.stdout.strip().splitlines()[-1]),
               "wall_s": time.perf_counter() - started}
        rows.append(row)
    reference = np.load(work / bench.name / "onnxruntime-fp32.npy")
    base = next(r for r in rows if r["config"] == "onnxruntime-fp32")
    base_int8 = next(r for r in rows if r["config"] == "onnxruntime-int8")
    for row in rows:
        outputs = np.load(work / bench.name / f"{row['config']}.npy")
        row["top1_agreement"], row["cosine"] = _agreement(outputs, reference)
        if row["config"] == "qcompile-auto":  # the half the search never saw
            row["untouched_top1"], row["untouched_cosine"] = _agreement(outputs[1::2],
                                                                        reference[1::2])
        row["latency_vs_ort_fp32"] = row["median_ms"] / base["median_ms"]
        row["latency_vs_ort_int8"] = row["median_ms"] / base_int8["median_ms"]
        row["size_vs_ort_fp32"] = row["size_bytes"] / base["size_bytes"]
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--models", default=",".join(MODELS),
                        help=f"comma-separated, from: {', '.join(MODELS)}")
    parser.add_argument("--phone", action="store_true",
                        help="add the emulated-phone section (ARM64 builds run under qemu)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "latest.json")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ["TVM_NUM_THREADS"] = str(args.threads)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)

    if args.one:  # child process: one configuration
        bench = MODELS[args.model]
        result = measure_one(bench, args.one, args.work, args.threads, args.repeat)
        print(json.dumps(result))
        return 0

    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        parser.error(f"unknown model {unknown[0]!r}: choose from {', '.join(MODELS)}")
    started = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory(prefix="qcompile-bench-") as tmp:
        for name in names:
            rows += _bench_model(MODELS[name], Path(tmp), args)
        phone = []
        if "efficientnet-lite0" in names and args.phone:
            from phone import phone_rows

            calibration, held_out = MODELS["efficientnet-lite0"].data()
            phone = phone_rows(Path(tmp) / "efficientnet-lite0" / "model.onnx",
                               Path(tmp) / "phone", calibration, held_out,
                               np.load(Path(tmp) / "efficientnet-lite0" / "onnxruntime-fp32.npy"))
    total_s = time.perf_counter() - started

    machine = {"machine": platform.machine(), "processor": _cpu_name(),
               "cores": os.cpu_count(), "threads": args.threads,
               "python": platform.python_version(), "total_s": total_s}
    header = ("| model | config | median ms | p90 ms | x ort fp32 | x ort int8 | size MB | "
              "x size | top-1 agree | cosine | peak RSS MB | compile s | tuned kernels | "
              "tuning s |")
    print(f"\nMachine: {machine['processor']}, {machine['cores']} cores, {args.threads} "
          f"threads; accuracy against onnxruntime fp32 on held-out data; the whole run took "
          f"{total_s / 60:.1f} min\n")
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for r in rows:
        top1, cosine = f"{r['top1_agreement']:.3f}", f"{r['cosine']:.4f}"
        if "untouched_top1" in r:
            top1 += f" ({r['untouched_top1']:.3f}*)"
            cosine += f" ({r['untouched_cosine']:.4f}*)"
        compile_s = f"{r['compile_s']:.1f}"
        if "int8_mac_fraction" in r:
            compile_s += f" (search {r['search_s']:.0f}, {r['int8_mac_fraction']:.0%} MACs int8)"
        print(f"| {r['model']} | {r['config']} | {r['median_ms']:.2f} | {r['p90_ms']:.2f} | "
              f"{r['latency_vs_ort_fp32']:.2f} | {r['latency_vs_ort_int8']:.2f} | "
              f"{r['size_bytes'] / 1e6:.1f} | {r['size_vs_ort_fp32']:.2f} | {top1} | {cosine} | "
              f"{r['peak_rss_mb']:.0f} | {compile_s} | {r.get('tuned_kernels', '')} | "
              f"{r.get('tuning_s') or ''} |")
    print("\n* on the half of the held-out data that the precision search did not validate on")
    if phone:
        from phone import print_rows

        print_rows(phone)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": machine, "rows": rows, "emulated_phone": phone},
                                   indent=2) + "\n")
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
