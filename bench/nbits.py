"""A model that arrives with 4-bit weights, compiled: paraphrase-MiniLM-L3-v2 through
onnxruntime's own matmul_nbits_quantizer, side by side with onnxruntime on the same file.

    python bench/nbits.py [--threads 2] [--repeat 30] [--out bench/results/nbits.json]

For each quantizer setting (block 32 and 128, with and without zero points) the MatMulNBits
model is run by:

- onnxruntime, float arithmetic (the quantizer's default accuracy level) and with
  accuracy_level 4 (int8 inputs, its fastest CPU path);
- qcompile without options: W4A16 on the model's codes (what onnxruntime's float path
  computes);
- qcompile --quantize int8 with the 64 calibration sentences: W4A8 on the model's codes, the
  other layers int8.

Prints a Markdown table: the file or library size, the cosine of the sentence embedding to
onnxruntime fp32 on the original model (96 held-out sentences), the largest difference to
onnxruntime's float output on the same 4-bit model, and the median latency with the same
thread count (as a ratio to onnxruntime's accuracy-level-4 run). Writes JSON. Read times as
ratios within one run (bench/README.md); run it alone on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

SETTINGS = ((32, False), (32, True), (128, False))  # (block size, symmetric)


def quantize_nbits(src: Path, dst: Path, block: int, symmetric: bool,
                   accuracy_level: int | None) -> None:
    import logging

    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer)

    logging.getLogger("onnxruntime").setLevel(logging.ERROR)
    config = DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=symmetric,
                                          accuracy_level=accuracy_level)
    quantizer = MatMulNBitsQuantizer(onnx.load(str(src)), algo_config=config)
    quantizer.process()
    quantizer.model.save_model_to_file(str(dst), use_external_data_format=False)


def ort_run(path: Path, feeds: list, output: str, threads: int, repeat: int):
    """(outputs stacked, median seconds of one run on the first feed)."""
    from run import _ort_session

    session = _ort_session(path, threads)
    outputs = np.stack([session.run([output], f)[0] for f in feeds])
    return outputs, _median(lambda: session.run([output], feeds[0]), repeat)


def _median(call, repeat: int) -> float:
    import time

    for _ in range(5):
        call()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def qcompile_run(path: Path, out: Path, bench, feeds: list, repeat: int, **options):
    import qcompile

    qcompile.compile(str(path), "host", out, input_shapes=bench.input_shapes, **options)
    with qcompile.load(out) as model:
        outputs = np.stack([model.run(f)[bench.output] for f in feeds])
        seconds = model.benchmark(feeds[0], repeat=repeat).median_ms / 1e3
    return outputs, seconds, json.loads((out / "quantization.json").read_text())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "nbits.json"))
    args = parser.parse_args()
    os.environ["TVM_NUM_THREADS"] = os.environ["OMP_NUM_THREADS"] = str(args.threads)
    from run import MODELS, _agreement

    bench = MODELS["minilm-l3"]
    calibration, held_out = bench.data()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        src = tmp / "model.onnx"
        bench.export(src)
        reference, _ = ort_run(src, held_out, bench.output, args.threads, 1)
        for block, symmetric in SETTINGS:
            name = f"block {block}, {'symmetric' if symmetric else 'zero points'}"
            print(f"{name} ...", file=sys.stderr, flush=True)
            plain, acc4 = tmp / f"nbits-{block}-{symmetric}.onnx", tmp / f"acc4-{block}.onnx"
            quantize_nbits(src, plain, block, symmetric, None)
            quantize_nbits(src, acc4, block, symmetric, 4)
            ort_float, ort_float_s = ort_run(plain, held_out, bench.output, args.threads,
                                             args.repeat)
            ort_acc4, ort_acc4_s = ort_run(acc4, held_out, bench.output, args.threads,
                                           args.repeat)
            w4a16, w4a16_s, _ = qcompile_run(plain, tmp / f"w4a16-{block}-{symmetric}", bench,
                                             held_out, args.repeat)
            w4a8, w4a8_s, report = qcompile_run(plain, tmp / f"w4a8-{block}-{symmetric}",
                                                bench, held_out, args.repeat,
                                                quantize="int8", calibration=calibration)
            sizes = {"onnx": plain.stat().st_size / 1e6,
                     "w4a16": (tmp / f"w4a16-{block}-{symmetric}" / "model.so").stat().st_size
                     / 1e6,
                     "w4a8": (tmp / f"w4a8-{block}-{symmetric}" / "model.so").stat().st_size
                     / 1e6}
            for engine, outputs, seconds in (
                    ("onnxruntime float", ort_float, ort_float_s),
                    ("onnxruntime accuracy 4", ort_acc4, ort_acc4_s),
                    ("qcompile W4A16", w4a16, w4a16_s), ("qcompile W4A8", w4a8, w4a8_s)):
                size = sizes["onnx" if engine.startswith("onnx") else engine[-5:].lower()]
                rows.append({"setting": name, "engine": engine, "size_mb": size,
                             "cosine": _agreement(outputs, reference)[1],
                             "max_diff_to_ort_float": float(np.abs(outputs - ort_float).max()),
                             "seconds": seconds, "vs_ort_acc4": seconds / ort_acc4_s})
            rows[-1]["four_bit_layers"] = sum(1 for r in report["layers"]  # W4A8's row
                                              if r["precision"].startswith("int4"))
    print("| quantizer setting | engine | size MB | cosine to fp32 | max diff to ORT float | "
          "ms | / ORT acc4 |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['setting']} | {r['engine']} | {r['size_mb']:.1f} | {r['cosine']:.4f} | "
              f"{r['max_diff_to_ort_float']:.2e} | {r['seconds'] * 1e3:.2f} | "
              f"{r['vs_ort_acc4']:.2f} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"threads": args.threads, "repeat": args.repeat, "rows": rows},
                              indent=1) + "\n")
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
