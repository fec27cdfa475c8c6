"""refit.refit against its definition: the least-squares weights that map the quantized
model's inputs to the fp32 model's outputs, ridge chosen by cross-validation, so that a fit on
few samples is never worse on fresh ones than the weight it started from."""

import numpy as np

from qcompile.quantize.refit import FOLDS, FitStats, refit


def _stats(x: np.ndarray, xq: np.ndarray) -> list[FitStats]:
    """Per-fold sums of inputs x, xq [G, K, P], split along P as reconstruct.py splits the
    samples."""
    folds = [FitStats() for _ in range(FOLDS)]
    for i, (a, b) in enumerate(zip(np.array_split(x, FOLDS, axis=2),
                                   np.array_split(xq, FOLDS, axis=2))):
        folds[i].add(a, b)
    return folds


def _error(rows, w, x, xq) -> float:
    return float(np.sum((np.einsum("grk,gkp->grp", rows, xq) -
                         np.einsum("grk,gkp->grp", w, x)) ** 2))


def test_a_systematic_input_error_is_undone():
    """x~ = A x (a fixed distortion, as upstream layers' rounding makes): W' = W A^-1."""
    rng = np.random.default_rng(0)
    g, r, k, p = 3, 5, 8, 4000
    w = rng.standard_normal((g, r, k))
    a = np.eye(k) + 0.2 * rng.standard_normal((g, k, k))
    x = rng.standard_normal((g, k, p))
    xq = a @ x
    fit = refit(w, _stats(x, xq))
    exact = w @ np.linalg.inv(a)
    assert np.linalg.norm(fit.rows - exact) < 0.02 * np.linalg.norm(exact)  # the least ridge
    assert fit.error_after < 1e-3 * fit.error_before and fit.kept == 0
    assert fit.ridge[0] == g  # every group chose the least ridge
    scale = float(np.sum(np.einsum("grk,gkp->grp", w, x) ** 2))
    np.testing.assert_allclose(fit.error_before, _error(w, w, x, xq) / scale, rtol=1e-6)
    np.testing.assert_allclose(fit.error_after, _error(fit.rows, w, x, xq) / scale, rtol=1e-4,
                               atol=1e-9)


def test_a_bias_column_takes_a_constant_shift_unpenalized():
    """x~ = x + d: with a constant-1 input, the bias absorbs -W d and the weights stay."""
    rng = np.random.default_rng(1)
    r, k, p = 4, 6, 2000
    w = rng.standard_normal((1, r, k))
    bias = rng.standard_normal((1, r, 1))
    x = rng.standard_normal((1, k, p))
    d = rng.standard_normal((1, k, 1))
    ones = np.ones((1, 1, p))
    x1, xq1 = np.concatenate([x, ones], 1), np.concatenate([x + d, ones], 1)
    fit = refit(np.concatenate([w, bias], 2), _stats(x1, xq1), free=1)
    np.testing.assert_allclose(fit.rows[..., :k], w, atol=1e-6)
    np.testing.assert_allclose(fit.rows[..., k:], bias - w @ d, atol=1e-6)


def test_noise_on_few_samples_does_not_make_the_weights_worse():
    """Independent noise on fewer samples than inputs: an unregularized fit would follow the
    noise; cross-validation keeps the weights (or shrinks the fit towards them), and on fresh
    samples the error is not larger than the original weights'."""
    rng = np.random.default_rng(2)
    g, r, k = 4, 8, 64

    def samples(p, seed):
        rs = np.random.default_rng(seed)
        x = rs.standard_normal((g, k, p))
        return x, x + 0.3 * rs.standard_normal((g, k, p))

    w = rng.standard_normal((g, r, k))
    fit = refit(w, _stats(*samples(48, 3)))
    fresh_x, fresh_xq = samples(5000, 4)
    assert _error(fit.rows, w, fresh_x, fresh_xq) <= 1.02 * _error(w, w, fresh_x, fresh_xq)
    # the same noise, seen on many samples: a true gain (shrinking towards E[x | x~])
    many = refit(w, _stats(*samples(20000, 5)))
    assert _error(many.rows, w, fresh_x, fresh_xq) < 0.95 * _error(w, w, fresh_x, fresh_xq)


def test_dead_inputs_and_groups_stay_finite():
    """An input that is zero on every sample (a dead channel) has a zero row in H~: the fit
    stays finite and leaves that input's weights alone."""
    rng = np.random.default_rng(3)
    w = rng.standard_normal((2, 3, 5))
    x = rng.standard_normal((2, 5, 300))
    x[:, 2] = 0.0
    fit = refit(w, _stats(x, x + 0.01 * rng.standard_normal(x.shape) * (x != 0)))
    assert np.isfinite(fit.rows).all()
    np.testing.assert_allclose(fit.rows[:, :, 2], w[:, :, 2], atol=1e-6)
