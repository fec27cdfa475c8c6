"""Side-by-side benchmark: qcompile vs onnxruntime on the same machine, in one run.

    python bench/run.py [--threads 2] [--repeat 30] [--rounds 3]
                        [--models efficientnet-lite0,minilm-l3] [--configs CONFIGS]
                        [--out bench/results/latest.json] [--profile]

For each model (MODELS) and each engine configuration it measures, with the same thread count:
latency (median and p90 over repeats, after warm-up), model file size, accuracy against
onnxruntime fp32 on held-out real data (top-1 agreement and output cosine), peak memory (RSS)
of a process that loads and runs the model, compile (or quantization) time and the compile's
peak RSS. qcompile's run RSS is its native runner's (bench/README.md: `qcompile package`, no
Python), its Python runtime's beside it; onnxruntime's is its Python process's. Each
configuration is prepared (compiled or quantized, and packaged) in one fresh subprocess and run
in another, so that each RSS is its own; the running RSS is taken after timing, before the
held-out data is loaded for the accuracy. Each model's data is made once and shared by the
subprocesses. The configurations are then timed again in turn, `--rounds` in all, each in a
fresh process, and each latency is the median of its rounds' figures: on a shared machine whose
speed drifts, a slow minute then falls on every engine instead of on one. Prints a Markdown
table and writes JSON. No asserts: the figures are read off the table.

Configurations: onnxruntime fp32 and int8 (its quantize_static: QDQ, per-channel, uint8
activations, minmax), qcompile fp32, int8 with default schedules (no tuning log), int8 with
the tuning log shipped in tuning_logs/host (its tuning time is read from the log: how long the
tune that wrote it took), int4 (MiniLM: --weight-bits 4 --tables int4, 4-bit MatMul/Gemm
weights and embedding; EfficientNet-Lite0: --quantize auto --weight-bits 4 with a budget of
plain int8's top-1 agreement less 1.5 points, 4-bit weights where that allows), and
--quantize auto (the precision search against an accuracy
budget, validated on half of the held-out data; its accuracy is also given on the other,
untouched half). Every int8 configuration of a model is calibrated on the same samples.

Models: EfficientNet-Lite0 on real photos (top-1), paraphrase-MiniLM-L3-v2 on real sentences
(the sentence embedding's cosine), and a small conv net and a small Gemm/MatMul net that the
tests build (random inputs).

--profile adds each model's per-kernel profile (qcompile profile) beside onnxruntime's own
per-op profile (SessionOptions.enable_profiling), both saved as JSON in profiles/ beside --out,
the top 5 of each printed side by side.

A separate section (bench/phone.py; --no-phone skips it) builds EfficientNet-Lite0 int8
for arm64-dotprod and arm64-i8mm, counts sdot/udot/smmla/ummla in each library and runs it on
the emulated ARM64 device: correctness and instruction mix, never timings.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
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
sys.path.insert(0, str(ROOT))  # this checkout's qcompile, installed or not
BASE_CONFIGS = ("onnxruntime-fp32", "onnxruntime-int8")
# run only when --configs names them: reconstruction and pruning take minutes a model
OPT_IN_CONFIGS = ("qcompile-int4-refit", "qcompile-int8-pruned", "qcompile-lut4")
ALL_CONFIGS = ("onnxruntime-fp32", "onnxruntime-int8", "qcompile-fp32", "qcompile-int8",
               "qcompile-int8-tuned", "qcompile-int4", "qcompile-auto", *OPT_IN_CONFIGS)


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
    # qcompile-int4 (and -lut4, with --palettes): None, every layer with a 4-bit kernel in 4
    # bits (--weight-bits 4 --tables int4); a budget, 4 bits where `metric` stays above it
    # (--quantize auto --weight-bits 4)
    int4_budget: float | None = None
    # qcompile-int8-pruned: --prune structured --macs-budget this, then int8
    prune_budget: float = 0.9


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


SMALL_CONFIGS = ("onnxruntime-fp32", "onnxruntime-int8", "qcompile-fp32", "qcompile-int8")


def _tests_model(name: str, builder: str, calibration: int = 32,
                 held_out: int = 64) -> BenchModel:
    """A small model that tests/models.py builds (the function `builder`), on random inputs."""
    def build():
        import models

        return getattr(models, builder)()

    def export(path: Path) -> None:
        import onnx

        onnx.save(build(), str(path))

    def data():
        from models import random_inputs

        model = build()
        feeds = [random_inputs(model, seed) for seed in range(calibration + held_out)]
        return feeds[:calibration], feeds[calibration:]

    return BenchModel(name, export, data, configs=SMALL_CONFIGS, metric="cosine")


MODELS = {m.name: m for m in (
    # int4: plain int8's top-1 agreement (0.957) less 1.5 points
    BenchModel("efficientnet-lite0", _effnet_export, _photos, int4_budget=0.94),
    BenchModel("minilm-l3", _minilm_export, _sentences, output="461",
               input_shapes={"input_ids": (1, 64), "attention_mask": (1, 64)},
               configs=("onnxruntime-fp32", "onnxruntime-int8", "qcompile-fp32",
                        "qcompile-int8", "qcompile-int4", "qcompile-auto",
                        "qcompile-int8-pruned"), metric="cosine"),
    _tests_model("small-convnet", "packed_convnet"),
    _tests_model("small-matmul", "gemm_matmul"),
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


def _peak_rss_mb() -> float:
    """This process's peak resident memory so far (VmHWM), in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _searched(bench: BenchModel, config: str) -> bool:
    """Whether the configuration is a precision search, validated on half the held-out data."""
    return config == "qcompile-auto" or (config in ("qcompile-int4", "qcompile-lut4") and
                                         bench.int4_budget is not None)


def _load_data(directory: Path) -> tuple[list[dict], list[dict]]:
    with open(directory / "data.pkl", "rb") as f:
        return pickle.load(f)


def prepare_one(bench: BenchModel, config: str, work: Path) -> dict:
    """Make one configuration's model (onnxruntime's quantize_static, or qcompile's compile)
    in this process; return the compile figures. The model goes beside the model's ONNX file."""
    directory = work / bench.name
    onnx_path = directory / "model.onnx"
    extra: dict = {}
    start = time.perf_counter()
    if config == "onnxruntime-int8":
        calibration, _ = _load_data(directory)
        _ort_quantize(onnx_path, directory / "ort-int8.onnx", calibration)
    elif config.startswith("qcompile"):
        import qcompile

        calibration, held_out = _load_data(directory)
        options: dict = {"input_shapes": bench.input_shapes}
        if config == "qcompile-auto":
            options.update(quantize="auto", calibration=calibration,
                           validation=held_out[::2], accuracy_budget=bench.budget,
                           metric=bench.metric, tuning_log=None)
        elif config == "qcompile-int8-pruned":
            options.update(quantize="int8", calibration=calibration, tuning_log=False,
                           prune="structured", macs_budget=bench.prune_budget)
        elif config == "qcompile-int4-refit":  # every 4-bit kernel, reconstruction
            from qcompile.quantize import QuantConfig

            options.update(quantize="int8", calibration=calibration, tuning_log=False,
                           quant_config=QuantConfig(weight_bits=4, reconstruct=True))
        elif config.startswith("qcompile-int8"):
            options.update(quantize="int8", calibration=calibration,
                           tuning_log=None if config.endswith("tuned") else False)
        elif config in ("qcompile-int4", "qcompile-lut4"):  # uniform codes, or palettes
            from qcompile.quantize import QuantConfig

            four = {"weight_bits": 4, "palettes": config == "qcompile-lut4"}
            if _searched(bench, config):  # 4 bits where the budget allows
                options.update(quantize="auto", calibration=calibration,
                               validation=held_out[::2], accuracy_budget=bench.int4_budget,
                               metric=bench.metric, tuning_log=False,
                               quant_config=QuantConfig(**four))
            else:  # 4-bit weights wherever a kernel takes them
                options.update(quantize="int8", calibration=calibration, tuning_log=False,
                               quant_config=QuantConfig(**four, tables="int4"))
        del held_out
        artifact = qcompile.compile(onnx_path, "host", directory / config, **options)
        from qcompile.deploy import package

        package(artifact.directory, directory / f"{config}-bundle")  # the native runner's
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
            extra["four_bit_layers"] = len(found.get("four_bit_weights", []))
    elif config != "onnxruntime-fp32":
        raise SystemExit(f"unknown configuration {config}")
    compile_s = time.perf_counter() - start
    return {"compile_s": compile_s if config != "onnxruntime-fp32" else 0.0,
            "compile_rss_mb": _peak_rss_mb(), **extra}


def _load_for_timing(bench: BenchModel, config: str, work: Path, threads: int):
    """(infer(feed) -> the output array, the model's size in bytes) for one prepared
    configuration, loaded in this process."""
    directory = work / bench.name
    if config.startswith("onnxruntime"):
        path = directory / ("ort-int8.onnx" if config == "onnxruntime-int8" else "model.onnx")
        session = _ort_session(path, threads)
        output = bench.output or session.get_outputs()[0].name

        def infer(feed):
            return session.run([output], feed)[0]

        return infer, path.stat().st_size
    import qcompile

    model = qcompile.load(directory / config)
    output = bench.output

    def infer(feed):
        outputs = model.run(feed)
        return outputs[output] if output else next(iter(outputs.values()))

    return infer, model.manifest.library_bytes


def _timed(bench: BenchModel, config: str, work: Path, threads: int, repeat: int):
    """(infer, the figures): one prepared configuration loaded in this process and timed on one
    held-out sample (`repeat` runs, in Python, as a user's code calls it; a qcompile build also
    by its native runner); the peak RSS is taken then (the runtime, the model and one input)."""
    directory = work / bench.name
    with open(directory / "sample.pkl", "rb") as f:
        sample = pickle.load(f)
    infer, size = _load_for_timing(bench, config, work, threads)
    times = _time(lambda: infer(sample), repeat)
    peak_rss = _peak_rss_mb()
    native = _native_run(directory, config, sample, threads, repeat) \
        if config.startswith("qcompile") else {}
    return infer, {"config": config, "times_ms": times, "size_bytes": size,
                   "peak_rss_mb": native.get("peak_rss_mb", peak_rss), "python_rss_mb": peak_rss,
                   **{k: v for k, v in native.items() if k != "peak_rss_mb"}}


def time_one(bench: BenchModel, config: str, work: Path, threads: int, repeat: int) -> dict:
    """Load one prepared configuration in a fresh process and time it (_timed)."""
    return _timed(bench, config, work, threads, repeat)[1]


def run_one(bench: BenchModel, config: str, work: Path, threads: int, repeat: int) -> dict:
    """time_one, then every held-out sample run by the same loaded model and the outputs saved
    beside the model's ONNX file for the accuracy."""
    infer, result = _timed(bench, config, work, threads, repeat)
    _, held_out = _load_data(work / bench.name)
    outputs = np.stack([np.asarray(infer(feed)) for feed in held_out])
    np.save(work / bench.name / f"{config}.npy", outputs)
    return result


def _native_run(directory: Path, config: str, sample: dict, threads: int, repeat: int) -> dict:
    """The configuration's bundle run by its native runner (no Python) on the sample: its peak
    resident memory and median latency, as qcompile-run prints them."""
    import re

    np.savez(directory / "sample.npz", **sample)
    bundle = directory / f"{config}-bundle"
    done = subprocess.run([str(bundle / "bin" / "qcompile-run"), str(bundle), "--inputs",
                           str(directory / "sample.npz"), "--repeat", str(repeat),
                           "--threads", str(threads)], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"bench: the native runner failed on {config}: {done.stderr.strip()}")
    rss = re.search(r"peak resident memory: ([0-9.]+) MB", done.stdout)
    median = re.search(r"median ([0-9.]+) ms", done.stdout)
    return {"peak_rss_mb": float(rss.group(1)), "native_median_ms": float(median.group(1))}


def profile_pair(name: str, onnx_path: Path, build: Path, sample: dict, out: Path,
                 threads: int, runs: int = 20) -> str:
    """onnxruntime's own per-op profile of `onnx_path` (SessionOptions.enable_profiling, over
    `runs` runs) and qcompile's per-kernel profile of the build `build`, on `sample`, written
    as OUT/NAME-onnxruntime.json (onnxruntime's trace, as it writes it) and
    OUT/NAME-qcompile.json; returns the top 5 of each, per run, side by side."""
    import onnxruntime as ort

    from qcompile.profile import profile

    out.mkdir(parents=True, exist_ok=True)
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.enable_profiling = True
    options.profile_file_prefix = str(out / f"{name}-onnxruntime")
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    for _ in range(runs):
        session.run(None, sample)
    trace = out / f"{name}-onnxruntime.json"
    os.replace(session.end_profiling(), trace)
    events = json.loads(trace.read_text())
    ort_ops: dict[str, float] = {}
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            key = f"{event['args'].get('op_name', '?')} {event['name'][:-len('_kernel_time')]}"
            ort_ops[key] = ort_ops.get(key, 0.0) + event["dur"] / 1e3 / runs  # ms per run
    ort_total = sum(ort_ops.values()) or 1.0
    ours = profile(build, sample)
    ours.save(out / f"{name}-qcompile.json")
    left = [f"{k.total_us / 1e3:7.3f} ms {k.share:4.0%} {k.name[:38]}" for k in ours.kernels[:5]]
    right = [f"{ms:7.3f} ms {ms / ort_total:4.0%} {op[:38]}"
             for op, ms in sorted(ort_ops.items(), key=lambda item: -item[1])[:5]]
    lines = [f"{name}: top 5 per run, qcompile kernels ({ours.kernels_ms:.3f} ms in all) | "
             f"onnxruntime ops ({ort_total:.3f} ms in all)"]
    for i in range(max(len(left), len(right))):
        lines.append(f"  {left[i] if i < len(left) else '':<56} | "
                     f"{right[i] if i < len(right) else ''}")
    return "\n".join(lines)


def _profile_model(bench: BenchModel, work: Path, args) -> str:
    """profile_pair for the model's int8 configurations (fp32 where it has no int8 ones)."""
    directory = work / bench.name
    with open(directory / "sample.pkl", "rb") as f:
        sample = pickle.load(f)
    int8 = "qcompile-int8" in bench.configs and "onnxruntime-int8" in bench.configs
    return profile_pair(bench.name, directory / ("ort-int8.onnx" if int8 else "model.onnx"),
                        directory / ("qcompile-int8" if int8 else "qcompile-fp32"), sample,
                        args.out.parent / "profiles", args.threads)


def _agreement(outputs: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    top1 = float(np.mean(outputs.reshape(len(outputs), -1).argmax(1)
                         == reference.reshape(len(reference), -1).argmax(1)))
    a, b = outputs.reshape(len(outputs), -1), reference.reshape(len(reference), -1)
    cosine = float(np.mean(np.sum(a * b, 1) / (np.linalg.norm(a, axis=1)
                                               * np.linalg.norm(b, axis=1))))
    return top1, cosine


def _child(phase: str, config: str, bench: BenchModel, work: Path, args) -> dict:
    """Run one phase of one configuration in a fresh process (its RSS is its own)."""
    proc = subprocess.run([sys.executable, __file__, "--one", config, "--phase", phase,
                           "--model", bench.name, "--work", str(work),
                           "--threads", str(args.threads), "--repeat", str(args.repeat)],
                          capture_output=True, text=True, env=os.environ)
    if proc.returncode != 0:
        print(proc.stderr, file=sys.stderr)
        raise SystemExit(f"bench: {bench.name} / {config} ({phase}) failed with exit code "
                         f"{proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _round_figures(result: dict) -> dict:
    """One timing round's median and p90 (and the native runner's median) of a child's result."""
    times = result["times_ms"]
    figures = {"median_ms": float(np.median(times)), "p90_ms": float(np.percentile(times, 90))}
    if "native_median_ms" in result:
        figures["native_median_ms"] = result["native_median_ms"]
    return figures


def _bench_model(bench: BenchModel, work: Path, args) -> list[dict]:
    (work / bench.name).mkdir(parents=True, exist_ok=True)
    onnx_path = work / bench.name / "model.onnx"
    bench.export(onnx_path)
    started = time.perf_counter()
    calibration, held_out = bench.data()  # once per model: decoding 300 photos takes minutes
    with open(work / bench.name / "data.pkl", "wb") as f:
        pickle.dump((calibration, held_out), f)
    with open(work / bench.name / "sample.pkl", "wb") as f:
        pickle.dump(held_out[0], f)
    print(f"bench: {bench.name}: {len(calibration)} calibration and {len(held_out)} held-out "
          f"samples ({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)
    rows = []
    wanted = set(args.configs.split(",")) if args.configs else \
        set(bench.configs) - set(OPT_IN_CONFIGS)
    for config in [c for c in bench.configs if c in wanted | set(BASE_CONFIGS)]:
        print(f"bench: {bench.name} / {config} ...", file=sys.stderr, flush=True)
        started = time.perf_counter()
        row = {"model": bench.name}
        for phase in ("prepare", "run"):
            row.update(_child(phase, config, bench, work, args))
        row["wall_s"] = time.perf_counter() - started
        row["rounds"] = [_round_figures(row)]
        rows.append(row)
    # The machine's speed drifts (other jobs on the host): the configurations are timed again
    # in turn, round after round, and each figure is the median of its rounds' medians.
    for number in range(2, args.rounds + 1):
        print(f"bench: {bench.name}: timing round {number} of {args.rounds}", file=sys.stderr,
              flush=True)
        for row in rows:
            row["rounds"].append(_round_figures(_child("time", row["config"], bench, work,
                                                       args)))
    for row in rows:
        del row["times_ms"]  # the first round's; each round's figures are kept
        row["median_ms"] = float(np.median([r["median_ms"] for r in row["rounds"]]))
        row["p90_ms"] = float(np.median([r["p90_ms"] for r in row["rounds"]]))
        if "native_median_ms" in row:
            row["native_median_ms"] = float(np.median([r["native_median_ms"]
                                                       for r in row["rounds"]]))
    reference = np.load(work / bench.name / "onnxruntime-fp32.npy")
    base = next(r for r in rows if r["config"] == "onnxruntime-fp32")
    base_int8 = next(r for r in rows if r["config"] == "onnxruntime-int8")
    for row in rows:
        outputs = np.load(work / bench.name / f"{row['config']}.npy")
        row["top1_agreement"], row["cosine"] = _agreement(outputs, reference)
        if _searched(bench, row["config"]):  # the half the search never saw
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
    parser.add_argument("--rounds", type=int, default=3,
                        help="timing rounds: every configuration is timed in turn, ROUNDS "
                             "times, and its latency is the median of the rounds' medians "
                             "(this machine's speed drifts as other jobs come and go)")
    parser.add_argument("--models", default=",".join(MODELS),
                        help=f"comma-separated, from: {', '.join(MODELS)}")
    parser.add_argument("--configs",
                        help=f"comma-separated, from: {', '.join(ALL_CONFIGS)} (default: each "
                             f"model's own; {' and '.join(BASE_CONFIGS)} always run: the "
                             "ratios are to them)")
    parser.add_argument("--phone", action=argparse.BooleanOptionalAction, default=True,
                        help="the emulated-phone section: EfficientNet-Lite0 built for ARM64 "
                             "and run under qemu (about 4 min; on by default)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "latest.json")
    parser.add_argument("--profile", action="store_true",
                        help="also profile each model's int8 build per kernel (qcompile "
                             "profile) and onnxruntime's per op (its enable_profiling), save "
                             "both JSON files in profiles/ beside --out and print the top 5 of "
                             "each side by side")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--phase", choices=("prepare", "run", "time"), help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ["TVM_NUM_THREADS"] = str(args.threads)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)

    if args.one:  # child process: one configuration
        bench = MODELS[args.model]
        if args.phase in ("run", "time") and args.one.startswith("qcompile"):
            # tvm_ffi imports torch whenever it is installed (here: for the test models), which
            # adds about 530 MB and 2.4 s to a process that only runs a compiled model
            sys.modules["torch"] = None
        if args.phase == "prepare":
            result = prepare_one(bench, args.one, args.work)
        elif args.phase == "time":
            result = time_one(bench, args.one, args.work, args.threads, args.repeat)
        else:
            result = run_one(bench, args.one, args.work, args.threads, args.repeat)
        print(json.dumps(result))
        return 0

    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        parser.error(f"unknown model {unknown[0]!r}: choose from {', '.join(MODELS)}")
    unknown = [c for c in (args.configs or "").split(",") if c and c not in ALL_CONFIGS]
    if unknown:
        parser.error(f"unknown configuration {unknown[0]!r}: choose from "
                     f"{', '.join(ALL_CONFIGS)}")
    started = time.perf_counter()
    rows, side_by_side = [], []
    with tempfile.TemporaryDirectory(prefix="qcompile-bench-") as tmp:
        for name in names:
            rows += _bench_model(MODELS[name], Path(tmp), args)
            if args.profile:
                side_by_side.append(_profile_model(MODELS[name], Path(tmp), args))
        phone = []
        if "efficientnet-lite0" in names and args.phone:
            from phone import phone_rows

            from qcompile.errors import QcompileError

            calibration, held_out = _load_data(Path(tmp) / "efficientnet-lite0")
            try:
                phone = phone_rows(Path(tmp) / "efficientnet-lite0" / "model.onnx",
                                   Path(tmp) / "phone", calibration, held_out,
                                   np.load(Path(tmp) / "efficientnet-lite0"
                                           / "onnxruntime-fp32.npy"))
            except (QcompileError, OSError, subprocess.CalledProcessError) as exc:
                # e.g. no qemu or cross binutils yet (`bash tests/run` installs them): the
                # host tables are still worth having
                print(f"bench: the emulated-phone section is skipped: {exc}. Install what it "
                      "names (or run `bash tests/run` once), or pass --no-phone.",
                      file=sys.stderr)
    total_s = time.perf_counter() - started

    machine = {"machine": platform.machine(), "processor": _cpu_name(),
               "cores": os.cpu_count(), "threads": args.threads,
               "python": platform.python_version(), "total_s": total_s}
    header = ("| model | config | median ms | p90 ms | x ort fp32 | x ort int8 | size MB | "
              "x size | top-1 agree | cosine | run RSS MB | Python RSS MB | native ms | "
              "compile s | compile RSS MB | tuned kernels | tuning s |")
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
            four = r.get("four_bit_layers")
            compile_s += (f" (search {r['search_s']:.0f}, {r['int8_mac_fraction']:.0%} MACs int8"
                          + (f", {four} layer(s) 4-bit" if four else "") + ")")
        print(f"| {r['model']} | {r['config']} | {r['median_ms']:.2f} | {r['p90_ms']:.2f} | "
              f"{r['latency_vs_ort_fp32']:.2f} | {r['latency_vs_ort_int8']:.2f} | "
              f"{r['size_bytes'] / 1e6:.1f} | {r['size_vs_ort_fp32']:.2f} | {top1} | {cosine} | "
              f"{r['peak_rss_mb']:.0f} | {r['python_rss_mb']:.0f} | "
              f"{r.get('native_median_ms', '')} | {compile_s} | {r['compile_rss_mb']:.0f} | "
              f"{r.get('tuned_kernels', '')} | "
              f"{r.get('tuning_s') or ''} |")
    print("\n* on the half of the held-out data that the precision search did not validate on")
    for text in side_by_side:
        print(f"\n{text}")
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
