"""Palettes against uniform 4-bit codes on the bundled EfficientNet-Lite0, in one run.

    python bench/palettes.py [--reconstruct] [--group-size 32] [--out bench/results/palettes.json]

Every layer that has a 4-bit kernel (the 1x1 convolutions and the classifier) is put in 4 bits
(`--quantize int8 --weight-bits 4`), with uniform codes (int4) and with palettes (lut4,
`--palettes`), both rounded by GPTQ on the 32 calibration photos; plain int8 for scale. For
each: the library's size, the top-1 agreement with onnxruntime fp32 on the held-out photos,
and the mean weight SQNR of the 4-bit layers (quantization.json). No timing (bench/int4.py
times the kernels; bench/run.py the models). Writes JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reconstruct", action="store_true",
                        help="also each 4-bit configuration with --reconstruct")
    parser.add_argument("--group-size", type=int, default=32, choices=[32, 64, 128])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "palettes.json")
    args = parser.parse_args()

    import onnxruntime as ort

    import qcompile
    from qcompile.examples import efficientnet_lite0 as effnet
    from qcompile.examples.photos import calibration_split, photo_collection
    from qcompile.quantize import QuantConfig

    feeds = [{"images": effnet.preprocess(image)} for _, image in photo_collection()]
    calibration, held_out = calibration_split(feeds)
    configs = {"int8": QuantConfig()}
    for refit in (False, True) if args.reconstruct else (False,):
        for name, palettes in (("int4", False), ("lut4", True)):
            configs[name + ("-refit" if refit else "")] = QuantConfig(
                weight_bits=4, group_size=args.group_size, palettes=palettes,
                reconstruct=refit)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = Path(tmp) / "efficientnet-lite0.onnx"
        effnet.export(onnx_path)
        session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        reference = np.array([session.run(None, f)[0].argmax() for f in held_out])
        for name, config in configs.items():
            print(f"{name}: compiling ...", file=sys.stderr, flush=True)
            start = time.perf_counter()
            out = Path(tmp) / name
            artifact = qcompile.compile(onnx_path, "host", out, quantize="int8",
                                        calibration=calibration, quant_config=config,
                                        tuning_log=False)
            seconds = time.perf_counter() - start
            with qcompile.load(artifact.directory) as model:
                top = np.array([next(iter(model.run(f).values())).argmax() for f in held_out])
            layers = json.loads((out / "quantization.json").read_text())["layers"]
            four = [r["weight_sqnr_db"] for r in layers
                    if r["precision"].startswith(("int4", "lut4"))]
            rows.append({"config": name, "library_mb": artifact.manifest.library_bytes / 1e6,
                         "agreement": float((top == reference).mean()),
                         "four_bit_layers": len(four),
                         "mean_weight_sqnr_db": float(np.mean(four)) if four else None,
                         "compile_s": seconds})
    print("| config | .so MB | top-1 agreement | 4-bit layers | mean weight SQNR dB |")
    print("|---|---|---|---|---|")
    for r in rows:
        sqnr = "-" if r["mean_weight_sqnr_db"] is None else f"{r['mean_weight_sqnr_db']:.1f}"
        print(f"| {r['config']} | {r['library_mb']:.2f} | {r['agreement']:.3f} | "
              f"{r['four_bit_layers']} | {sqnr} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"held_out": len(held_out), "group": args.group_size,
                                    "rows": rows}, indent=1) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
