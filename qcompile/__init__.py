"""qcompile: an int8 quantizing compiler for phones, built on Apache TVM (Relax).

    import qcompile
    artifact = qcompile.compile("model.onnx", target="arm64-dotprod", out_dir="out")
    model = qcompile.load("out")                      # here, or on a phone:
    model = qcompile.load("out", rpc_tracker="127.0.0.1:9190", rpc_key="arm64-dotprod")
    outputs = model.run({"input": array})
    log = qcompile.tune("model.onnx", "arm64-dotprod", "logs/", trials=256,
                        rpc_tracker="127.0.0.1:9190", rpc_key="arm64-emu")
    qcompile.compile("model.onnx", "arm64-dotprod", "out", tuning_log=log.directory)
"""

from .version import __version__  # noqa: E402
from .artifact import Artifact, Manifest  # noqa: E402
from .build import build  # noqa: E402
from .frontend import FloatModel, import_onnx  # noqa: E402
from .modes import (AutoPrecision, DynamicInt8, Float16, Float32, StaticInt8,  # noqa: E402
                    WeightOnlyInt8)
from .quantize import QuantConfig, QuantizedModel  # noqa: E402
from .errors import QcompileError  # noqa: E402
from .pipeline import compile, tune  # noqa: E402  pylint: disable=redefined-builtin
from .runtime import LoadedModel, load  # noqa: E402
from .targets import Target, list_targets, load_target  # noqa: E402
from .tuning_log import TuningLog  # noqa: E402

__all__ = ["Artifact", "AutoPrecision", "DynamicInt8", "Float16", "Float32", "FloatModel",
           "LoadedModel", "Manifest", "QcompileError", "QuantConfig", "QuantizedModel",
           "StaticInt8", "Target", "TuningLog", "WeightOnlyInt8", "__version__", "build",
           "compile", "import_onnx", "list_targets", "load", "load_target", "tune"]
