"""`qcompile example`: EfficientNet-Lite0 from ONNX to a .so, run on real photos."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from . import efficientnet_lite0 as effnet
from .photos import photos

log = logging.getLogger(__name__)


def run_example(out_dir: Path, target: str = "host") -> dict[str, list[tuple[str, float]]]:
    """Convert, compile and run the example; print and return each photo's top-5."""
    from ..pipeline import compile as compile_model
    from ..runtime import load

    out_dir.mkdir(parents=True, exist_ok=True)
    onnx_path = out_dir / "efficientnet-lite0.onnx"
    log.info("converting the EfficientNet-Lite0 weights to %s", onnx_path)
    effnet.export(onnx_path)
    images = photos()
    batch = {name: effnet.preprocess(image) for name, image in images.items()}
    first_name = next(iter(batch))
    first_npz = out_dir / f"{first_name}.npz"
    np.savez(first_npz, **{effnet.INPUT_NAME: batch[first_name]})
    artifact = compile_model(onnx_path, target, out_dir / target)
    results = {}
    with load(artifact.directory) as model:
        for name, x in batch.items():
            logits = model.run({effnet.INPUT_NAME: x})[effnet.OUTPUT_NAME]
            results[name] = effnet.top5(logits)
            print(f"\n{name} ({images[name].shape[1]}x{images[name].shape[0]} photo):")
            for label, prob in results[name]:
                print(f"  {prob:6.1%}  {label}")
        latency = model.benchmark({effnet.INPUT_NAME: batch[first_name]}, repeat=10)
    print("\n" + latency.describe())
    print(f"\nThe same from the command line:\n"
          f"  qcompile compile {onnx_path} --target {target} -o {artifact.directory}\n"
          f"  qcompile run {artifact.directory} --inputs {first_npz}")
    return results
