"""A model that arrives with 4-bit weights, compiled: paraphrase-MiniLM-L3-v2 through
onnxruntime's own matmul_nbits_quantizer, side by side with onnxruntime on the same file.

    python bench/nbits.py [--out bench/results/nbits.json]

For each quantizer setting (block 32 and 128, with and without zero points) the MatMulNBits
model is run by:

- onnxruntime, in float arithmetic (the quantizer's default accuracy level) and with
  accuracy_level 4 (int8 inputs, its fastest CPU path);
- qcompile without options: W4A16 on the model's codes (what onnxruntime's float path
  computes), the rest as the model has it (the word-embedding table in fp32);
- qcompile --quantize int8-weights: the same, with the table and the other weights in int8;
- qcompile --quantize int8 with the 64 calibration sentences: W4A8 on the model's codes, the
  other layers and the table int8.

Prints a Markdown table: the file or library size, the cosine of the sentence embedding to
onnxruntime fp32 on the original model (96 held-out sentences), and the largest difference to
onnxruntime's float output on the same 4-bit model. Writes JSON. No timing: the 4-bit kernels
are timed per layer by bench/int4.py, and whole models by bench/run.py, one process per
configuration.
"""

from __future__ import annotations

import argparse
import json
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


def ort_run(path: Path, feeds: list, output: str) -> np.ndarray:
    from run import _ort_session

    session = _ort_session(path, 2)
    return np.stack([session.run([output], f)[0] for f in feeds])


def qcompile_run(path: Path, out: Path, bench, feeds: list, **options) -> np.ndarray:
    import qcompile

    qcompile.compile(str(path), "host", out, input_shapes=bench.input_shapes, **options)
    with qcompile.load(out) as model:
        return np.stack([model.run(f)[bench.output] for f in feeds])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "nbits.json"))
    args = parser.parse_args()
    from run import MODELS, _agreement

    bench = MODELS["minilm-l3"]
    calibration, held_out = bench.data()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        src = tmp / "model.onnx"
        bench.export(src)
        reference = ort_run(src, held_out, bench.output)
        for block, symmetric in SETTINGS:
            name = f"block {block}, {'symmetric' if symmetric else 'zero points'}"
            print(f"{name} ...", file=sys.stderr, flush=True)
            plain, acc4 = tmp / f"nbits-{block}-{symmetric}.onnx", tmp / f"acc4-{block}.onnx"
            quantize_nbits(src, plain, block, symmetric, None)
            quantize_nbits(src, acc4, block, symmetric, 4)
            ort_float = ort_run(plain, held_out, bench.output)
            runs = [("onnxruntime float", ort_float, plain),
                    ("onnxruntime accuracy 4", ort_run(acc4, held_out, bench.output), plain)]
            for engine, options in (("qcompile W4A16", {}),
                                    ("qcompile int8-weights", {"quantize": "int8-weights"}),
                                    ("qcompile int8 (W4A8)", {"quantize": "int8",
                                                              "calibration": calibration})):
                out = tmp / f"{engine.split()[1]}-{block}-{symmetric}"
                runs.append((engine, qcompile_run(plain, out, bench, held_out, **options),
                             out / "model.so"))
            for engine, outputs, file in runs:
                rows.append({"setting": name, "engine": engine,
                             "size_mb": file.stat().st_size / 1e6,
                             "cosine": _agreement(outputs, reference)[1],
                             "max_diff_to_ort_float": float(np.abs(outputs - ort_float).max())})
    print("| quantizer setting | engine | size MB | cosine to fp32 | max diff to ORT float |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['setting']} | {r['engine']} | {r['size_mb']:.1f} | {r['cosine']:.4f} | "
              f"{r['max_diff_to_ort_float']:.2e} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": rows}, indent=1) + "\n")
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
