"""Helpers for the tests of the spaces MetaSchedule searches (schedules/cpu/search_space.py,
schedules/opencl/search_space.py): a small int8 model's kernels, and candidates sampled like a search's
first trials."""

import tvm

from models import packed_convnet, random_inputs
from qcompile.frontend import import_onnx
from qcompile.quantize import QuantConfig, quantize


def int8_packed_convnet(save_model, target):
    """packed_convnet quantized to int8 for `target` (calibrated on random inputs): its Relax
    module."""
    onnx_model = packed_convnet()
    return quantize(import_onnx(save_model(onnx_model)),
                    [random_inputs(onnx_model, seed=i) for i in range(4)], QuantConfig(),
                    target).mod


def sampled_schedules(func, tvm_target, space, seeds):
    """Schedules of `func` drawn from `space` like MetaSchedule's first trials: the design
    space's trace replayed with fresh random decisions, then its postprocessors (None: one they
    reject)."""
    from tvm.s_tir import meta_schedule as ms

    context = ms.TuneContext(mod=func, target=tvm_target, space_generator=space,
                             search_strategy=ms.search_strategy.ReplayTrace(), task_name="t",
                             num_threads=1)
    design = context.generate_design_space()[0].trace.simplified(remove_postproc=True)
    for seed in seeds:
        schedule = tvm.s_tir.Schedule(func, seed=seed)
        tvm.s_tir.Trace(design.insts, {}).apply_to_schedule(schedule, remove_postproc=True)
        ok = all(p.apply(schedule) for p in context.space_generator.postprocs)
        yield schedule if ok else None
