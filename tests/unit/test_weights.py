"""weights.quantize_weight against the definitions: symmetric int8 codes, the dead channel's
bias floor, bias correction, a pre-quantized model's codes; the simulator and realize both
call it."""

import numpy as np

from qcompile.quantize.rounding import InputMoments
from qcompile.quantize.weights import BIAS_LIMIT, quantize_weight, weight_error_shift


def test_nearest_codes_per_channel_and_per_tensor():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    qw = quantize_weight(w, "conv2d")
    scales = np.abs(w).reshape(4, -1).max(axis=1) / 127
    np.testing.assert_allclose(qw.scales, scales, rtol=1e-6)
    np.testing.assert_array_equal(qw.codes, np.clip(np.round(w / scales[:, None, None, None]),
                                                    -127, 127))
    assert qw.rounding == "nearest" and qw.axis == 0 and qw.codes.dtype == np.int8
    assert np.abs(qw.dequantized() - w).max() <= scales.max() / 2 + 1e-6
    whole = quantize_weight(w, "conv2d", per_channel=False)
    assert whole.scales.shape == (1,) and whole.axis is None
    np.testing.assert_allclose(whole.channel_scales(), np.abs(w).max() / 127, rtol=1e-6)


def test_matmul_scales_run_along_the_output_columns():
    w = np.arange(12, dtype=np.float32).reshape(3, 4) - 5  # [K, N]
    qw = quantize_weight(w, "matmul")
    np.testing.assert_allclose(qw.scales, np.abs(w).max(axis=0) / 127, rtol=1e-6)
    assert qw.channels == 4


def test_a_dead_channel_with_a_bias_gets_a_scale_its_int32_bias_fits():
    w = np.zeros((2, 4, 1, 1), np.float32)
    w[1] = 0.5
    bias = np.array([3.0e4, 0.1], np.float32)  # channel 0 has no weights, a large bias
    qw = quantize_weight(w, "conv2d", bias=bias, input_scale=1e-5)
    assert abs(bias[0] / (1e-5 * qw.scales[0])) <= BIAS_LIMIT * (1 + 1e-6)
    np.testing.assert_allclose(qw.scales[1], 0.5 / 127, rtol=1e-6)
    # without an 8-bit input scale (a 16-bit input adds the bias in float) no floor is needed
    assert quantize_weight(w, "conv2d", bias=bias).scales[0] == 1.0


def test_bias_correction_subtracts_the_mean_shift_of_the_rounding():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((6, 5)).astype(np.float32)  # matmul [K, N]
    means = rng.standard_normal(6)
    bias = rng.standard_normal(5).astype(np.float32)
    qw = quantize_weight(w, "matmul", bias=bias, means=means)
    error = qw.dequantized() - w
    np.testing.assert_allclose(qw.bias, bias - means @ error, rtol=1e-5, atol=1e-7)
    grouped = rng.standard_normal((4, 2, 3, 3)).astype(np.float32)  # groups of 2 inputs
    channel_means = rng.standard_normal(4)  # 2 groups x 2 channels
    shift = weight_error_shift(np.ones_like(grouped), channel_means, "conv2d")
    expected = [9 * channel_means[(o // 2) * 2:(o // 2) * 2 + 2].sum() for o in range(4)]
    np.testing.assert_allclose(shift, expected, rtol=1e-6)


def test_gptq_codes_and_given_codes():
    rng = np.random.default_rng(2)
    w = rng.standard_normal((8, 4)).astype(np.float32)
    moments = InputMoments(None)
    moments.update(rng.standard_normal((64, 8)))
    qw = quantize_weight(w, "matmul", moments=moments)
    assert qw.rounding == "gptq"
    nearest = quantize_weight(w, "matmul")
    assert np.all(np.abs(qw.codes.astype(int) - nearest.codes) <= 1)
    given = (np.ones((8, 4), np.int8), np.full(4, 0.5, np.float32), 1)
    model = quantize_weight(w, "matmul", bias=np.ones(4, np.float32), means=np.ones(8),
                            given=given)
    assert model.rounding == "model" and np.all(model.codes == 1)
    np.testing.assert_array_equal(model.bias, np.ones(4))  # a model's codes: no correction


def test_4_bit_group_scales_fitted_to_the_inputs_moments():
    """Without calibration a group's scale is max |w| / 7 (fp16); with the input's moments it
    is the fraction of that (SCALE_FRACTIONS) whose rounding leaves the least error weighted
    by E[x_k^2], never more than absmax's; a group of weights below fp16's resolution gets
    scale 1 and codes 0 instead of NaN."""
    from qcompile.quantize.weights import SCALE_FRACTIONS, fitted_group_scales, quantize_groups

    rng = np.random.default_rng(3)
    w = rng.standard_normal((64, 8)).astype(np.float32)
    w[5] *= 6.0  # one large weight per column in the first group: absmax wastes its steps
    absmax = fitted_group_scales(w, 32, -8, 7, None, "float16")
    bound = np.abs(w.reshape(2, 32, 8)).max(axis=1)
    np.testing.assert_array_equal(absmax, (bound / 7).astype(np.float16))
    diagonal = rng.uniform(0.5, 2.0, 64)

    def error(scales):
        step = scales.astype(np.float64)[:, None, :]
        blocks = w.reshape(2, 32, 8).astype(np.float64)
        q = np.clip(np.round(blocks / step), -8, 7)
        return (diagonal.reshape(2, 32, 1) * (blocks - q * step) ** 2).sum(axis=1)

    fitted = fitted_group_scales(w, 32, -8, 7, diagonal, "float16")
    assert np.all(error(fitted) <= error(absmax) + 1e-12)
    assert np.any(fitted < absmax)  # the outlier group clips
    ratios = fitted.astype(np.float64) / (bound / 7)
    assert np.all((ratios > min(SCALE_FRACTIONS) - 0.01) & (ratios < 1.01))

    moments = InputMoments(None)
    moments.update(rng.standard_normal((256, 64)).astype(np.float32))
    gw = quantize_groups(w, 32, moments=moments)
    assert gw.rounding == "gptq" and np.all(gw.scales <= absmax)

    tiny = np.full((32, 2), 1e-9, np.float32)  # / 7 underflows fp16
    dead = quantize_groups(tiny, 32)
    assert np.all(dead.scales == 1) and np.all(dead.values() == 0)
