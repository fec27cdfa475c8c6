"""Real photos that ship offline (no download at run time).

- scikit-image's bundled colour photos (a dependency of qcompile: always present);
- with the test extras: scikit-learn's and matplotlib's sample photos;
- on Debian with the package opencv-doc: the photos among OpenCV's sample data.

`photo_collection()` gathers every colour photo it finds (grey images, logos, renders, paintings
and synthetic pictures are left out), in a fixed order, for calibration and accuracy checks.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

# scikit-image's bundled colour photos (skimage.data.<name>()).
PHOTOS = ("chelsea", "coffee", "astronaut", "rocket")

OPENCV_DOC = Path(os.environ.get("QCOMPILE_OPENCV_DOC", "/usr/share/doc/opencv-doc/examples"))
_OPENCV_DIRS = ("data", "text", "hfs/data", "alphamat/input_images")
# Colour pictures in OpenCV's samples that are not photos.
_NOT_PHOTOS = {"LinuxLogo", "WindowsLogo", "opencv-logo", "opencv-logo-white", "Blender_Suzanne1",
               "Blender_Suzanne2", "starry_night", "pic1", "pic2", "pic3", "pic4", "pic5", "pic6",
               "detect_blob", "ml", "imageTextN", "imageTextR", "sudoku", "ellipses", "gradient",
               "notes"}
MIN_SIDE = 64


def photo(name: str) -> np.ndarray:
    """An RGB uint8 image [H, W, 3] from scikit-image's data."""
    from skimage import data

    image = getattr(data, name)()
    return np.asarray(image)[..., :3]


def photos() -> dict[str, np.ndarray]:
    return {name: photo(name) for name in PHOTOS}


def _is_colour_photo(image: np.ndarray) -> bool:
    if image.ndim != 3 or min(image.shape[:2]) < MIN_SIDE:
        return False
    rgb = image[..., :3].astype(np.int16)
    return float(np.abs(rgb[..., 0] - rgb[..., 1]).mean()) > 2 or \
        float(np.abs(rgb[..., 1] - rgb[..., 2]).mean()) > 2


def _read(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def _sources():
    for name in PHOTOS:
        yield f"skimage:{name}", lambda name=name: photo(name)
    from skimage import data

    yield "skimage:motorcycle_left", lambda: np.asarray(data.stereo_motorcycle()[0])
    yield "skimage:motorcycle_right", lambda: np.asarray(data.stereo_motorcycle()[1])
    try:
        from sklearn.datasets import load_sample_image

        for name in ("china.jpg", "flower.jpg"):
            yield f"sklearn:{name}", lambda name=name: load_sample_image(name)
    except ImportError:
        pass
    try:
        import matplotlib

        sample = Path(matplotlib.get_data_path()) / "sample_data"
        for path in sorted(sample.glob("*.[jp][pn]g")):
            if path.stem == "logo2":
                continue
            yield f"matplotlib:{path.name}", lambda path=path: _read(path)
    except ImportError:
        pass
    for folder in _OPENCV_DIRS:
        for path in sorted((OPENCV_DOC / folder).glob("*")):
            if path.suffix.lower() in (".jpg", ".jpeg", ".png") and path.stem not in _NOT_PHOTOS \
                    and not path.stem.endswith("_mask"):
                yield f"opencv:{folder}/{path.name}", lambda path=path: _read(path)


def photo_collection() -> list[tuple[str, np.ndarray]]:
    """Every colour photo found, as (source:name, RGB uint8 [H, W, 3]), in a fixed order."""
    found = []
    for name, load in _sources():
        try:
            image = load()
        except (OSError, ValueError, AttributeError):
            continue
        if _is_colour_photo(image):
            found.append((name, image[..., :3]))
    return found
