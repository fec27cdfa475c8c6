"""Tuning GPU (OpenCL) kernels: MetaSchedule's GPU search, candidates built as OpenCL, measured
on pocl (an OpenCL implementation for this CPU: qcompile.devices.pocl) instead of a phone, the tuning
log applied by compile, and every tuned kernel checked against the CPU. The first run of this
found MetaSchedule candidates that compute wrong int8 results (TVM's OpenCL code generator
packs gathered int8 vectors into an int): the builder now rejects them."""

import json

import pytest
import tvm

import qcompile
from models import packed_convnet, random_inputs
from opencl import check_kernel, opencl_source
from spaces import int8_packed_convnet, sampled_schedules
from qcompile import lower
from qcompile.cli import main
from qcompile.frontend import import_onnx
from qcompile.quantize import QuantConfig, quantize
from qcompile.schedules.opencl.default import codegen_defect
from qcompile.targets import load_target
from qcompile.tuning_log import INFO_FILE, STAND_IN_KEY, open_log


@pytest.fixture(scope="module")
def gpu_tuned(tmp_path_factory):
    """packed_convnet in int8 for Mali, tuned on pocl: each kernel's dlight schedule and one
    searched candidate (trials=2)."""
    import onnx

    directory = tmp_path_factory.mktemp("gpu-tune")
    model = packed_convnet()
    path = directory / "model.onnx"
    onnx.save(model, str(path))
    calibration = [random_inputs(model, seed=i) for i in range(4)]
    log = qcompile.tune(path, "mali", log_dir=directory / "log", trials=2, quantize="int8",
                        calibration=calibration, pocl=True)
    return {"path": path, "calibration": calibration, "log": log, "dir": directory}


@pytest.mark.slow
def test_gpu_tune_on_pocl_measures_every_kernel(gpu_tuned):
    log = gpu_tuned["log"]
    assert log.emulated and "pocl" in log.device
    assert log.tasks and all(t.records >= 1 and t.best_us for t in log.tasks)
    convs = [t for t in log.tasks if "conv2d" in t.name]
    assert len(convs) == 3
    assert all(t.default_us for t in convs)  # dlight's schedule measured as a candidate
    info = json.loads((log.directory / INFO_FILE).read_text())
    assert info["kind"] == "opencl" and info["device"] == "mali" and STAND_IN_KEY in info


@pytest.mark.slow
def test_compile_applies_a_gpu_log_and_its_kernels_are_right(gpu_tuned, tmp_path, caplog):
    target = load_target("mali")
    with caplog.at_level("WARNING", logger="qcompile"):
        artifact = qcompile.compile(gpu_tuned["path"], "mali", tmp_path / "out",
                                    quantize="int8", calibration=gpu_tuned["calibration"],
                                    tuning_log=gpu_tuned["log"].directory)
    assert "not on the GPU" in caplog.text  # a log measured on pocl says so
    kernels = artifact.manifest.kernels
    assert kernels["tuned"] == kernels["total"] > 0 and kernels["gpu_default_schedules"] == 0
    graph = quantize(import_onnx(gpu_tuned["path"]), gpu_tuned["calibration"], QuantConfig(),
                     target)
    fused = lower.kernels(graph.mod, target)
    scheduled = lower.schedule(fused, target, open_log(gpu_tuned["log"].directory, target))
    checks = [check_kernel(g.name_hint, fused[g.name_hint], f, "mali")
              for g, f in scheduled.functions.items() if isinstance(f, tvm.tirx.PrimFunc)]
    wrong = [c for c in checks if (c.integer_error or 0) > 1 or (c.float_error or 0.0) > 1e-5]
    assert checks and not wrong, wrong


def test_the_packed_int8_gather_defect_is_caught(save_model):
    """dlight's gpu.Matmul with Adreno's configuration emits the defect on packed_convnet's
    int8 convs (schedules/opencl/default.py leaves it out for Adreno): codegen_defect names it,
    and a build containing it is refused."""
    from tvm.s_tir import dlight as dl

    target = load_target("adreno")
    tvm_target = target.to_tvm()
    fused = lower.kernels(int8_packed_convnet(save_model, target), target)
    defective = []
    for gvar, func in fused.functions.items():
        if not isinstance(func, tvm.tirx.PrimFunc) or "conv2d" not in gvar.name_hint:
            continue
        try:
            space = dl.gpu.Matmul().apply(func, tvm_target, False)
        except Exception:  # noqa: BLE001 - the rule asserts on some kernels
            continue
        if space is None:
            continue
        scheduled = space.mod["main"].with_attr("global_symbol", "main")
        defect = codegen_defect(opencl_source(scheduled, "adreno"))
        if defect is not None:
            defective.append(scheduled)
            assert "packs a gathered int8 vector" in defect
    assert defective
    executable = tvm.compile(tvm.IRModule({"main": defective[0]}), target=tvm_target)
    assert "packs a gathered int8 vector" in lower.code_defect(executable.mod, target)


def test_int8_gpu_search_space_has_no_packed_gathers(save_model):
    """MetaSchedule's default GPU space gives packed_convnet's int8 convs candidates with the
    packed-gather defect (the builder rejects them: wasted trials); schedules/opencl/search_space.py's
    space for int8 kernels gives none. Its rules, with TVM's vector lengths, sample exactly
    what TVM's default rules sample."""
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.meta_schedule.builder import local_builder

    from qcompile.schedules.cpu import intrinsics
    from qcompile.schedules.opencl import search_space as gpu_search
    from qcompile.tuning_log import MODULE_EQUALITY

    intrinsics.register()
    target = load_target("mali")
    tvm_target = target.to_tvm()
    mod = int8_packed_convnet(save_model, target)
    tasks = ms.relax_integration.extract_tasks(lower.kernels(mod, target), tvm_target,
                                               module_equality=MODULE_EQUALITY)
    convs = [t.dispatched[0] for t in tasks if "conv2d" in t.task_name]
    assert len(convs) == 3 and all(gpu_search.is_integer_kernel(f) for f in convs)

    def defects(space, func):
        sampled = sampled_schedules(func, tvm_target, space, range(1, 5))
        built = [local_builder.default_build(s.mod, tvm_target, None).imports[0]
                 .inspect_source() for s in sampled if s is not None]
        return sum(codegen_defect(source) is not None for source in built), len(built)

    ours = [defects(gpu_search.space(f, tvm_target), f) for f in convs]
    assert all(bad == 0 and built >= 3 for bad, built in ours), ours
    tvms = [defects("post-order-apply", f) for f in convs]
    assert sum(bad for bad, _ in tvms) >= 3, \
        f"TVM's default GPU space no longer makes packed gathers ({tvms}): is the defect fixed?"
    rebuilt = ms.space_generator.PostOrderApply(
        sch_rules=gpu_search.rules(gpu_search.DEFAULT_VECTOR_LOAD_LENS))
    for seed in range(1, 4):
        [a] = sampled_schedules(convs[0], tvm_target, "post-order-apply", [seed])
        [b] = sampled_schedules(convs[0], tvm_target, rebuilt, [seed])
        assert (a is None) == (b is None)
        if a is not None:
            tvm.ir.assert_structural_equal(a.mod, b.mod)


def test_cli_gpu_tune_needs_a_device_or_pocl(save_model, capsys):
    path = save_model(packed_convnet())
    assert main(["tune", str(path), "--target", "mali", "--quantize", "fp16"]) == 2
    err = capsys.readouterr().err
    assert "--rpc-tracker HOST:PORT" in err and "--pocl" in err
    assert main(["tune", str(path), "--target", "host", "--pocl"]) == 2
    assert "--pocl measures OpenCL (GPU) candidates, and target 'host' is a CPU" in \
        capsys.readouterr().err
    assert main(["tune", str(path), "--target", "mali", "--quantize", "fp16", "--pocl",
                 "--rpc-tracker", "127.0.0.1:9"]) == 2
    assert "on the devices at the tracker or on pocl, not both" in capsys.readouterr().err


def test_cli_pocl_not_installed_says_what_to_install(save_model, tmp_path, capsys,
                                                     monkeypatch):
    """--pocl without pyopencl (here: made unimportable) is refused before any log is
    written, naming the packages to install."""
    import sys

    monkeypatch.setitem(sys.modules, "pyopencl", None)  # `import pyopencl` raises ImportError
    path = save_model(packed_convnet())
    log_dir = tmp_path / "log"
    assert main(["tune", str(path), "--target", "mali", "--quantize", "fp16", "--pocl",
                 "--log", str(log_dir)]) == 2
    err = capsys.readouterr().err
    assert "pocl is not usable here (ModuleNotFoundError" in err
    assert "pip install pyopencl pocl-binary-distribution" in err
    assert not log_dir.exists()


def test_cli_pocl_that_cannot_build_says_why_and_what_to_install(save_model, tmp_path, capsys,
                                                                monkeypatch):
    """--pocl where no OpenCL device builds a kernel (as PyPI's pocl on a CPU its LLVM does not
    know; here: a probe that does not compile) is refused before any log is written, with each
    device's compiler error and the package that helps."""
    from qcompile.devices import pocl

    monkeypatch.setattr(pocl, "PROBE", "__kernel void probe(__global float* a) { a[0] = ; }")
    monkeypatch.setattr(pocl, "_PROBED", {})
    path = save_model(packed_convnet())
    log_dir = tmp_path / "log"
    assert main(["tune", str(path), "--target", "mali", "--quantize", "fp16", "--pocl",
                 "--log", str(log_dir)]) == 2
    err = capsys.readouterr().err
    assert "No OpenCL device here builds a kernel (OpenCL" in err and "error" in err
    assert "apt-get install pocl-opencl-icd" in err
    assert not log_dir.exists()


@pytest.mark.slow  # about 75 s: 8 one-layer models through the GPU pipeline
def test_layer_latency_times_gpu_kernels(save_model):
    """`--quantize auto`'s per-layer timing on a GPU target: each layer's int8 and fp16 kernels,
    cut out and compiled as compile would for Mali (dlight's schedules), built as OpenCL and
    timed, here on pocl; without a tracker (or pocl) it says why it cannot measure."""
    from qcompile import layer_latency
    from qcompile.errors import DeviceError
    from qcompile.quantize.onnx_view import weighted_layers

    model = packed_convnet()
    layers = weighted_layers(model)
    target = load_target("mali").with_compiler()  # the phone's host code: aarch64
    timed = layer_latency.measure(model, layers, target, "fp16", "int8", pocl=True)
    assert set(timed) == {layer.name for layer in layers}
    assert all(t.error is None and t.int8_us > 0 and t.fallback_us > 0 and t.fallback == "fp16"
               for t in timed.values()), timed
    with pytest.raises(DeviceError, match="--rpc-tracker"):
        layer_latency.measure(model, layers, target, "fp16", "int8")
