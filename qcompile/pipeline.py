"""compile(): the stages in order, import -> build. Later stages (quantize, tune) slot in here."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Mapping, Sequence

from .artifact import Artifact
from .build import build
from .frontend import import_onnx
from .targets import Target, load_target

log = logging.getLogger(__name__)


def compile(  # noqa: A001 - the verb users know
    model: str | Path,
    target: str | Path | Target = "host",
    out_dir: str | Path = "build",
    *,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    cc: str | None = None,
) -> Artifact:
    """Compile an ONNX model into OUT_DIR/model.so + OUT_DIR/model.json.

    model: path of an .onnx file. target: a target name (`qcompile targets`) or a target file.
    input_shapes: static shapes for inputs with dynamic dimensions, {name: (1, 3, 224, 224)}.
    cc: the C++ compiler that links the library (default: the target's, or $TVM_NDK_CC).
    """
    resolved = load_target(target).with_compiler(cc)  # fail on a missing compiler before work
    log.info("importing %s", model)
    float_model = import_onnx(model, input_shapes)
    log.info("imported: inputs %s; outputs %s; %d layers",
             ", ".join(s.describe() for s in float_model.inputs),
             ", ".join(s.describe() for s in float_model.outputs), len(float_model.layers))
    return build(float_model, resolved, out_dir)
