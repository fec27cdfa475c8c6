"""The build stage's output: OUT_DIR/model.so and its manifest OUT_DIR/model.json.

The manifest is what the runtime trusts about the library: input and output names, shapes and
dtypes, the target it was built for, per-layer precision, the versions that built it and the
.so's sha256 (checked on load, so a stale or swapped library is caught).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ModelError
from .specs import TensorSpec

LIBRARY_FILE = "model.so"
MANIFEST_FILE = "model.json"
# Every file a build writes into OUT_DIR (the reports: quantize/report.py's REPORT_FILE, and
# auto.py's RULES_FILE and SEARCH_FILE; a decoder's settings, tokenizer and generation
# settings: decoder/compile.py, decoder/text.py): one of an earlier build that the new build does not
# write is removed when the new one is published, so that no report outlives its library.
OWN_FILES = (LIBRARY_FILE, MANIFEST_FILE, "quantization.json", "precision-rules.toml",
             "search.json", "decoder.json", "tokenizer.json", "generation.json", "pruning.json")
MANIFEST_FORMAT = 1


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class Manifest:
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    target: dict[str, Any]
    layers: tuple[dict[str, str], ...]
    library_sha256: str
    library_bytes: int
    versions: dict[str, str]
    source: dict[str, str]
    # {"total": n, "tuned": n, ..., "tuning_log": dir or None, "functions": {kernel name:
    # {"ops", "precision", "tuned"}} (kernel_facts.py; builds before it have none)}
    kernels: dict[str, Any] = None

    def to_json(self) -> dict[str, Any]:
        return {
            "format": MANIFEST_FORMAT,
            "library": {"file": LIBRARY_FILE, "sha256": self.library_sha256,
                        "bytes": self.library_bytes},
            "inputs": [s.to_json() for s in self.inputs],
            "outputs": [s.to_json() for s in self.outputs],
            "target": self.target,
            "layers": list(self.layers),
            "kernels": self.kernels or {},
            "versions": self.versions,
            "source": self.source,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Manifest":
        return cls(inputs=tuple(TensorSpec.from_json(s) for s in data["inputs"]),
                   outputs=tuple(TensorSpec.from_json(s) for s in data["outputs"]),
                   target=data["target"], layers=tuple(data["layers"]),
                   library_sha256=data["library"]["sha256"],
                   library_bytes=data["library"]["bytes"], versions=data["versions"],
                   source=data["source"], kernels=data.get("kernels", {}))


@dataclass(frozen=True)
class Artifact:
    """A compiled model on disk."""

    directory: Path
    manifest: Manifest

    @property
    def library(self) -> Path:
        return self.directory / LIBRARY_FILE

    def save(self) -> None:
        text = json.dumps(self.manifest.to_json(), indent=2) + "\n"
        (self.directory / MANIFEST_FILE).write_text(text)

    @classmethod
    def open(cls, directory: str | Path) -> "Artifact":
        """Read OUT_DIR/model.json and check that model.so is the library it describes."""
        directory = Path(directory)
        manifest_path = directory / MANIFEST_FILE
        if not manifest_path.is_file():
            raise ModelError(f"'{directory}' is not a compiled model: it has no {MANIFEST_FILE}. "
                             "Pass the OUT_DIR that `qcompile compile ... -o OUT_DIR` wrote.")
        try:
            data = json.loads(manifest_path.read_text())
            manifest = Manifest.from_json(data)
        except (ValueError, KeyError, TypeError) as exc:
            raise ModelError(f"'{manifest_path}' is not a valid qcompile manifest ({exc}). "
                             "Compile the model again.") from None
        if data.get("format") != MANIFEST_FORMAT:
            raise ModelError(f"'{manifest_path}' has manifest format {data.get('format')}, this "
                             f"qcompile reads format {MANIFEST_FORMAT}. Compile the model again.")
        artifact = cls(directory, manifest)
        if not artifact.library.is_file():
            raise ModelError(f"'{directory}' has a manifest but no {LIBRARY_FILE}. "
                             "Compile the model again.")
        if sha256_of(artifact.library) != manifest.library_sha256:
            raise ModelError(f"'{artifact.library}' is not the library that {MANIFEST_FILE} "
                             "describes (its sha256 differs): it was replaced or damaged. "
                             "Compile the model again.")
        return artifact
