"""Temperature scaling and the expected calibration error (numpy; the runtime applies it)."""

from __future__ import annotations

import numpy as np

from scgpt_runtime.results import temperature_scaled
from scgpt_train.calibration import calibrate, expected_calibration_error, fit_temperature


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def test_ece_of_a_hand_example():
    # two cells at confidence 0.9 (one right), two at 0.6 (both right): bins 13 and 9 of 15
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.4, 0.6]])
    codes = np.array([0, 1, 0, 1])
    assert abs(expected_calibration_error(probs, codes) - (0.5 * 0.4 + 0.5 * 0.4)) < 1e-12


def test_the_fitted_temperature_undoes_overconfidence():
    """Labels drawn from softmax(z); the head reports softmax(3 z): T comes out near 3 and
    the error falls."""
    rng = np.random.default_rng(0)
    z = rng.normal(size=(4000, 5))
    codes = np.array([rng.choice(5, p=p) for p in softmax(z)])
    probs = softmax(3 * z).astype(np.float32)
    t = fit_temperature(probs, codes)
    assert abs(t - 3) < 0.3  # 4,000 draws: the maximum-likelihood T is within 10% of 3
    record = calibrate(probs, codes)
    assert record["ece_after"] < record["ece_before"] / 3
    assert record["n_cells"] == 4000


def test_temperature_scaling_is_exact_on_softmax_outputs():
    z = np.random.default_rng(1).normal(size=(50, 7))
    np.testing.assert_allclose(temperature_scaled(softmax(z), 2.5), softmax(z / 2.5), atol=1e-6)
    np.testing.assert_allclose(
        temperature_scaled(temperature_scaled(softmax(z), 2.5), 0.4), softmax(z), atol=1e-6
    )
    probs = softmax(z).astype(np.float32)
    assert temperature_scaled(probs, 1.0) is probs
