"""4-bit weights against 8-bit ones and against onnxruntime's MatMulNBits, in one run.

    python bench/int4.py [--threads 2] [--repeat 50] [--shapes 4096x4096,576x1536,...]
                         [--out bench/results/int4.json]
    python bench/int4.py --minilm [--out bench/results/int4-minilm.json]

For each matrix shape K x N, one-row MatMuls (a language model decoding one token) are built
as ONNX with seeded weights: L independent layers of that shape on the same input, L chosen so
that their 4-bit weights fill twice the last-level cache (at most 64 layers), because a
decoding model's weights come from memory, not from the cache, on every token. Each is
measured, with the same thread count, as:

- qcompile int8: per-channel int8 weights on the packed dot-product kernel;
- qcompile int4: W4A8, 4-bit weights in groups of 32 with fp16 scales (--weight-bits 4);
- qcompile lut4: the same with palette codes (--palettes: a table lookup unpacks them);
- onnxruntime MatMulNBits: the same fp32 model through onnxruntime's own
  matmul_nbits_quantizer (4 bits, block 32, symmetric), with accuracy_level 4 (int8
  activations, its fastest CPU path) and without (float activations);
- onnxruntime fp32, for scale.

Prints a Markdown table: median latency per layer, the bandwidth its weight bytes (and
scales) are read at, and the ratios int4/int8 and int4/MatMulNBits(4). Writes JSON. Read
the numbers as ratios within one run (bench/README.md). Default shapes: a 4096 x 4096 layer,
and the decode-shaped layers of a 135M-parameter LLaMA-style model (hidden 576, FFN 1536,
vocabulary 49152).

--minilm instead builds paraphrase-MiniLM-L3-v2 (64 tokens) with int8 and 4-bit weights, the
embedding table in fp32, int8 or 4 bits, and 4-bit weights rounded by GPTQ or to nearest,
calibrated on 64 sentences, and prints each library's size and the cosine of its sentence
embedding to onnxruntime fp32's on 96 held-out sentences (no timing).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

SHAPES = ("4096x4096", "576x576", "576x1536", "1536x576", "576x49152")
GROUP = 32
MAX_LAYERS = 64
MAX_ONNX_BYTES = 1_500_000_000  # of fp32 weights in the model file (protobuf's limit: 2 GB)


def last_level_cache() -> int:
    """Bytes of the largest CPU cache (sysfs), 32 MiB when unknown."""
    sizes = []
    for path in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = path.read_text().strip()
        scale = {"K": 1 << 10, "M": 1 << 20}.get(text[-1:], 1)
        sizes.append(int(text.rstrip("KM")) * scale)
    return max(sizes, default=32 << 20)


def int4_bytes(k: int, n: int) -> int:
    groups = -(-k // GROUP)
    return groups * GROUP * n // 2 + groups * n * 2


def matmul_onnx(k: int, n: int, layers: int, path: Path) -> None:
    import onnx
    from onnx import helper, numpy_helper

    from models import make_model

    rng = np.random.default_rng(k * 7 + n)
    weights = [numpy_helper.from_array((rng.standard_normal((k, n)) * 0.05).astype(np.float32),
                                       f"w{i}") for i in range(layers)]
    nodes = [helper.make_node("MatMul", ["x", f"w{i}"], [f"y{i}"], name=f"fc{i}")
             for i in range(layers)]
    onnx.save(make_model(nodes, [("x", [1, k])], [(f"y{i}", [1, n]) for i in range(layers)],
                         weights), str(path))


def nbits_onnx(src: Path, dst: Path, accuracy_level: int | None) -> None:
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer)

    config = DefaultWeightOnlyQuantConfig(block_size=GROUP, is_symmetric=True,
                                          accuracy_level=accuracy_level)
    quantizer = MatMulNBitsQuantizer(onnx.load(str(src)), algo_config=config)
    quantizer.process()
    quantizer.model.save_model_to_file(str(dst), use_external_data_format=False)


def time_ort(path: Path, feed, threads: int, repeat: int) -> float:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    for _ in range(10):
        session.run(None, feed)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def time_qcompile(path: Path, out: Path, bits: int, feed, calibration, repeat: int,
                  palettes: bool = False):
    import qcompile
    from qcompile.quantize import QuantConfig

    qcompile.compile(str(path), "host", out, quantize="int8", calibration=calibration,
                     quant_config=QuantConfig(weight_bits=bits, group_size=GROUP,
                                              weight_rounding="nearest", palettes=palettes))
    with qcompile.load(out) as model:
        result = model.benchmark(feed, repeat=repeat)
    return result.median_ms / 1e3


MINILM_CONFIGS = (  # (weight bits, tables, weight rounding)
    (8, "fp32", "gptq"), (8, "int8", "gptq"), (8, "int4", "gptq"), (4, "int8", "gptq"),
    (4, "int8", "nearest"), (4, "int4", "gptq"), (4, "int4", "nearest"))


def minilm(out: Path) -> int:
    import onnxruntime as ort

    import qcompile
    from qcompile.quantize import QuantConfig
    from run import MODELS, _agreement  # bench/run.py's MiniLM: its data, shapes, output

    bench = MODELS["minilm-l3"]
    calibration, held_out = bench.data()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        bench.export(path)
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        reference = np.stack([session.run([bench.output], f)[0] for f in held_out])
        for bits, tables, rounding in MINILM_CONFIGS:
            directory = Path(tmp) / f"{bits}-{tables}-{rounding}"
            print(f"minilm: {bits}-bit weights, {tables} table, {rounding} ...", file=sys.stderr,
                  flush=True)
            qcompile.compile(str(path), "host", directory, input_shapes=bench.input_shapes,
                             quantize="int8", calibration=calibration,
                             quant_config=QuantConfig(weight_bits=bits, tables=tables,
                                                      weight_rounding=rounding))
            with qcompile.load(directory) as model:
                got = np.stack([model.run(f)[bench.output] for f in held_out])
            rows.append({"weight_bits": bits, "tables": tables, "rounding": rounding,
                         "size_mb": (directory / "model.so").stat().st_size / 1e6,
                         "cosine": _agreement(got, reference)[1]})
    print("| weights | embedding table | rounding | .so MB | cosine to fp32 |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {'int8' if r['weight_bits'] == 8 else 'int4-g32'} | {r['tables']} | "
              f"{r['rounding']} | {r['size_mb']:.1f} | {r['cosine']:.4f} |")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": rows}, indent=1) + "\n")
    print(f"wrote {out}", file=sys.stderr)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minilm", action="store_true",
                        help="MiniLM-L3's size and accuracy with 4-bit weights and tables")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=50)
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.minilm:
        return minilm(Path(args.out or ROOT / "bench" / "results" / "int4-minilm.json"))
    args.out = args.out or str(ROOT / "bench" / "results" / "int4.json")
    os.environ["TVM_NUM_THREADS"] = os.environ["OMP_NUM_THREADS"] = str(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for shape in args.shapes.split(","):
            k, n = (int(v) for v in shape.split("x"))
            print(f"{shape}: building ...", file=sys.stderr, flush=True)
            # an ONNX file holds at most 2 GB: on a CPU with a last-level cache larger than
            # a fifth of that, the largest shapes' 4-bit weights stay in the cache
            layers = max(1, min(MAX_LAYERS, -(-2 * last_level_cache() // int4_bytes(k, n)),
                                MAX_ONNX_BYTES // (4 * k * n)))
            src = tmp / f"mm{shape}.onnx"
            matmul_onnx(k, n, layers, src)
            rng = np.random.default_rng(1)
            feed = {"x": rng.standard_normal((1, k)).astype(np.float32)}
            calibration = [{"x": rng.standard_normal((1, k)).astype(np.float32)}
                           for _ in range(8)]
            row = {"shape": shape, "k": k, "n": n, "layers": layers,
                   "beyond_cache": layers * int4_bytes(k, n) > last_level_cache()}
            row["qcompile_int8_s"] = time_qcompile(src, tmp / f"q8-{shape}", 8, feed,
                                                   calibration, args.repeat)
            row["qcompile_int4_s"] = time_qcompile(src, tmp / f"q4-{shape}", 4, feed,
                                                   calibration, args.repeat)
            row["qcompile_lut4_s"] = time_qcompile(src, tmp / f"p4-{shape}", 4, feed,
                                                   calibration, args.repeat, palettes=True)
            for level, key in ((4, "ort_nbits_acc4_s"), (None, "ort_nbits_s")):
                dst = tmp / f"nbits{level}-{shape}.onnx"
                nbits_onnx(src, dst, level)
                row[key] = time_ort(dst, feed, args.threads, args.repeat)
            row["ort_fp32_s"] = time_ort(src, feed, args.threads, args.repeat)
            for key in [key for key in row if key.endswith("_s")]:
                row[key] /= layers  # per layer
            row["int8_bytes"] = k * n + 4 * n
            row["int4_bytes"] = int4_bytes(k, n)
            rows.append(row)
    print(table(rows))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"threads": args.threads, "repeat": args.repeat, "group": GROUP,
                               "rows": rows}, indent=1) + "\n")
    print(f"wrote {out}", file=sys.stderr)
    return 0


def table(rows) -> str:
    lines = ["| K x N (layers) | qcompile int8 us (GB/s) | qcompile int4 us (GB/s) | "
             "int4 / int8 | lut4 / int4 | ORT MatMulNBits acc4 us | int4 / ORT acc4 | "
             "ORT MatMulNBits us | ORT fp32 us |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        q8, q4 = r["qcompile_int8_s"], r["qcompile_int4_s"]
        lut = r.get("qcompile_lut4_s")
        lines.append(
            f"| {r['shape']} ({r['layers']}{'' if r.get('beyond_cache', True) else ', in cache'})"
            f" | {q8 * 1e6:.0f} ({r['int8_bytes'] / q8 / 1e9:.1f}) | "
            f"{q4 * 1e6:.0f} ({r['int4_bytes'] / q4 / 1e9:.1f}) | {q4 / q8:.2f} | "
            f"{'-' if lut is None else f'{lut / q4:.2f}'} | "
            f"{r['ort_nbits_acc4_s'] * 1e6:.0f} | {q4 / r['ort_nbits_acc4_s']:.2f} | "
            f"{r['ort_nbits_s'] * 1e6:.0f} | {r['ort_fp32_s'] * 1e6:.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
