"""`qcompile example`: EfficientNet-Lite0 from ONNX to an int8 .so (calibrated on 32 real
photos, with the tuning log that ships for the host when it fits this machine), run on photos."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from . import efficientnet_lite0 as effnet
from . import require
from .photos import photos

log = logging.getLogger(__name__)


CALIBRATION_PHOTOS = 32


def example_calibration(images: list) -> list:
    """The example's calibration samples: 32 photos spread over those found, or all of them
    where fewer ship (a bare `pip install` has scikit-image's 6; the Debian packages that
    tests/run installs add about 300)."""
    from .photos import calibration_split

    if len(images) <= CALIBRATION_PHOTOS:
        log.info("calibration data: the %d photos found on this machine (install opencv-doc "
                 "and gcompris-qt-data for more)", len(images))
        return images
    log.info("calibration data: %d photos spread over the %d found on this machine",
             CALIBRATION_PHOTOS, len(images))
    return calibration_split(images, CALIBRATION_PHOTOS)[0]


def run_example(out_dir: Path, target: str = "host", int8: bool = True
                ) -> dict[str, list[tuple[str, float]]]:
    """Convert, compile (int8, or fp32) and run the example; print and return each photo's
    top-5."""
    from ..pipeline import compile as compile_model
    from ..runtime import load

    require()
    out_dir.mkdir(parents=True, exist_ok=True)
    onnx_path = out_dir / "efficientnet-lite0.onnx"
    log.info("converting the EfficientNet-Lite0 weights to %s", onnx_path)
    effnet.export(onnx_path)
    images = photos()
    batch = {name: effnet.preprocess(image) for name, image in images.items()}
    first_name = next(iter(batch))
    first_npz = out_dir / f"{first_name}.npz"
    np.savez(first_npz, **{effnet.INPUT_NAME: batch[first_name]})
    options = ""
    if int8:
        from .photos import photo_collection

        calibration = example_calibration([effnet.preprocess(image)
                                           for _, image in photo_collection()])
        calibration_npz = out_dir / "calibration.npz"
        np.savez(calibration_npz, **{effnet.INPUT_NAME: np.stack(calibration)})
        artifact = compile_model(onnx_path, target, out_dir / target, quantize="int8",
                                 calibration=calibration_npz)
        options = f" --quantize int8 --calibration {calibration_npz}"
    else:
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
          f"  qcompile compile {onnx_path} --target {target}{options} -o {artifact.directory}\n"
          f"  qcompile run {artifact.directory} --inputs {first_npz}")
    return results
