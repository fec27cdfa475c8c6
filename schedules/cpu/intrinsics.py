"""Integer dot-product tensor intrinsics, and which one a target gets.

Each intrinsic computes C[i] += sum_k A[k] * B[i, k] for a block of `lanes` outputs and a
reduction of 4: A is 4 consecutive activation bytes (broadcast), B a packed weight block of
lanes x 4 bytes, C `lanes` int32 accumulators.

- x86 AVX-512 VNNI `vpdpbusd`: u8 x s8, 16 x 4. TVM's own `dot_16x4_vnni` passes the operands
  as <16 x i32>, which the LLVM bundled with TVM 0.27 (22) rejects ("Intrinsic has incorrect
  argument type"): ours passes them as <64 x i8>, as LLVM now declares it. MetaSchedule's x86
  rule looks the intrinsic up by TVM's name, so that name is re-registered with ours too.
- x86 AVX2 without VNNI: the same u8 x s8 16 x 4 block (the same packed layout), each 32-byte
  half by `vpmaddubsw` (u8 x s8 pairs summed into int16) and `vpmaddwd` (int16 pairs into
  int32). `vpmaddubsw` saturates: 255 x 127 x 2 does not fit in int16. So the activations go
  in two parts, their low 7 bits and their top bit (a & 0x7f, a & 0x80): each pair sum then
  fits in int16 for any int8 weights (127 x 128 x 2 = 32512 at most in magnitude, and
  128 x -128 x 2 = -32768 for the top bit) and the two int32 sums are the exact integers
  `vpdpbusd` gives, at four multiply instructions per 64 bytes where VNNI has
  one. (onnxruntime and oneDNN take one `vpmaddubsw` per half instead, with 7-bit weights or
  saturation; here the integers do not depend on the CPU the model is built for.)
  Weights within [-64, 64] need no split (255 x 64 x 2 fits in int16): the `narrow` variant
  takes one `vpmaddubsw` per half, for the 4-bit kernels, whose values are within [-8, 7].
- ARMv8.2 dotprod `sdot`: s8 x s8, 4 x 4: TVM's `dot_4x4_i8i8s32_sdot` works as it is.
- ARMv8.6 i8mm `smmla` (TVM has no intrinsic for it; ours): a 2 x 8 by 8 x 2 s8 matrix product
  accumulated into 2 x 2 int32. It takes two rows of activations (two output pixels, or two
  matmul rows), 8 bytes each, and a packed weight block of 2 outputs x 8: twice the
  multiply-adds of sdot per instruction. Layers with an odd number of rows (a 7-pixel-wide
  feature map, a single-row matmul) use sdot instead, which every i8mm CPU also has.

`register` also registers the palette lookups that unpack 4-bit indices into int8 values
before these instructions (palette_lookup.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from . import palette_lookup

VNNI_INTRIN = "qcompile_dot_16x4_u8i8i32_vnni"
AVX2_INTRIN = "qcompile_dot_16x4_u8i8i32_avx2"
AVX2_NARROW_INTRIN = "qcompile_dot_16x4_u8i7i32_avx2"  # weights within [-64, 64] only
TVM_VNNI_INTRIN = "dot_16x4_vnni"
SDOT_INTRIN = "dot_4x4_i8i8s32_sdot"
SMMLA_INTRIN = "qcompile_smmla_2x2x8_i8i8i32"
DEPTHWISE_INTRIN = {"vpdpbusd": "qcompile_depthwise_16x4_u8i8i32_vnni",
                    "vpmaddubsw": "qcompile_depthwise_16x4_u8i8i32_avx2",
                    "sdot": "qcompile_depthwise_16x4_i8i8i32_sdot",
                    "smmla": "qcompile_depthwise_16x4_i8i8i32_sdot"}
DEPTHWISE_LANES = 16  # channels per depthwise intrinsic


@dataclass(frozen=True)
class DotProduct:
    """The integer dot-product instruction a target's int8 kernels are packed for."""

    intrin: str
    instruction: str        # what the assembly shows
    activation_dtype: str   # A's dtype
    lanes: int              # outputs per instruction (the weight block's first axis)
    reduce: int = 4         # reduction per output (the weight block's second axis)
    rows: int = 1           # activation rows (pixels) per instruction
    fallback: "DotProduct | None" = None  # for layers whose rows do not pair up
    # `lanes`-wide int32 accumulators a kernel's tile keeps in registers: 16 of AVX-512's 32
    # zmm or of NEON's 32 q registers; on AVX2 a 16-lane accumulator takes 2 of its 16 ymm
    accumulators: int = 16
    # an intrinsic of the same block that is exact only for weights within [-64, 64], and
    # faster: the 4-bit kernels take it with their weights unpacked to their values (not 16
    # times them) where a target has one
    narrow: str | None = None

    def choices(self) -> tuple["DotProduct", ...]:
        return (self,) + (self.fallback.choices() if self.fallback is not None else ())


VNNI = DotProduct(VNNI_INTRIN, "vpdpbusd", "uint8", 16)
AVX2 = DotProduct(AVX2_INTRIN, "vpmaddubsw", "uint8", 16, accumulators=4,
                  narrow=AVX2_NARROW_INTRIN)
SDOT = DotProduct(SDOT_INTRIN, "sdot", "int8", 4)
SMMLA = DotProduct(SMMLA_INTRIN, "smmla", "int8", 2, reduce=8, rows=2, fallback=SDOT)

_registered = False
TVM_INTRINSICS = "tvm.s_tir.tensor_intrin"
TVM_CPU_INTRINSICS = ("x86", "arm_cpu")  # the modules of it that our CPU targets use


def import_tvm_cpu_intrinsics() -> None:
    """Register TVM's own CPU tensor intrinsics (sdot, udot, VNNI) without its GPU ones.

    `import tvm.s_tir.tensor_intrin` parses about 250 TVMScript functions, most of them CUDA's
    tensor-core intrinsics: 15 s on this machine, in every process that tunes or opens a log
    and in every build worker of a tune (MetaSchedule imports the package before it builds a
    candidate). This puts the package in sys.modules without running its __init__, then
    imports the CPU modules; a later `import tvm.s_tir.tensor_intrin` finds it there, and its
    other modules can still be imported by name. No qcompile target tensorizes with the
    others (our OpenCL spaces take MetaSchedule's "cuda" rules, which name no intrinsic).
    Does nothing when the package was imported already."""
    import importlib
    import importlib.util
    import sys

    if TVM_INTRINSICS not in sys.modules:
        spec = importlib.util.find_spec(TVM_INTRINSICS)
        sys.modules[TVM_INTRINSICS] = importlib.util.module_from_spec(spec)
    for name in TVM_CPU_INTRINSICS:
        importlib.import_module(f"{TVM_INTRINSICS}.{name}")


def register() -> None:
    """Register our intrinsics with TVM (once per process)."""
    global _registered
    if _registered:
        return
    import_tvm_cpu_intrinsics()  # TVM's own (sdot, udot, ...)
    from tvm.s_tir import TensorIntrin

    desc, impl = _dot_16x4(_vpdpbusd)
    TensorIntrin.register(VNNI_INTRIN, desc, impl, override=True)
    TensorIntrin.register(TVM_VNNI_INTRIN, desc, impl, override=True)
    TensorIntrin.register(AVX2_INTRIN, *_dot_16x4(_pmaddubsw_x4), override=True)
    TensorIntrin.register(AVX2_NARROW_INTRIN, *_dot_16x4(_pmaddubsw_x2), override=True)
    TensorIntrin.register(SMMLA_INTRIN, *_smmla_2x2x8(), override=True)
    TensorIntrin.register(DEPTHWISE_INTRIN["vpdpbusd"], *_depthwise_16x4("uint8", _vpdpbusd),
                          override=True)
    TensorIntrin.register(DEPTHWISE_INTRIN["vpmaddubsw"],
                          *_depthwise_16x4("uint8", _pmaddubsw_x4), override=True)
    TensorIntrin.register(DEPTHWISE_INTRIN["sdot"], *_depthwise_16x4("int8", _sdot_x4),
                          override=True)
    for name, (desc, impl) in palette_lookup.intrinsics().items():
        TensorIntrin.register(name, desc, impl, override=True)
    _registered = True


def dot_product_for(tvm_target) -> DotProduct | None:
    """The dot-product instruction `tvm_target` has, or None (int8 kernels stay unpacked)."""
    from tvm.target import codegen

    if tvm_target.kind.name != "llvm":
        return None
    triple = str(tvm_target.attrs.get("mtriple", "") or "")
    if triple.startswith(("aarch64", "arm64")):
        if codegen.target_has_features("i8mm", tvm_target) and \
                codegen.target_has_features("dotprod", tvm_target):
            return SMMLA
        return SDOT if codegen.target_has_features("dotprod", tvm_target) else None
    if triple and not triple.startswith(("x86_64", "i686")):
        return None
    if codegen.target_has_features("avx512vnni", tvm_target):
        return VNNI
    return AVX2 if codegen.target_has_features("avx2", tvm_target) else None


def _dot_16x4(instruction):
    """C[i] += sum_k A[k] * B[i, k], i < 16, k < 4 (u8 x s8): `instruction` on the 4
    activation bytes broadcast to 64 and the 64-byte weight block."""
    from tvm.script import tirx as T

    @T.prim_func(s_tir=True)
    def desc(A: T.Buffer((4,), "uint8", offset_factor=1),
             B: T.Buffer((16, 4), "int8", offset_factor=1),
             C: T.Buffer((16,), "int32", offset_factor=1)) -> None:
        with T.sblock("root"):
            T.reads(C[0:16], A[0:4], B[0:16, 0:4])
            T.writes(C[0:16])
            for i in T.serial(0, 16):
                for k in T.serial(0, 4):
                    with T.sblock("update"):
                        vi, vk = T.axis.remap("SR", [i, k])
                        C[vi] = C[vi] + T.cast(A[vk], "int32") * T.cast(B[vi, vk], "int32")

    @T.prim_func(s_tir=True)
    def impl(A: T.Buffer((4,), "uint8", offset_factor=1),
             B: T.Buffer((16, 4), "int8", offset_factor=1),
             C: T.Buffer((16,), "int32", offset_factor=1)) -> None:
        with T.sblock("root"):
            T.reads(C[0:16], A[0:4], B[0:16, 0:4])
            T.writes(C[0:16])
            a_i32 = T.reinterpret(A.vload([0], "uint8x4"), dtype="int32")
            C[T.ramp(T.int32(0), 1, 16)] = instruction(
                C.vload([0], dtype="int32x16"),
                T.reinterpret(T.broadcast(a_i32, 16), dtype="uint8x64"),
                B.vload([0, 0], dtype="int8x64"))

    return desc, impl


def _smmla_2x2x8():
    """C[i, j] += sum_k A[i, k] * B[j, k] for i, j < 2, k < 8: one `smmla`.

    A's two rows may lie anywhere (a row stride: two output pixels of a conv); B is a packed
    2 x 8 weight block; C's two rows are two pixels' pair of output channels. The instruction's
    accumulator is C row-major, its first operand A's rows concatenated, its second B."""
    from tvm.script import tirx as T

    @T.prim_func(s_tir=True)
    def desc(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (2, 8), "int8", offset_factor=1, strides=[T.int32(), 1])
        B = T.match_buffer(b, (2, 8), "int8", offset_factor=1)
        C = T.match_buffer(c, (2, 2), "int32", offset_factor=1, strides=[T.int32(), 1])
        with T.sblock("root"):
            T.reads(C[0:2, 0:2], A[0:2, 0:8], B[0:2, 0:8])
            T.writes(C[0:2, 0:2])
            for i, j, k in T.grid(2, 2, 8):
                with T.sblock("update"):
                    vi, vj, vk = T.axis.remap("SSR", [i, j, k])
                    C[vi, vj] = C[vi, vj] + T.cast(A[vi, vk], "int32") * T.cast(B[vj, vk],
                                                                                  "int32")

    @T.prim_func(s_tir=True)
    def impl(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (2, 8), "int8", offset_factor=1, strides=[T.int32(), 1])
        B = T.match_buffer(b, (2, 8), "int8", offset_factor=1)
        C = T.match_buffer(c, (2, 2), "int32", offset_factor=1, strides=[T.int32(), 1])
        with T.sblock("root"):
            T.reads(C[0:2, 0:2], A[0:2, 0:8], B[0:2, 0:8])
            T.writes(C[0:2, 0:2])
            acc = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.aarch64.neon.smmla.v4i32.v16i8"),
                T.Shuffle([C.vload([0, 0], "int32x2"), C.vload([1, 0], "int32x2")],
                          [0, 1, 2, 3]),
                T.Shuffle([A.vload([0, 0], "int8x8"), A.vload([1, 0], "int8x8")],
                          list(range(16))),
                B.vload([0, 0], "int8x16"), dtype="int32x4")
            C[0, T.ramp(T.int32(0), 1, 2)] = T.Shuffle([acc], [0, 1])
            C[1, T.ramp(T.int32(0), 1, 2)] = T.Shuffle([acc], [2, 3])

    return desc, impl


def _vpdpbusd(acc, a, b):
    """One `vpdpbusd`: 16 int32 lanes += 4 u8 x s8 products each."""
    from tvm.script import tirx as T

    return T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.512"),
                                   acc, a, b, dtype="int32x16")


def _pmaddubsw(a_half, b_half):
    """`vpmaddubsw` (32 u8 x s8 products, pairs summed into int16, saturating), widened to
    int32 by `vpmaddwd` with ones (the pairs of pairs: 8 sums of 4)."""
    from tvm.script import tirx as T

    pairs = T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.ub.sw"),
                                    a_half, b_half, dtype="int16x16")
    return T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.wd"),
                                   pairs, T.broadcast(T.int16(1), 16), dtype="int32x8")


def _halves(a_parts, b):
    """Per 32-byte half of the 64-byte block, the sum over `a_parts` of `_pmaddubsw(part,
    b)`: 16 int32 lanes."""
    from tvm.script import tirx as T

    halves = []
    for h in range(2):
        lanes = list(range(32 * h, 32 * h + 32))
        b_half = T.Shuffle([b], lanes)
        sums = [_pmaddubsw(T.Shuffle([part], lanes), b_half) for part in a_parts]
        halves.append(sum(sums[1:], sums[0]))
    return T.Shuffle(halves, list(range(16)))


def _pmaddubsw_x4(acc, a, b):
    """The sums of `_vpdpbusd` on AVX2, exactly: per 32-byte half, `vpmaddubsw` of the
    activations' low 7 bits and of their top bit, each widened by `vpmaddwd` (intrinsics'
    docstring)."""
    from tvm.script import tirx as T

    low = T.bitwise_and(a, T.broadcast(T.uint8(0x7F), 64))
    top = T.bitwise_and(a, T.broadcast(T.uint8(0x80), 64))
    return acc + _halves([low, top], b)


def _pmaddubsw_x2(acc, a, b):
    """The sums of `_vpdpbusd` on AVX2 for weights within [-64, 64]: one `vpmaddubsw` per
    half (a pair of products is at most 2 x 255 x 64 = 32640 in magnitude: no saturation)."""
    return acc + _halves([a], b)


def _sdot_x4(acc, a, b):
    """Four `sdot`s, one per quarter of the 16 lanes: the same sums as `_vpdpbusd`, s8 x s8."""
    from tvm.script import tirx as T

    quarters = []
    for q in range(4):
        quarters.append(T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id("llvm.aarch64.neon.sdot.v4i32.v16i8"),
            T.Shuffle([acc], list(range(4 * q, 4 * q + 4))),
            T.Shuffle([a], list(range(16 * q, 16 * q + 16))),
            T.Shuffle([b], list(range(16 * q, 16 * q + 16))), dtype="int32x4"))
    return T.Shuffle(quarters, list(range(16)))


def _depthwise_16x4(a_dtype: str, instruction):
    """C[i] += sum_k A[k, i] * B[i, k], i < 16, k < 4: 16 channels' sums over 4 taps.
    A's rows (taps) lie a stride apart; they are interleaved so that lane i holds
    A[0..3, i], the layout of B's row i."""
    from tvm.script import tirx as T

    lanes = DEPTHWISE_LANES
    interleave = [k * lanes + i for i in range(lanes) for k in range(4)]

    @T.prim_func(s_tir=True)
    def desc(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (4, lanes), a_dtype, offset_factor=1, strides=[T.int32(), 1])
        B = T.match_buffer(b, (lanes, 4), "int8", offset_factor=1)
        C = T.match_buffer(c, (lanes,), "int32", offset_factor=1)
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:4, 0:lanes], B[0:lanes, 0:4])
            T.writes(C[0:lanes])
            for i, k in T.grid(lanes, 4):
                with T.sblock("update"):
                    vi, vk = T.axis.remap("SR", [i, k])
                    C[vi] = C[vi] + T.cast(A[vk, vi], "int32") * T.cast(B[vi, vk], "int32")

    vector = f"{a_dtype}x{lanes}"

    @T.prim_func(s_tir=True)
    def impl(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (4, lanes), a_dtype, offset_factor=1, strides=[T.int32(), 1])
        B = T.match_buffer(b, (lanes, 4), "int8", offset_factor=1)
        C = T.match_buffer(c, (lanes,), "int32", offset_factor=1)
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:4, 0:lanes], B[0:lanes, 0:4])
            T.writes(C[0:lanes])
            C[T.ramp(T.int32(0), 1, lanes)] = instruction(
                C.vload([0], dtype="int32x16"),
                T.Shuffle([A.vload([0, 0], vector), A.vload([1, 0], vector),
                           A.vload([2, 0], vector), A.vload([3, 0], vector)], interleave),
                B.vload([0, 0], dtype="int8x64"))

    return desc, impl
