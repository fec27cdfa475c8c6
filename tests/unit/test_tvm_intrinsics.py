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
             intrinsics.SMMLA_INTRIN):
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
