"""Palettes (lut4) without a build: the fitted table, the codes, what the kernel multiplies."""

import numpy as np

from qcompile.quantize.palettes import fit_palette, quantize_palette
from qcompile.quantize.rounding import InputMoments
from qcompile.quantize.weights import quantize_groups


def test_centres_are_the_weighted_means_of_their_clusters():
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.normal(-5, 0.1, 500), rng.normal(3, 0.1, 500)])
    centres = fit_palette(values, np.ones_like(values), size=2)
    np.testing.assert_allclose(centres, [values[:500].mean(), values[500:].mean()], atol=1e-9)
    weights = np.where(values > 0, 1.0, 0.0) + 1e-12   # only the right cluster counts
    right = fit_palette(values, weights * (values > 3) + weights, size=2)
    assert right[1] > values[500:].mean()


def test_palette_weights_fit_bell_shaped_weights_better_than_uniform_codes():
    rng = np.random.default_rng(1)
    w = rng.laplace(0, 0.05, (256, 64)).astype(np.float32)
    gw = quantize_palette(w, 32)
    assert gw.palette.dtype == np.int8 and gw.palette.shape == (16,)
    assert np.all(np.diff(gw.palette.astype(int)) >= 0) and 0 in gw.palette
    assert gw.codes.max() <= 15 and gw.scales.dtype == np.float16
    assert gw.sqnr_db > quantize_groups(w, 32).sqnr_db + 1.0, gw.sqnr_db
    np.testing.assert_array_equal(gw.values(), gw.palette.astype(np.int32)[gw.codes])
    # what the kernel multiplies: each group's scale times the entries of its codes
    expected = np.repeat(gw.scales.astype(np.float32), 32, axis=0) * gw.values()
    np.testing.assert_array_equal(gw.dequantized(), expected)
    assert gw.stored_bits(256) == 8 * (256 * 64 // 2 + gw.scales.nbytes + 16) / (256 * 64)


def test_zero_groups_stay_exactly_zero_and_the_padding_weighs_nothing():
    rng = np.random.default_rng(2)
    w = rng.standard_normal((100, 16)).astype(np.float32)     # 100: 3 groups and 4 weights
    w[32:64, 3] = 0                                           # a pruned group
    w[:, 7] = 1e-9                                            # too small for an fp16 scale
    gw = quantize_palette(w, 32)
    assert gw.codes.shape == (128, 16)
    approx = gw.dequantized(100)
    assert np.all(approx[32:64, 3] == 0) and np.all(np.abs(approx[:, 7]) <= 1e-9)
    assert np.isfinite(gw.sqnr_db) and gw.sqnr_db > 15


def test_the_palette_follows_what_each_input_costs_on_the_output():
    """Inputs with large calibration energy get their weights fitted closer: the output
    error, sum_k E[x_k^2] (w - w_q)^2, is lower with the moments than without them."""
    rng = np.random.default_rng(3)
    w = rng.laplace(0, 0.05, (64, 32)).astype(np.float32)
    x = rng.standard_normal((512, 64)).astype(np.float32)
    x[:, :8] *= 30                                            # 8 loud inputs
    moments = InputMoments(None)
    moments.update(x)
    energy = np.mean(x.astype(np.float64) ** 2, axis=0)[:, None]

    def output_error(gw):
        return float((energy * (w - gw.dequantized(64)) ** 2).sum())

    with_moments = quantize_palette(w, 32, moments=moments)
    assert output_error(with_moments) < 0.9 * output_error(quantize_palette(w, 32))
    assert quantize_palette(w, 32, moments=moments) is with_moments   # cached per layer
