"""Opening a tuning log registers the tensor intrinsics its records name, and only TVM's CPU
ones: its package's __init__ parses CUDA's tensor-core intrinsics too (about 15 s a process)."""

from __future__ import annotations

import subprocess
import sys

PROBE = """
import sys
from qcompile.schedules.cpu import intrinsics
intrinsics.register()
from tvm.s_tir import TensorIntrin
for name in (intrinsics.SDOT_INTRIN, intrinsics.VNNI_INTRIN, intrinsics.TVM_VNNI_INTRIN,
             intrinsics.SMMLA_INTRIN, intrinsics.AVX2_INTRIN,
             *intrinsics.DEPTHWISE_INTRIN.values()):
    TensorIntrin.get(name)  # raises when it is not registered
import tvm.s_tir.tensor_intrin  # what MetaSchedule's tune context and builder import
loaded = sorted(m for m in sys.modules if m.startswith("tvm.s_tir.tensor_intrin."))
print(" ".join(loaded))
"""


def test_only_the_cpu_intrinsics_are_imported():
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    modules = done.stdout.split()
    assert "tvm.s_tir.tensor_intrin.x86" in modules
    assert "tvm.s_tir.tensor_intrin.arm_cpu" in modules
    assert "tvm.s_tir.tensor_intrin.cuda" not in modules


def test_each_cpu_gets_its_dot_product_instruction():
    """x86: VNNI where the CPU has it, else AVX2's vpmaddubsw pairs, else none (TVM's own int8
    kernels); ARM: smmla with i8mm, sdot with dotprod, else none."""
    import tvm

    from qcompile.schedules.cpu import intrinsics

    def dot(mcpu, triple="x86_64-linux-gnu", attrs=()):
        config = {"kind": "llvm", "mtriple": triple, "mcpu": mcpu}
        if attrs:
            config["mattr"] = list(attrs)
        return intrinsics.dot_product_for(tvm.target.Target(config))

    assert dot("cascadelake") is intrinsics.VNNI
    assert dot("znver4") is intrinsics.VNNI
    assert dot("haswell") is intrinsics.AVX2
    assert dot("znver3") is intrinsics.AVX2
    assert dot("nehalem") is None
    arm = "aarch64-linux-gnu"
    assert dot("generic", arm, ["+neon", "+dotprod", "+i8mm"]) is intrinsics.SMMLA
    assert dot("generic", arm, ["+neon", "+dotprod"]) is intrinsics.SDOT
    assert dot("generic", arm, ["+neon"]) is None
    # AVX2 has 16 vector registers, a 16-lane int32 accumulator takes two of them
    assert intrinsics.AVX2.accumulators < intrinsics.VNNI.accumulators
