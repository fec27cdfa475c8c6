"""Int8 kernels on packed weights: the generated code uses the target's integer dot-product
instruction (vpdpbusd on AVX-512 VNNI, vpmaddubsw on AVX2, sdot on ARMv8.2 dotprod), and
computes exactly the integers that TVM's own unpacked kernels compute for the same quantized
model."""

import subprocess

import numpy as np
import pytest

import qcompile
from models import gemm_matmul, packed_convnet, padded_channels, random_inputs
from qcompile.schedules.cpu import intrinsics
from qcompile.targets import load_target

INSTRUCTIONS = ("vpdpbusd", "vpmaddubsw", "sdot", "udot", "smmla", "ummla", "vpshufb", "tbl")


def instruction_counts(library, objdump: str = "objdump") -> dict[str, int]:
    asm = subprocess.run([objdump, "-d", str(library)], capture_output=True, text=True,
                         check=True).stdout
    words = [line.split("\t")[2].split()[0] for line in asm.splitlines()
             if line.count("\t") >= 2 and line.split("\t")[2].strip()]
    return {name: sum(1 for w in words if w == name) for name in INSTRUCTIONS}


def compile_int8(path, target, out, model=packed_convnet):
    calibration = [random_inputs(model(), seed=10 + i) for i in range(8)]
    return qcompile.compile(path, target, out, quantize="int8", calibration=calibration)


def host_x86_instruction() -> str | None:
    """The x86 host's int8 dot-product instruction (vpdpbusd, vpmaddubsw), or None."""
    dot = intrinsics.dot_product_for(load_target("host").to_tvm())
    return dot.instruction if dot in (intrinsics.VNNI, intrinsics.AVX2) else None


def host_has_vnni() -> bool:
    return host_x86_instruction() == intrinsics.VNNI.instruction


def host_has_avx2() -> bool:
    from tvm.target import codegen

    return bool(codegen.target_has_features("avx2", load_target("host").to_tvm()))


def x86_target(directory, mcpu: str) -> str:
    """A target file for an x86 CPU: "haswell" (AVX2, no VNNI: packed for vpmaddubsw),
    "nehalem" (SSE4.2: no instruction to pack for, TVM's own int8 kernels)."""
    path = directory / f"x86-{mcpu}.toml"
    path.write_text(f'description = "x86 {mcpu}"\nrpc_key = "x86"\n'
                    f'[target]\nkind = "llvm"\nmcpu = "{mcpu}"\nnum-cores = 2\n')
    return str(path)


# (the instruction, a target the host runs that packs for it, whether the host runs it)
X86_PACKED = [
    pytest.param("vpdpbusd", lambda d: "host", marks=pytest.mark.skipif(
        not host_has_vnni(), reason="this CPU has no AVX-512 VNNI")),
    pytest.param("vpmaddubsw", lambda d: x86_target(d, "haswell"), marks=pytest.mark.skipif(
        not host_has_avx2(), reason="this CPU has no AVX2"))]


# Depthwise convs the packed kernel must get exactly right: 3x3 and 5x5 windows, strides 1 and
# 2, symmetric and one-sided (TF "SAME") padding, widths that do not fill 8-pixel tiles, a
# window of 4 (no zero taps, no padding).
DEPTHWISE_CASES = [  # (height, width, channels, kernel, stride, [top, left, bottom, right])
    (9, 10, 32, 3, 1, [1, 1, 1, 1]), (12, 12, 16, 3, 2, [0, 0, 1, 1]),
    (11, 7, 16, 5, 1, [2, 2, 2, 2]), (14, 13, 48, 5, 2, [1, 2, 2, 1]),
    (6, 8, 16, 4, 1, [0, 0, 0, 0])]


def depthwise_module(activation_dtype: str, seed: int = 0, extreme: bool = False):
    """(a Relax module of int8 NHWC depthwise convs, DEPTHWISE_CASES, its inputs, the int32
    outputs numpy computes from the definition). `extreme`: every input at the type's largest
    magnitude and the weights at +-127 and -128 (where 16-bit partial sums would saturate)."""
    from tvm import relax

    rng = np.random.default_rng(seed)
    low, high = (0, 256) if activation_dtype == "uint8" else (-128, 128)
    images, weights, expected = [], [], []
    for h, w, c, k, stride, (top, left, bottom, right) in DEPTHWISE_CASES:
        image = rng.integers(low, high, (1, h, w, c)).astype(activation_dtype)
        weight = rng.integers(-128, 128, (c, 1, k, k)).astype("int8")  # OIHW, one per group
        if extreme:
            image[...] = low if low < 0 else high - 1
            weight = rng.choice(np.array([-128, 127, -127], np.int8), weight.shape)
        padded = np.pad(image.astype(np.int64), [(0, 0), (top, bottom), (left, right), (0, 0)])
        out_h = (h + top + bottom - k) // stride + 1
        out_w = (w + left + right - k) // stride + 1
        sums = np.zeros((1, out_h, out_w, c), np.int64)
        for r in range(k):
            for s in range(k):
                sums += padded[:, r:r + stride * out_h:stride, s:s + stride * out_w:stride] \
                    * weight[:, 0, r, s]
        images.append(image)
        weights.append(weight)
        expected.append(sums.astype(np.int32))
    params = [relax.Var(f"x{i}", relax.TensorType(x.shape, activation_dtype))
              for i, x in enumerate(images)]
    bb = relax.BlockBuilder()
    with bb.function("main", params):
        with bb.dataflow():
            outs = [bb.emit(relax.op.nn.conv2d(
                x, relax.const(weight), strides=[stride, stride], padding=pad, groups=c,
                data_layout="NHWC", kernel_layout="OIHW", out_dtype="int32"))
                for x, weight, (_, _, c, _, stride, pad) in zip(params, weights,
                                                                DEPTHWISE_CASES)]
            out = bb.emit_output(relax.Tuple(outs))
        bb.emit_func_output(out)
    return bb.get(), images, expected


@pytest.mark.parametrize("extreme", [False, True])
@pytest.mark.parametrize("instruction, target_of", X86_PACKED)
def test_depthwise_kernels_match_numpy(tmp_path, instruction, target_of, extreme):
    """Int8 depthwise convs, legalized and scheduled as qcompile builds them for an x86 CPU
    (4 taps per vpdpbusd, or per 2 vpmaddubsw on AVX2): exactly the integer sums of their
    definition, on random integers and on the largest ones."""
    import tvm

    from qcompile.lower import lower

    mod, images, expected = depthwise_module("uint8", extreme=extreme)
    target = load_target(target_of(tmp_path))
    lowered = lower(mod, target)
    names = [gv.name_hint for gv, f in lowered.functions.items()
             if isinstance(f, tvm.tirx.PrimFunc)]
    assert sum("packed_depthwise" in n for n in names) == len(DEPTHWISE_CASES), names
    executable = tvm.compile(lowered, target.to_tvm(), relax_pipeline=None)
    library = tmp_path / "depthwise.so"
    executable.export_library(str(library))
    assert instruction_counts(library)[instruction] > 0
    vm = tvm.relax.VirtualMachine(executable, tvm.cpu())
    got = vm["main"](*[tvm.runtime.tensor(x) for x in images])
    for case, value, want in zip(DEPTHWISE_CASES, got, expected):
        assert np.array_equal(value.numpy(), want), case


def test_packing_blocks():
    from qcompile.schedules.cpu.packed_int8 import pack_conv_weight, pack_matmul_weight

    w = np.arange(32 * 3 * 3 * 8).reshape(32, 3, 3, 8)  # OHWI
    packed = pack_conv_weight(w, lanes=16, reduce=4)
    assert packed.shape == (2, 3, 3, 2, 16, 4)
    assert packed[1, 2, 0, 1, 5, 3] == w[16 + 5, 2, 0, 4 + 3]
    m = np.arange(8 * 32).reshape(8, 32)  # K x N
    packed = pack_matmul_weight(m, lanes=16, reduce=4)
    assert packed.shape == (2, 2, 16, 4) and packed[1, 0, 3, 2] == m[2, 16 + 3]


@pytest.mark.parametrize("instruction, target_of", X86_PACKED)
@pytest.mark.parametrize("model, packed_kernels", [(packed_convnet, 4), (padded_channels, 2)])
def test_x86_int8_uses_its_instruction_and_matches_unpacked_kernels(
        save_model, tmp_path, model, packed_kernels, instruction, target_of):
    """packed_convnet: 2 convs, the depthwise conv and the fc fill the blocks. padded_channels:
    the 24- and 40-channel convs are packed with zero channels, the 10-class fc is not."""
    path = save_model(model())
    packed = compile_int8(path, target_of(tmp_path), tmp_path / "packed", model)
    # the same model for an x86 CPU with neither instruction: TVM's own (unpacked) kernels
    plain = compile_int8(path, x86_target(tmp_path, "nehalem"), tmp_path / "plain", model)
    assert packed.manifest.kernels["int8_default_schedules"] == packed_kernels
    assert plain.manifest.kernels["int8_default_schedules"] == 0
    assert instruction_counts(packed.library)[instruction] > 0
    assert sum(instruction_counts(plain.library)[name]
               for name in ("vpdpbusd", "vpmaddubsw")) == 0
    for seed in range(3):
        feeds = random_inputs(model(), seed=seed)
        with qcompile.load(packed.directory) as a, qcompile.load(plain.directory) as b:
            assert np.array_equal(a.run(feeds)["y"], b.run(feeds)["y"])


def test_outputs_that_do_not_fill_blocks_are_padded(save_model, tmp_path):
    """gemm_matmul's second MatMul has 10 outputs, not a multiple of sdot's 4 lanes: its
    weight is packed with 2 zero columns (the device test checks its integers)."""
    model = gemm_matmul()
    calibration = [random_inputs(model, seed=10 + i) for i in range(8)]
    artifact = qcompile.compile(save_model(model), "arm64-dotprod", tmp_path / "out",
                                quantize="int8", calibration=calibration)
    assert artifact.manifest.kernels["int8_default_schedules"] == 2
    counts = instruction_counts(artifact.library, "aarch64-linux-gnu-objdump")
    assert counts["sdot"] > 0


@pytest.mark.parametrize("target", ["arm64-dotprod", "arm64-i8mm"])
def test_arm64_int8_uses_sdot_and_smmla(target, save_model, tmp_path):
    """dotprod: every packed kernel is sdot. i8mm: the stride-1 pointwise conv takes two pixels
    per smmla; the stride-2 conv and the one-row Gemm cannot pair rows and use sdot."""
    artifact = compile_int8(save_model(packed_convnet()), target, tmp_path / "out")
    counts = instruction_counts(artifact.library, "aarch64-linux-gnu-objdump")
    assert counts["sdot"] > 0, counts
    assert (counts["smmla"] > 0) == (target == "arm64-i8mm"), counts
    plain = compile_int8(save_model(packed_convnet()), "arm64", tmp_path / "plain")
    assert instruction_counts(plain.library, "aarch64-linux-gnu-objdump")["sdot"] == 0
