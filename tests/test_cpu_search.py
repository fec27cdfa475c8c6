"""The space MetaSchedule searches int8 CPU kernels in (schedules/cpu/search_space.py).

TVM's default spaces for x86 (VNNI) and ARM (sdot) give int8 kernels candidates that fail to
build (TVM's vectorizer cannot widen a tensorized block's intrinsic); ours keeps the loop around
it serial, and every candidate builds and computes the same integers. On arm64-i8mm, the smmla
kernels are searched too (tuned over RPC on the emulated phone in test_device.py)."""

import numpy as np
import pytest
import tvm

from spaces import int8_packed_convnet, sampled_schedules
from qcompile import lower
from qcompile.schedules.cpu import intrinsics, search_space as cpu_search
from qcompile.targets import load_target
from qcompile.tuning_log import MODULE_EQUALITY

SEEDS = range(1, 5)


def _packed_kernels(save_model, target):
    """packed_convnet's int8 kernels for `target` that are packed for its dot product:
    {instruction ("vpdpbusd", "sdot", "smmla"): [kernel IRModule]}."""
    from tvm.s_tir import meta_schedule as ms

    intrinsics.register()
    mod = int8_packed_convnet(save_model, target)
    tasks = ms.relax_integration.extract_tasks(lower.kernels(mod, target), target.to_tvm(),
                                               module_equality=MODULE_EQUALITY)
    kernels = {}
    for task in tasks:
        dot = cpu_search.packed_for(task.dispatched[0], target.to_tvm())
        if dot is not None:
            kernels.setdefault(dot.instruction, []).append(task.dispatched[0])
    return kernels


def _build(schedule, tvm_target):
    try:
        return tvm.compile(schedule.mod, target=tvm_target)
    except RuntimeError:  # TVM's InternalError: the candidate does not build
        return None


def _run(executable, func, inputs):
    out = list(func.params)[len(inputs):]
    args = [tvm.runtime.tensor(x) for x in inputs] + [
        tvm.runtime.tensor(np.zeros([int(d) for d in p.shape], str(p.dtype))) for p in out]
    executable(*args)
    return [a.numpy() for a in args[len(inputs):]]


def _inputs(func, rng):
    """Random values for the kernel's input tensors (all params but the last, its output)."""
    found = []
    for p in list(func.params)[:-1]:
        shape, dtype = [int(d) for d in p.shape], str(p.dtype)
        if dtype.startswith(("int", "uint")):
            info = np.iinfo(dtype)
            low, high = max(int(info.min), -100), min(int(info.max), 100)
            found.append(rng.integers(low, high + 1, shape).astype(dtype))
        else:
            found.append(rng.uniform(0.001, 0.01, shape).astype(dtype))
    return found


def test_host_int8_candidates_all_build_and_compute_the_same_integers(save_model):
    """Host (x86): every sampled candidate of each packed int8 kernel builds and gives the
    unscheduled kernel's outputs (on AVX2, with vpmaddubsw); with VNNI, TVM's default space
    has candidates that fail to build."""
    target = load_target("host")
    tvm_target = target.to_tvm()
    dot = intrinsics.dot_product_for(tvm_target)
    if dot is None:
        pytest.skip("this CPU has no integer dot-product instruction: int8 kernels stay unpacked")
    kernels = _packed_kernels(save_model, target)[dot.instruction]
    assert len(kernels) == 3  # packed_convnet: two convs and the Gemm
    rng = np.random.default_rng(0)
    tvm_failed = 0
    for mod in kernels:
        func = mod["main"]
        inputs = _inputs(func, rng)
        expected = _run(tvm.compile(func, target=tvm_target), func, inputs)
        for schedule in sampled_schedules(func, tvm_target, cpu_search.space(mod, tvm_target),
                                          SEEDS):
            assert schedule is not None
            built = _build(schedule, tvm_target)
            assert built is not None, schedule.trace
            for got, want in zip(_run(built, func, inputs), expected):
                assert np.array_equal(got, want)
            if dot is intrinsics.AVX2 and len(func.params[1].shape) == 6:  # the convs
                # TVM's space does not know the instruction: ours tensorizes with it
                assert "vpmaddubsw" in built.mod.inspect_source("asm")
        tvm_failed += sum(s is None or _build(s, tvm_target) is None for s in sampled_schedules(
            func, tvm_target, "post-order-apply", SEEDS))
    if dot is intrinsics.VNNI:  # TVM's own space tensorizes for VNNI, not for AVX2
        assert tvm_failed >= 1, \
            "TVM's default space built every candidate: is the vectorizer fixed?"


@pytest.mark.parametrize("name,instructions", [("arm64-dotprod", {"sdot"}),
                                               ("arm64-i8mm", {"sdot", "smmla"})])
def test_arm_int8_candidates_all_build_with_the_instruction(save_model, name, instructions):
    """arm64-dotprod and arm64-i8mm: every sampled candidate of each packed kernel builds, and
    the smmla kernels' candidates use smmla (before, TVM's search could not emit it, and its
    sdot space gave candidates that fail to build)."""
    target = load_target(name)
    tvm_target = target.to_tvm()
    kernels = _packed_kernels(save_model, target)
    assert set(kernels) == instructions
    tvm_failed = 0
    for instruction, mods in kernels.items():
        for mod in mods:
            for schedule in sampled_schedules(mod["main"], tvm_target,
                                              cpu_search.space(mod, tvm_target), SEEDS):
                assert schedule is not None
                built = _build(schedule, tvm_target)
                assert built is not None, schedule.trace
                if instruction == "smmla":
                    assert "smmla" in built.mod.inspect_source("asm")
            if instruction == "sdot":
                tvm_failed += sum(s is None or _build(s, tvm_target) is None
                                  for s in sampled_schedules(mod["main"], tvm_target,
                                                             "post-order-apply", SEEDS))
    assert tvm_failed >= 1, "TVM's default space built every candidate: is the vectorizer fixed?"
