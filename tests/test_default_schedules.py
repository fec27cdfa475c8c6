"""Default schedules for the kernels without a tuning record or a packed int8 schedule
(schedules/cpu/float_default.py): every conv/matmul kernel of a model gets one, and the outputs
are those of TVM's unscheduled code."""

import logging
import re

import numpy as np
import pytest

import qcompile
from models import (assert_close, conv_relu, depthwise_grouped, gemm_matmul, onnxruntime_outputs,
                    packed_convnet, random_inputs)
from qcompile.schedules.cpu import float_default, tiles as loop_tiles
from test_int8_kernels import x86_target

UNSCHEDULED = "keeps the unscheduled code"


def _compile(path, target, out, caplog, **options):
    with caplog.at_level(logging.INFO, logger=loop_tiles.log.name):
        artifact = qcompile.compile(path, target, out, tuning_log=False, **options)
    failed = [r.getMessage() for r in caplog.records
              if r.name == loop_tiles.log.name and UNSCHEDULED in r.getMessage()]
    assert not failed, failed
    return artifact


def _default_schedules(path, lanes=float_default.VECTOR, keep=lambda name: True):
    """{kernel name: (kind, scheduled TIR text) or None} of the float default schedule of each
    kernel of the host build of `path` whose name `keep` accepts."""
    import tvm

    from qcompile.lower import kernels
    from qcompile.targets import load_target

    target = load_target("host")
    fused = kernels(qcompile.import_onnx(path).mod, target)
    found = {}
    with target.to_tvm():
        for gvar, func in fused.functions.items():
            if isinstance(func, tvm.tirx.PrimFunc) and keep(gvar.name_hint):
                scheduled = float_default.schedule(func, lanes)
                found[gvar.name_hint] = scheduled and (scheduled[1],
                                                       scheduled[0].mod["main"].script())
    return found


@pytest.mark.parametrize("build, anchors", [(conv_relu, 1), (depthwise_grouped, 2),
                                            (gemm_matmul, 2), (packed_convnet, 4)])
def test_fp32_kernels_get_a_schedule_and_match_onnxruntime(build, anchors, save_model, tmp_path,
                                                           caplog):
    model = build()
    artifact = _compile(save_model(model), "host", tmp_path / "out", caplog)
    assert artifact.manifest.kernels["float_default_schedules"] >= anchors
    with qcompile.load(artifact.directory) as loaded:
        for seed in range(2):
            feeds = random_inputs(model, seed)
            expected = onnxruntime_outputs(model, feeds)
            outputs = loaded.run(feeds)
            for name, value in expected.items():
                assert_close(outputs[name], value)


def test_int8_depthwise_matches_the_unscheduled_kernel(save_model, tmp_path, caplog,
                                                       monkeypatch):
    """On an x86 CPU with no instruction to pack for (SSE4.2), the int8 graph's depthwise
    conv (NHWC, its weights HWIO since compile time) is not packed for a dot product: its
    default schedule computes exactly what TVM's unscheduled kernel computes."""
    model = packed_convnet()
    path = save_model(model)
    target = x86_target(tmp_path, "nehalem")
    calibration = [random_inputs(model, seed=10 + i) for i in range(8)]
    scheduled = _compile(path, str(target), tmp_path / "scheduled", caplog, quantize="int8",
                         calibration=calibration)
    assert scheduled.manifest.kernels["int8_default_schedules"] == 0
    assert scheduled.manifest.kernels["float_default_schedules"] >= 4
    monkeypatch.setattr(float_default, "apply", lambda mod, *_: mod)
    plain = qcompile.compile(path, str(target), tmp_path / "plain", tuning_log=False,
                             quantize="int8", calibration=calibration)
    assert plain.manifest.kernels["float_default_schedules"] == 0
    with qcompile.load(scheduled.directory) as a, qcompile.load(plain.directory) as b:
        for seed in range(3):
            feeds = random_inputs(model, seed)
            assert np.array_equal(a.run(feeds)["y"], b.run(feeds)["y"])


def test_matmuls_read_their_weights_in_panels():
    """A float matmul on a constant [K, N] weight gets it packed into panels of the default
    tile's width, read contiguously: [N/P, K, P], P = 50 for N = 1000 in a matrix-vector
    product (a classifier's last layer), P = 8 with several rows (the vector tile: 1000 is
    not a multiple of 16). Its outputs are numpy's."""
    import tvm
    from tvm import relax

    from qcompile.lower import lower
    from qcompile.targets import load_target

    rng = np.random.default_rng(0)
    w = rng.standard_normal((96, 1000)).astype("float32")
    shapes = {}
    for rows in (1, 4):
        x = rng.standard_normal((rows, 96)).astype("float32")
        bb = relax.BlockBuilder()
        xv = relax.Var("x", relax.TensorType(x.shape, "float32"))
        with bb.function("main", [xv]):
            with bb.dataflow():
                out = bb.emit_output(bb.emit(relax.op.matmul(xv, relax.const(w))))
            bb.emit_func_output(out)
        target = load_target("host")
        lowered = lower(bb.get(), target)
        shapes[rows] = re.sub(r"T\.int64\((\d+)\)", r"\1", lowered.script())
        executable = tvm.compile(lowered, target.to_tvm(), relax_pipeline=None)
        got = tvm.relax.VirtualMachine(executable, tvm.cpu())["main"](tvm.runtime.tensor(x))
        np.testing.assert_allclose(got.numpy(), x @ w, rtol=1e-4, atol=1e-4)
    assert "(20, 96, 50)" in shapes[1] and "(96, 1000)" not in shapes[1]
    assert "(125, 96, 8)" in shapes[4] and "(96, 1000)" not in shapes[4]


@pytest.mark.parametrize("target", ["host", "arm64-dotprod"])
def test_float_convs_read_their_weights_in_panels(target, save_model, tmp_path):
    """A float conv's constant weight is packed as [O/P, KH, KW, I, P], P the target's vector
    tile (16 floats on AVX-512, 8 on NEON, for 48 output channels); its outputs are
    onnxruntime's (on the host)."""
    from models import _w, make_model
    from onnx import helper

    from qcompile.lower import lower
    from qcompile.schedules.cpu.float_default import lanes_of
    from qcompile.targets import load_target

    model = make_model(
        [helper.make_node("Conv", ["x", "w"], ["y"], name="conv", pads=[1, 1, 1, 1])],
        [("x", [1, 3, 10, 10])], [("y", [1, 48, 10, 10])], [_w("w", (48, 3, 3, 3), 3)])
    path = save_model(model)
    loaded = load_target(target)
    panel = 16 if lanes_of(loaded.to_tvm()) >= 16 else 8
    text = re.sub(r"T\.int64\((\d+)\)", r"\1", lower(qcompile.import_onnx(path).mod,
                                                        loaded).script())
    assert f"({48 // panel}, 3, 3, 3, {panel})" in text
    if target == "host":
        artifact = qcompile.compile(path, target, tmp_path / "out", tuning_log=False)
        with qcompile.load(artifact.directory) as compiled:
            feeds = random_inputs(model, 0)
            assert_close(compiled.run(feeds)["y"], onnxruntime_outputs(model, feeds)["y"])


def test_arm64_builds_schedule_every_kernel(save_model, tmp_path, caplog):
    """Cross-compiled for the phone: the fp32 and the int8 model's kernels all get a schedule
    (the numerics on the device are checked by test_device.py)."""
    model = packed_convnet()
    path = save_model(model)
    fp32 = _compile(path, "arm64-dotprod", tmp_path / "fp32", caplog)
    assert fp32.manifest.kernels["float_default_schedules"] >= 4
    int8 = _compile(path, "arm64-dotprod", tmp_path / "int8", caplog, quantize="int8",
                    calibration=[random_inputs(model, seed=10 + i) for i in range(8)])
    assert int8.manifest.kernels["float_default_schedules"] >= 1  # the depthwise conv


def test_a_vector_axis_of_run_time_length_is_padded_not_bounds_checked():
    """Attention scores over the cached tokens: the output's last axis is known only at run
    time. The anchor computes over it rounded up to the vector width (no bounds check in its
    vector loop, which kept it scalar) and the kernel still writes exactly that length."""
    import tvm
    from tvm import te, tirx
    from tvm.sym.analyzer import Analyzer

    from qcompile.targets import load_target

    total = tirx.Var("total", "int64")
    q = te.placeholder((1, 2, 4, 16), name="q")
    k = te.placeholder((1, 2, 16, total), name="k")
    r = te.reduce_axis((0, 16), "r")
    scores = te.compute((1, 2, 4, total), lambda a, h, i, j: te.sum(
        q[a, h, i, r] * k[a, h, r, j], axis=r), name="scores")
    scaled = te.compute(scores.shape, lambda *idx: scores[idx] * 0.5, name="scaled")
    sch, kind = float_default.schedule(te.create_prim_func([q, k, scaled]))
    assert kind == "float"
    anchors = [b for b in sch.get_child_blocks(sch.get_sblock("root"))
               if sch.get(b).name_hint.startswith("scores")]
    extent = sch.get(anchors[0]).iter_vars[3].dom.extent  # the vector axis: whole vectors
    assert Analyzer().can_prove(tirx.floormod(extent, float_default.VECTOR) == 0)
    kernel = tvm.compile(sch.mod, target=load_target("host").to_tvm())
    rng = np.random.default_rng(0)
    for length in (13, 40):
        a = rng.standard_normal((1, 2, 4, 16)).astype(np.float32)
        b = rng.standard_normal((1, 2, 16, length)).astype(np.float32)
        out = tvm.runtime.tensor(np.full((1, 2, 4, length), np.nan, np.float32))
        kernel(tvm.runtime.tensor(a), tvm.runtime.tensor(b), out)
        assert_close(out.numpy(), np.einsum("ahir,ahrj->ahij", a, b) * 0.5)


def test_transcendentals_are_vector_arithmetic(save_model, tmp_path):
    """Sigmoid, softmax, exp, erf and tanh (a SwiGLU, attention's softmax, BERT's GELU) are
    computed by TVM's fast_exp, fast_erf and fast_tanh, with no call of the C library left in
    any kernel (it kept them scalar), and give numpy's and scipy's float64 values to a few
    float32 roundings, over inputs far into both tails."""
    import tvm
    from onnx import helper
    from scipy.special import erf

    from models import make_model
    from qcompile.lower import kernels
    from qcompile.targets import load_target

    shape = [3, 40]
    model = make_model([helper.make_node("Sigmoid", ["x"], ["s"]),
                        helper.make_node("Mul", ["s", "x"], ["silu"]),
                        helper.make_node("Softmax", ["x"], ["p"], axis=-1),
                        helper.make_node("Exp", ["y"], ["e"]),
                        helper.make_node("Erf", ["x"], ["erf"]),
                        helper.make_node("Tanh", ["x"], ["tanh"])],
                       [("x", shape), ("y", shape)],
                       [(name, shape) for name in ("silu", "p", "e", "erf", "tanh")])
    path = save_model(model)
    fused = kernels(qcompile.import_onnx(path).mod, load_target("host"))
    text = "\n".join(f.script() for f in fused.functions.values()
                     if isinstance(f, tvm.tirx.PrimFunc))
    for call in ("T.exp(", "T.sigmoid(", "T.erf(", "T.tanh("):
        assert call not in text
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(shape) * 30).astype(np.float32)
    x[0] = np.geomspace(1e-6, 4, shape[1])  # erf and tanh near zero: relative error
    y = rng.uniform(-80, 80, shape).astype(np.float32)
    with qcompile.load(qcompile.compile(path, "host", tmp_path / "out").directory) as loaded:
        out = loaded.run({"x": x, "y": y})
    x64, y64 = x.astype(np.float64), y.astype(np.float64)
    p = np.exp(x64 - x64.max(-1, keepdims=True))
    np.testing.assert_allclose(out["silu"], x64 / (1 + np.exp(-x64)), rtol=1e-6, atol=1e-30)
    np.testing.assert_allclose(out["p"], p / p.sum(-1, keepdims=True), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(out["e"], np.exp(y64), rtol=1e-6)
    np.testing.assert_allclose(out["erf"], erf(x64), rtol=5e-7, atol=4e-7)
    np.testing.assert_allclose(out["tanh"], np.tanh(x64), rtol=5e-7, atol=4e-7)


def test_row_kernels_run_in_parallel_rows_of_vectors(save_model, tmp_path, caplog):
    """Softmax, layer norm, a row maximum and a transpose (attention's heads) are scheduled row
    by row (rows.py): vectorized, their reductions into vector partials, in parallel over the
    rows; rows of a length the vector does not divide too. They give onnxruntime's outputs."""
    from onnx import helper, numpy_helper

    from models import make_model

    gamma = numpy_helper.from_array(np.linspace(0.5, 1.5, 48, dtype=np.float32), "gamma")
    beta = numpy_helper.from_array(np.linspace(-1, 1, 48, dtype=np.float32), "beta")
    model = make_model([helper.make_node("Softmax", ["s"], ["p"], axis=-1),
                        helper.make_node("Softmax", ["r"], ["q"], axis=-1),
                        helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["n"],
                                         axis=-1, epsilon=1e-5),
                        helper.make_node("ReduceMax", ["x"], ["m"], axes=[-1], keepdims=0),
                        helper.make_node("Transpose", ["s"], ["t"], perm=[0, 2, 1, 3])],
                       [("s", [1, 4, 64, 64]), ("r", [1, 4, 64, 20]), ("x", [1, 96, 48])],
                       [("p", [1, 4, 64, 64]), ("q", [1, 4, 64, 20]), ("n", [1, 96, 48]),
                        ("m", [1, 96]), ("t", [1, 64, 4, 64])], [gamma, beta], opset=17)
    path = save_model(model)
    kinds = _default_schedules(path)
    for name, (kind, text) in kinds.items():
        assert kind == "rows", name
        assert "T.vectorized" in text and "T.parallel" in text, name
    reductions = [text for kind, text in kinds.values() if "_rf" in text]
    assert len(reductions) >= 2  # softmax over 64 and the layer norm: vector partials
    artifact = _compile(path, "host", tmp_path / "out", caplog)
    with qcompile.load(artifact.directory) as loaded:
        for seed in range(2):
            feeds = random_inputs(model, seed)
            feeds["s"] *= 10
            expected = onnxruntime_outputs(model, feeds)
            outputs = loaded.run(feeds)
            for name, value in expected.items():
                assert_close(outputs[name], value)


def _conv_transpose(kernel, strides, pads=(0, 0, 0, 0), output_padding=(0, 0), cin=16,
                    cout=8):
    """A conv (NHWC in the float graph) then a ConvTranspose with bias and a ReLU."""
    from models import _w, make_model
    from onnx import helper

    attrs = {"strides": list(strides), "pads": list(pads)}
    if any(output_padding):
        attrs["output_padding"] = list(output_padding)
    height, width = 6, 5
    out_h = (height - 1) * strides[0] - pads[0] - pads[2] + kernel[0] + output_padding[0]
    out_w = (width - 1) * strides[1] - pads[1] - pads[3] + kernel[1] + output_padding[1]
    return make_model(
        [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
         helper.make_node("ConvTranspose", ["c", "wt", "bt"], ["u"], name="up", **attrs),
         helper.make_node("Relu", ["u"], ["y"], name="relu")],
        [("x", [1, 4, height, width])], [("y", [1, cout, out_h, out_w])],
        [_w("w", (cin, 4, 3, 3), 40), _w("wt", (cin, cout, *kernel), 41), _w("bt", (cout,), 42)])


@pytest.mark.parametrize("kernel, strides, pads, output_padding, rewritten", [
    ((2, 2), (2, 2), (0, 0, 0, 0), (0, 0), True),     # 2x upsampling: a 1x1 conv, reshuffled
    ((2, 3), (2, 3), (0, 0, 0, 0), (0, 0), True),     # blocks of 2 x 3 pixels
    ((3, 3), (2, 2), (1, 1, 1, 1), (1, 1), False),    # overlapping windows: TVM's lowering
    ((2, 2), (2, 2), (1, 1, 1, 1), (0, 0), False)])   # cropped
def test_transposed_convs_with_blocks_of_their_own_become_1x1_convs(
        kernel, strides, pads, output_padding, rewritten, save_model, tmp_path, caplog):
    from qcompile.lower import kernels
    from qcompile.targets import load_target

    model = _conv_transpose(kernel, strides, pads, output_padding)
    path = save_model(model)
    fused = kernels(qcompile.import_onnx(path).mod, load_target("host"))
    names = [gvar.name_hint for gvar in fused.functions]
    assert any("conv2d_transpose" in n for n in names) != rewritten, names
    artifact = _compile(path, "host", tmp_path / "out", caplog)
    with qcompile.load(artifact.directory) as loaded:
        feeds = random_inputs(model, 5)
        assert_close(loaded.run(feeds)["y"], onnxruntime_outputs(model, feeds)["y"])


def test_pools_put_the_channels_in_the_vector_lanes(save_model, tmp_path, caplog):
    """Max, average and global average pools of an NHWC float graph get the window schedule
    (channels vectorized under the window's loops) and match onnxruntime."""
    from models import residual_pool_concat

    model = residual_pool_concat()
    path = save_model(model)
    found = _default_schedules(path, 16, lambda name: "pool" in name or "mean" in name)
    kinds = {name: kind for name, (kind, _) in found.items()}
    assert all("T.vectorized" in text for _, text in found.values())
    assert len(kinds) >= 3 and set(kinds.values()) == {"windows"}, kinds
    artifact = _compile(path, "host", tmp_path / "out", caplog)
    with qcompile.load(artifact.directory) as loaded:
        for seed in range(2):
            feeds = random_inputs(model, seed)
            assert_close(loaded.run(feeds)["y"], onnxruntime_outputs(model, feeds)["y"])


@pytest.mark.parametrize("rows, depth, columns, panels_outside", [
    (64, 384, 1536, True),     # a transformer's FFN: weights 2.4 MB, input 98 KB
    (3136, 32, 96, False)])    # an early 1x1 conv: input 400 KB, weights 12 KB
def test_the_larger_operand_is_read_once(rows, depth, columns, panels_outside):
    """The tile loop over the larger operand goes outside the other: a matmul whose weights
    outweigh its input walks the weights' column panels outermost (each read once, used for
    every row tile), a conv whose input outweighs its weights walks the pixels outermost. The
    result is the matmul either way."""
    import tvm
    from tvm import te

    from qcompile.targets import load_target

    a = te.placeholder((rows, depth), name="a")
    b = te.placeholder((depth, columns), name="b")
    k = te.reduce_axis((0, depth), "k")
    c = te.compute((rows, columns), lambda i, j: te.sum(a[i, k] * b[k, j], axis=k), name="c")
    sch, kind = float_default.schedule(te.create_prim_func([a, b, c]), 16)
    assert kind == "float"
    text = sch.mod["main"].script()
    fused = re.search(r"for (\w+) in T\.parallel", text).group(1)
    assert fused.startswith("j_0" if panels_outside else "i_0"), fused
    kernel = tvm.compile(sch.mod, target=load_target("host").to_tvm())
    rng = np.random.default_rng(1)
    x = rng.standard_normal((rows, depth)).astype(np.float32)
    w = rng.standard_normal((depth, columns)).astype(np.float32)
    out = tvm.runtime.tensor(np.zeros((rows, columns), np.float32))
    kernel(tvm.runtime.tensor(x), tvm.runtime.tensor(w), out)
    np.testing.assert_allclose(out.numpy(), x @ w, rtol=1e-4, atol=1e-3)


def test_a_padded_int8_conv_with_sliced_channels_keeps_its_instruction(save_model, tmp_path,
                                                                        caplog):
    """An int8 3x3 conv with padding whose 24 output channels are packed as 32 (and sliced
    back), then SiLU, between int8 convs: its padding stays a step of its own, so the packed
    block still matches the dot-product instruction (the padding inlined as a bounds check
    left the kernel on TVM's scalar code, 5x slower: a detector's first conv)."""
    from models import _w, make_model
    from onnx import helper

    model = make_model(
        [helper.make_node("Conv", ["x", "w0"], ["h"], name="pointwise"),
         helper.make_node("Relu", ["h"], ["r"], name="relu"),
         helper.make_node("Conv", ["r", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
         helper.make_node("Sigmoid", ["c"], ["s"], name="sigmoid"),
         helper.make_node("Mul", ["c", "s"], ["m"], name="silu"),
         helper.make_node("Conv", ["m", "w2"], ["y"], name="project")],
        [("x", [1, 8, 16, 16])], [("y", [1, 16, 16, 16])],
        [_w("w0", (12, 8, 1, 1), 49), _w("w", (24, 12, 3, 3), 50), _w("b", (24,), 51),
         _w("w2", (16, 24, 1, 1), 52)])
    path = save_model(model)
    calibration = [random_inputs(model, seed=60 + i) for i in range(8)]
    artifact = _compile(path, "host", tmp_path / "out", caplog, quantize="int8",
                        calibration=calibration,
                        quant_config=qcompile.quantize.QuantConfig(float_stem=False))
    assert artifact.manifest.kernels["int8_default_schedules"] >= 3
    with qcompile.load(artifact.directory) as loaded:
        feeds = random_inputs(model, 3)
        a, e = loaded.run(feeds)["y"].ravel(), onnxruntime_outputs(model, feeds)["y"].ravel()
        assert float(a @ e / (np.linalg.norm(a) * np.linalg.norm(e))) > 0.99
