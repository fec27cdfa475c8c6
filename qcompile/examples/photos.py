"""Real photos that ship offline with scikit-image (no download at run time)."""

from __future__ import annotations

import numpy as np

# scikit-image's bundled colour photos (skimage.data.<name>()).
PHOTOS = ("chelsea", "coffee", "astronaut", "rocket")


def photo(name: str) -> np.ndarray:
    """An RGB uint8 image [H, W, 3] from scikit-image's data."""
    from skimage import data

    image = getattr(data, name)()
    return np.asarray(image)[..., :3]


def photos() -> dict[str, np.ndarray]:
    return {name: photo(name) for name in PHOTOS}
