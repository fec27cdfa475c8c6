"""calibrate.py: one pass over the samples observes each tensor, each layer input's channel
means and second moments, whatever runs the model; the table saves and loads."""

import numpy as np

from qcompile.quantize.calibrate import CalibrationTable, LayerInput, calibrate
from qcompile.quantize.rounding import ConvShape


def _run(feed):
    x = feed["x"]
    return {"x": x, "y": np.maximum(x, 0.0), "shape": np.array([1, 2, 4, 4])}


def test_one_pass_observes_tensors_means_and_moments(tmp_path):
    rng = np.random.default_rng(0)
    feeds = [{"x": rng.standard_normal((1, 2, 4, 4)).astype(np.float32)} for _ in range(5)]
    conv = ConvShape((3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1)
    table = calibrate(_run, feeds, ["x", "y", "shape"],
                      {"conv": LayerInput("y", "conv2d", conv, moments=True),
                       "fc": LayerInput("x", "matmul")})
    assert set(table.observers) == {"x", "y"}  # an integer tensor is not observed
    stacked = np.concatenate([f["x"] for f in feeds])
    assert table.observers["x"].min == stacked.min() and table.observers["y"].min == 0.0
    np.testing.assert_allclose(table.means["y"],
                               np.maximum(stacked, 0).mean(axis=(0, 2, 3)), rtol=1e-6)
    np.testing.assert_allclose(table.means["x"],
                               stacked.reshape(-1, 4).mean(axis=0), rtol=1e-6)  # matmul: last
    assert set(table.moments) == {"conv"} and table.moments["conv"].count == 5 * 16
    assert table.samples == 5

    table.save(tmp_path / "table.npz")
    loaded = CalibrationTable.load(tmp_path / "table.npz")
    assert loaded.samples == 5 and set(loaded.observers) == {"x", "y"}
    for name, obs in table.observers.items():
        again = loaded.observers[name]
        assert (again.min, again.max, again.count, again.radius) == \
            (obs.min, obs.max, obs.count, obs.radius)
        np.testing.assert_array_equal(again.hist, obs.hist)
    np.testing.assert_array_equal(loaded.means["y"], table.means["y"])
    np.testing.assert_array_equal(loaded.moments["conv"].hessian(),
                                  table.moments["conv"].hessian())
    assert loaded.moments["conv"].conv == conv


def test_means_can_be_left_out():
    feeds = [{"x": np.ones((1, 2, 4, 4), np.float32)}]
    table = calibrate(_run, feeds, ["x"], {"fc": LayerInput("x", "matmul")}, means=False)
    assert not table.means and not table.moments
