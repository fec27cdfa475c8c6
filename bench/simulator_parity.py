"""How closely the precision search's simulator (fake-quantized ONNX in onnxruntime) follows the
compiled int8 model: on every model of tests/models.py, and on EfficientNet-Lite0 as a whole
and with only some of its blocks in int8.

    python bench/simulator_parity.py [--json bench/results/simulator-parity.json] [--no-subsets]

For each build: the noise power of the simulated outputs against the compiled ones, relative
to the compiled model's own int8 error (compiled against fp32), and both errors as SQNR. The
test models use random inputs (8 to calibrate, 6 held out); EfficientNet-Lite0 its 32
calibration photos and 16 held-out ones. About 10 minutes, most of it EfficientNet builds.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the small models and the parity measure
sys.path.insert(0, str(ROOT))

SUBSETS = [r"re:blocks\.[0-5]/.*", r"re:blocks\.[6-9]/.*", r"re:blocks\.1[0-2]/.*",
           r"re:blocks\.1[3-5]/.*", r"re:blocks\.([6-9]|1[0-2])/.*",
           r"re:blocks\.([6-9]|1[0-5])/.*"]


def _db(signal: float, noise: float) -> float:
    return 10 * math.log10(signal / noise) if noise else float("inf")


def _row(name: str, apart: float, compiled: float, signal: float, simulated: float) -> dict:
    return {"model": name, "apart_over_int8_error": apart / compiled if compiled else None,
            "compiled_sqnr_db": _db(signal, compiled), "simulated_sqnr_db": _db(signal, simulated),
            "simulated_vs_compiled_db": _db(signal, apart)}


def test_models(work: Path) -> list[dict]:
    import onnx

    import test_parity

    rows = []
    for name in test_parity.PARITY:
        model = test_parity._builders()[name]()
        path = work / f"{name}.onnx"
        onnx.save(model, str(path))
        rows.append(_row(name, *test_parity.parity(path, model, work / name,
                                                   test_parity.SHAPES.get(name))))
    return rows


def efficientnet(work: Path, subsets: bool) -> list[dict]:
    import test_parity
    from qcompile.examples import efficientnet_lite0 as effnet
    from qcompile.examples.photos import calibration_split, photo_collection
    from qcompile.quantize import QuantConfig
    from qcompile.quantize.rules import PrecisionRules

    path = effnet.export(work / "efficientnet-lite0.onnx")
    images = [{"images": effnet.preprocess(image)} for _, image in photo_collection()]
    calibration, held_out = calibration_split(images)
    held_out = held_out[:16]
    rows = [_row("efficientnet-lite0", *test_parity.parity(
        path, None, work / "effnet", calibration=calibration, held_out=held_out))]
    for i, pattern in enumerate(SUBSETS if subsets else []):
        rules = PrecisionRules.from_dict({"defaults": {"precision": "fp32"},
                                          "rule": [{"name": pattern, "precision": "int8"}]})
        rows.append(_row(f"efficientnet-lite0, int8 only {pattern[3:]}", *test_parity.parity(
            path, None, work / f"subset{i}", calibration=calibration, held_out=held_out,
            quant_config=QuantConfig(rules=rules))))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, default=ROOT / "bench/results/simulator-parity.json")
    parser.add_argument("--no-subsets", action="store_true")
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    with tempfile.TemporaryDirectory() as work:
        rows = test_models(Path(work)) + efficientnet(Path(work), not args.no_subsets)
    print("| model | simulated vs compiled / int8 error | int8 SQNR compiled | simulated |")
    print("|---|---|---|---|")
    for row in rows:
        ratio = row["apart_over_int8_error"]
        print(f"| {row['model']} | {'-' if ratio is None else f'{ratio:.2e}'} | "
              f"{row['compiled_sqnr_db']:.1f} dB | {row['simulated_sqnr_db']:.1f} dB |")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(rows, indent=1) + "\n")
    print(f"written: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
