"""GPU (OpenCL) builds compute what the CPU computes: every kernel of a Mali or Adreno build
of the test models, in int8, 4-bit (W4A8 and W4A16 on Gemms, W4A16 on 1x1 convolutions),
fp16 and fp32, runs on pocl (an OpenCL implementation for CPUs, tests/opencl.py) and matches
the same kernel compiled for the CPU. This found a dlight rule that computes wrong results,
and one that does on Adreno (schedules/opencl/default.py): the grouped conv of
depthwise_grouped and the convs of packed_convnet are where they showed."""

import pytest
import tvm

import qcompile
from models import (depthwise_grouped, gemm_matmul, packed_convnet, pointwise_chain,
                    random_inputs, residual_pool_concat)
from opencl import check_kernel
from qcompile import lower
from qcompile.frontend import import_onnx
from qcompile.quantize import QuantConfig, quantize, quantize_weights, to_fp16
from qcompile.targets import load_target

INT_TOLERANCE = 1        # an int8 result of float requantization may round one step apart
FLOAT_TOLERANCE = 1e-5   # relative to the largest output value
FP16_TOLERANCE = 4e-3    # fp16 kernels run widened to float on pocl: a few fp16 steps apart
# 4-bit kernels sum each group's scaled int32 total in float, in another order on the GPU, then
# subtract the input zero point's share: on random buffers (totals of either sign, far larger
# than a model's) that cancels to 1e-5 (a Gemm) or 2e-4 (a 1x1 conv's ReLU output) of the
# largest output; a wrong index or a lost group is off by the outputs' own size. (A W4A8
# layer feeding an int8 one quantizes that float in its kernel: on random buffers the
# cancellation is then many integer steps, so the 1x1 convolutions are checked in W4A16 here
# and W4A8's kernel on a Gemm, whose output is float.)
INT4_TOLERANCE = 1e-3


def _model(path, model, precision, target):
    float_model = import_onnx(path)
    if precision in ("int8", "int4", "lut4"):
        calibration = [random_inputs(model, seed=10 + i) for i in range(8)]
        return quantize(float_model, calibration,
                        QuantConfig(weight_bits=8 if precision == "int8" else 4,
                                    palettes=precision == "lut4"), target)
    if precision == "int4-weights":
        return quantize_weights(float_model, "weight-only", QuantConfig(weight_bits=4), target)
    if precision == "fp16":
        return to_fp16(float_model)
    return float_model


@pytest.mark.parametrize("target_name, model, precision", [
    ("mali", depthwise_grouped, "int8"), ("mali", gemm_matmul, "int8"),
    ("mali", residual_pool_concat, "int8"), ("mali", depthwise_grouped, "fp16"),
    ("mali", depthwise_grouped, "fp32"),
    ("mali", packed_convnet, "int8"),
    ("adreno", depthwise_grouped, "int8"), ("adreno", packed_convnet, "int8"),
    ("adreno", gemm_matmul, "fp16"),
    ("mali", gemm_matmul, "int4"), ("mali", gemm_matmul, "int4-weights"),
    ("adreno", gemm_matmul, "int4"), ("mali", pointwise_chain, "int4-weights"),
    ("mali", gemm_matmul, "lut4")])
def test_every_gpu_kernel_matches_the_cpu(save_model, target_name, model, precision):
    """Each fused kernel: its dlight-scheduled OpenCL on pocl against the unscheduled kernel
    compiled for this CPU, from the same random buffers."""
    onnx_model = model()
    target = load_target(target_name)
    graph = _model(save_model(onnx_model), onnx_model, precision, target)
    fused = lower.kernels(graph.mod, target)
    scheduled = lower.schedule(fused, target)
    device = target.to_tvm().attrs["device"]
    checks = []
    for gvar, func in scheduled.functions.items():
        if not isinstance(func, tvm.tirx.PrimFunc):
            continue
        checks.append(check_kernel(gvar.name_hint, fused[gvar.name_hint], func, device))
    assert checks
    tolerance = {"fp16": FP16_TOLERANCE, "int4": INT4_TOLERANCE, "lut4": INT4_TOLERANCE,
                 "int4-weights": INT4_TOLERANCE}.get(precision, FLOAT_TOLERANCE)
    wrong = [c for c in checks if (c.integer_error or 0) > INT_TOLERANCE
             or (c.float_error or 0.0) > tolerance]
    assert not wrong, f"kernels whose OpenCL result differs from the CPU's: {wrong}"
    if precision in ("int8", "int4", "lut4"):  # int8 results were compared: int8 layers
        assert sum(1 for c in checks if c.integer_error is not None) >= 2


def test_gpu_build_reports_its_default_schedules(save_model, tmp_path):
    artifact = qcompile.compile(save_model(gemm_matmul()), "mali", tmp_path / "out",
                                quantize="int8",
                                calibration=[random_inputs(gemm_matmul(), seed=i)
                                             for i in range(4)])
    kernels = artifact.manifest.kernels
    assert kernels["gpu_default_schedules"] == kernels["total"] > 0
    assert kernels["tuned"] == 0
    assert b"char" in artifact.library.read_bytes()  # int8 kernels in the OpenCL source
