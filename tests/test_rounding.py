"""GPTQ weight rounding (qcompile/quantize/rounding.py): the patches it learns from are the
convolution's inputs, it lowers the layer's output error on data it did not see, its codes stay
within one step of the weight, and a compiled int8 layer uses the codes a from-the-definition
reference (Optimal Brain Quantization's update, no Cholesky) gives."""

import json

import numpy as np
import pytest

import qcompile
from models import conv_relu, random_inputs
from qcompile.quantize import QuantConfig
from qcompile.quantize.rounding import (DAMPING, SCALE_RATIOS, SHORT_ROW, ConvShape, InputMoments,
                                        conv_patches, fitted_scales, gptq_codes)


def _naive_conv(x, w, strides, pads, dilation, groups):
    n, _, _, _ = x.shape
    o, per_group, kh, kw = w.shape
    x = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    oh = (x.shape[2] - dilation[0] * (kh - 1) - 1) // strides[0] + 1
    ow = (x.shape[3] - dilation[1] * (kw - 1) - 1) // strides[1] + 1
    out = np.zeros((n, o, oh, ow))
    for oc in range(o):
        g = oc // (o // groups)
        for i in range(oh):
            for j in range(ow):
                y, z = i * strides[0], j * strides[1]
                patch = x[:, g * per_group:(g + 1) * per_group,
                          y:y + dilation[0] * (kh - 1) + 1:dilation[0],
                          z:z + dilation[1] * (kw - 1) + 1:dilation[1]]
                out[:, oc, i, j] = (patch * w[oc]).sum(axis=(1, 2, 3))
    return out


@pytest.mark.parametrize("groups,strides,pads,dilation", [
    (1, (2, 2), (1, 0, 1, 2), (1, 1)), (2, (1, 2), (0, 1, 1, 0), (2, 1)),
    (4, (1, 1), (1, 1, 1, 1), (1, 1))])
def test_patches_are_the_convolutions_inputs(groups, strides, pads, dilation):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4, 9, 8))
    w = rng.standard_normal((8, 4 // groups, 3, 2))
    patches = conv_patches(x, ConvShape((3, 2), strides, pads, dilation, groups))
    expected = _naive_conv(x, w, strides, pads, dilation, groups)
    n, o, oh, ow = expected.shape
    got = np.einsum("grk,gkp->grp", w.reshape(groups, o // groups, -1), patches)
    np.testing.assert_allclose(got.reshape(o, n, oh, ow).transpose(1, 0, 2, 3), expected,
                               atol=1e-12)


def _sqnr(reference, approx):
    return 10 * np.log10(np.sum(reference ** 2) / np.sum((reference - approx) ** 2))


def _nearest(w, s):
    return np.clip(np.round(w / s), -127, 127)


def test_gptq_lowers_the_output_error_on_held_out_inputs():
    """Correlated inputs (like a real layer's): fitted on 2000 vectors, measured on 2000 others
    of the same distribution; each code is the floor or the ceiling of its weight."""
    rng = np.random.default_rng(0)
    mixing = rng.standard_normal((64, 64)) * 0.3
    fit, held_out = (rng.standard_normal((2000, 64)) @ mixing for _ in range(2))
    w = rng.standard_normal((64, 32)).astype(np.float32)
    s = (np.abs(w).max(axis=0) / 127).astype(np.float32)
    moments = InputMoments(None)
    moments.update(fit)
    codes = gptq_codes(w, s, moments, "matmul")
    assert codes.dtype == np.int8
    ratio = w.astype(np.float64) / s.astype(np.float64)
    assert np.all(codes >= np.floor(ratio)) and np.all(codes <= np.ceil(ratio))
    assert np.mean(codes != _nearest(w, s)) > 0.05  # it does choose differently
    gain = _sqnr(held_out @ w, held_out @ (codes * s)) - \
        _sqnr(held_out @ w, held_out @ (_nearest(w, s) * s))
    assert gain > 1.5


def test_gptq_depthwise_conv_per_channel_statistics():
    """A 5x5 depthwise conv (as in EfficientNet): H per channel, from two batches."""
    rng = np.random.default_rng(1)
    shape = ConvShape((5, 5), (1, 1), (2, 2, 2, 2), (1, 1), 16)
    smooth = lambda x: x + np.roll(x, 1, axis=3) + np.roll(x, 1, axis=2)  # noqa: E731
    fit, held_out = (smooth(rng.standard_normal((4, 16, 20, 20))) for _ in range(2))
    w = rng.standard_normal((16, 1, 5, 5)).astype(np.float32)
    s = (np.abs(w).reshape(16, -1).max(axis=1) / 127).astype(np.float32)
    moments = InputMoments(shape)
    moments.update(fit[:2])
    moments.update(fit[2:])  # accumulates over calibration batches
    codes = gptq_codes(w, s, moments, "conv2d")
    s4 = s[:, None, None, None]
    conv = lambda weight: _naive_conv(held_out, weight, (1, 1), (2, 2, 2, 2), (1, 1), 16)  # noqa
    reference = conv(w)
    assert _sqnr(reference, conv(codes * s4)) > _sqnr(reference, conv(_nearest(w, s4) * s4)) + 0.7


def test_fitted_scales_lower_a_depthwise_convs_held_out_error():
    """A 3x3 depthwise conv on strongly correlated inputs (neighbouring pixels, as in a
    photo's feature maps) with one dominant tap per row. For some rows a scale a step under
    absmax wins: the dominant tap's clipping goes, through GPTQ's error feedback, to its
    correlated neighbours, and the others' rounding improves. On EfficientNet-Lite0 (1-16% of
    each depthwise layer's rows change) the depthwise weights' own error fell by 3 dB. Each
    scale is a ratio of SCALE_RATIOS times absmax, and never under the floor."""
    rng = np.random.default_rng(0)
    channels = 32
    shape = ConvShape((3, 3), (1, 1), (1, 1, 1, 1), (1, 1), channels)

    def smooth(x):  # a 7x7 box filter (wrapping): neighbours correlate at about 0.9
        for axis in (2, 3):
            x = sum(np.roll(x, k, axis=axis) for k in range(-3, 4)) / 7
        return x

    fit, held_out = (smooth(rng.standard_normal((4, channels, 16, 16))) for _ in range(2))
    w = rng.standard_normal((channels, 1, 3, 3)).astype(np.float32) * 0.1
    w[:, 0, 1, 1] = rng.choice([-1.0, 1.0], channels) * 0.8
    s = (np.abs(w).reshape(channels, -1).max(axis=1) / 127).astype(np.float32)
    moments = InputMoments(shape)
    moments.update(fit)
    fitted = fitted_scales(w, s, moments, "conv2d")
    ratios = fitted / s
    assert np.all(np.isclose(ratios[:, None], SCALE_RATIOS[None], atol=1e-5).any(axis=1))
    assert 0 < np.sum(ratios < 1) < channels
    conv = lambda weight: _naive_conv(held_out, weight, (1, 1), (1, 1, 1, 1), (1, 1),  # noqa
                                      channels)
    reference = conv(w)
    as_fitted = gptq_codes(w, fitted, moments, "conv2d") * fitted[:, None, None, None]
    as_absmax = gptq_codes(w, s, moments, "conv2d") * s[:, None, None, None]
    assert _sqnr(reference, conv(as_fitted)) > _sqnr(reference, conv(as_absmax)) + 0.1
    floor = s * 0.995
    assert np.all(fitted_scales(w, s, moments, "conv2d", floor) >= floor)


def test_long_rows_and_per_tensor_scales_are_not_fitted():
    rng = np.random.default_rng(4)
    moments = InputMoments(None)
    moments.update(rng.standard_normal((200, SHORT_ROW + 1)))
    w = rng.standard_normal((SHORT_ROW + 1, 8)).astype(np.float32)
    s = (np.abs(w).max(axis=0) / 127).astype(np.float32)
    np.testing.assert_array_equal(fitted_scales(w, s, moments, "matmul"), s)
    one = np.array([np.abs(w).max() / 127], np.float32)
    np.testing.assert_array_equal(fitted_scales(w, one, moments, "matmul"), one)


def test_an_input_dead_in_calibration_keeps_its_nearest_codes():
    """An input that is zero on every calibration sample may not be on others: its weights
    are neither zeroed (GPTQ's habit for language models) nor moved."""
    rng = np.random.default_rng(2)
    fit = rng.standard_normal((500, 8))
    fit[:, 3] = 0.0
    w = rng.standard_normal((8, 4)).astype(np.float32)
    s = (np.abs(w).max(axis=0) / 127).astype(np.float32)
    moments = InputMoments(None)
    moments.update(fit)
    codes = gptq_codes(w, s, moments, "matmul")
    np.testing.assert_array_equal(codes[3], _nearest(w[3], s))


def _obq_reference(w_rows, s, h):
    """Optimal Brain Quantization, row by row, from its definition: round the next weight
    (to the floor or ceiling of its original value), spread its error over the remaining
    weights through H^-1, then remove it from H^-1."""
    codes = np.zeros_like(w_rows)
    k = h.shape[0]
    h = h.copy()
    d = np.diag(h).copy()
    d[d <= 0] = 1.0
    h[np.diag_indices(k)] = d + DAMPING * d.mean()
    for r, (row, scale) in enumerate(zip(w_rows.astype(np.float64), s)):
        w = row.copy()
        lower, upper = np.floor(row / scale), np.ceil(row / scale)
        hinv = np.linalg.inv(h)
        for i in range(k):
            q = np.clip(np.clip(np.round(w[i] / scale), lower[i], upper[i]), -127, 127)
            codes[r, i] = q
            err = (w[i] - q * scale) / hinv[i, i]
            w -= err * hinv[i]
            hinv = hinv - np.outer(hinv[:, i], hinv[i]) / hinv[i, i]
    return codes


def test_compiled_layer_uses_the_reference_gptq_codes(save_model, tmp_path):
    """conv_relu compiled with GPTQ rounding (and nothing else that touches the weights):
    its integer outputs equal the reference conv with codes from `_obq_reference` on the
    calibration data's patch statistics, at the (fitted) scales the report gives."""
    model = conv_relu()
    from onnx import numpy_helper

    init = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    calibration = [random_inputs(model, seed=1 + i) for i in range(16)]
    out = tmp_path / "out"
    qcompile.compile(save_model(model), "host", out, quantize="int8", calibration=calibration,
                     quant_config=QuantConfig(float_stem=False, bias_correction=False))
    row = {r["layer"]: r for r in json.loads((out / "quantization.json").read_text())["layers"]}
    assert row["conv"]["weight_rounding"] == "gptq"

    w = init["w"]
    absmax = (np.abs(w).reshape(16, -1).max(axis=1) / 127).astype(np.float32)
    windows = []
    for feed in calibration:
        xp = np.pad(feed["x"].astype(np.float64), ((0, 0), (0, 0), (1, 1), (1, 1)))
        view = np.lib.stride_tricks.sliding_window_view(xp, (3, 3), axis=(2, 3))[:, :, ::2, ::2]
        windows.append(view.transpose(0, 2, 3, 1, 4, 5).reshape(-1, 27))  # [pixels, c*kh*kw]
    patches = np.concatenate(windows)
    h = patches.T @ patches / len(patches)
    # rows of 27 weights: each scale is fitted (a ratio of absmax) on these statistics
    moments = InputMoments(ConvShape((3, 3), (2, 2), (1, 1, 1, 1), (1, 1), 1))
    moments.h, moments.count = h[None], 1
    s_w = fitted_scales(w, absmax, moments, "conv2d")
    assert np.all(np.isclose((s_w / absmax)[:, None], SCALE_RATIOS[None], atol=1e-5).any(axis=1))
    assert (row["conv"]["weight_scale_min"], row["conv"]["weight_scale_max"]) == \
        pytest.approx((s_w.min(), s_w.max()), rel=1e-6)
    codes = _obq_reference(w.reshape(16, -1), s_w, h).reshape(w.shape)
    assert np.sum(codes != _nearest(w, s_w[:, None, None, None])) >= 3  # not plain rounding

    qp = row["conv"]["input"]
    x = random_inputs(model, seed=99)["x"]
    lo, hi = (0, 255) if qp["dtype"] == "uint8" else (-128, 127)
    xq = np.clip(np.round(x / np.float32(qp["scale"])) + qp["zero_point"], lo, hi)
    acc_scale = (np.float32(qp["scale"]) * s_w).astype(np.float32)
    acc = _naive_conv(xq - qp["zero_point"], codes, (2, 2), (1, 1, 1, 1), (1, 1), 1)
    acc += np.round(init["b"] / acc_scale)[None, :, None, None]
    expected = np.maximum(acc.astype(np.float32) * acc_scale[None, :, None, None], 0)
    actual = qcompile.load(out).run({"x": x})["y"]
    np.testing.assert_allclose(actual, expected, rtol=0, atol=float(acc_scale.max()) * 1.01)
    assert np.mean(actual == expected) > 0.99
