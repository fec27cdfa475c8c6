"""Real photos that ship offline (no download at run time).

- scikit-image's bundled colour photos (a dependency of qcompile: always present);
- with the test extras: scikit-learn's and matplotlib's sample photos;
- on Debian with the package opencv-doc: the photos among OpenCV's sample data;
- on Debian with the package gcompris-qt-data: about 250 photos (tools, fish, animals, farm
  animals, monuments, musicians) that GCompris keeps as WebP inside Qt resource bundles.

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

GCOMPRIS_RCC = Path(os.environ.get("QCOMPILE_GCOMPRIS_RCC", "/usr/share/gcompris-qt/rcc"))
# The bundles that hold photographs (the others: drawings, paintings, letters).
_GCOMPRIS_BUNDLES = ("categorization", "explore_monuments", "explore_world_animals",
                     "explore_farm_animals", "erase", "explore_world_music")


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


def _webp_images(bundle: Path):
    """(offset, WebP bytes) of each RIFF/WEBP blob stored in a Qt resource bundle (.rcc)."""
    import re
    import struct

    data = bundle.read_bytes()
    for match in re.finditer(rb"RIFF(....)WEBP", data, re.S):
        size = struct.unpack("<I", match.group(1))[0] + 8
        yield match.start(), data[match.start():match.start() + size]


def _read_webp(blob: bytes) -> np.ndarray:
    import io

    from PIL import Image

    with Image.open(io.BytesIO(blob)) as image:
        return np.asarray(image.convert("RGB"))


def _gcompris_sources():
    for bundle in _GCOMPRIS_BUNDLES:
        path = GCOMPRIS_RCC / f"{bundle}.rcc"
        if path.is_file():
            for offset, blob in _webp_images(path):
                yield f"gcompris:{bundle}@{offset}", lambda blob=blob: _read_webp(blob)


def _fingerprint(image: np.ndarray) -> np.ndarray:
    """A 16x16 average hash: the same photo at another size or crop has a close one."""
    from PIL import Image

    grey = np.asarray(Image.fromarray(image).convert("L").resize((16, 16)), np.float32)
    return (grey > grey.mean()).reshape(-1)


def photo_collection() -> list[tuple[str, np.ndarray]]:
    """Every colour photo found, as (source:name, RGB uint8 [H, W, 3]), in a fixed order, with
    near-duplicates (the same photo in two sizes or crops) kept once."""
    import itertools

    found, prints = [], []
    for name, load in itertools.chain(_sources(), _gcompris_sources()):
        try:
            image = load()
        except (OSError, ValueError, AttributeError, SyntaxError):
            continue
        if not _is_colour_photo(image):
            continue
        image = np.ascontiguousarray(image[..., :3])
        fingerprint = _fingerprint(image)
        if any(int(np.count_nonzero(fingerprint != p)) <= 20 for p in prints):
            continue
        prints.append(fingerprint)
        found.append((name, image))
    return found


def calibration_split(items: list, calibration: int = 32) -> tuple[list, list]:
    """(calibration, evaluation): `calibration` items spread evenly over the collection, and
    all the others. Disjoint, so accuracy is measured on photos the quantizer never saw."""
    if len(items) <= calibration:
        raise ValueError(f"{len(items)} photos: not enough for {calibration} calibration "
                         "photos and an evaluation set")
    picked = set(np.linspace(0, len(items) - 1, calibration).round().astype(int).tolist())
    return ([x for i, x in enumerate(items) if i in picked],
            [x for i, x in enumerate(items) if i not in picked])
