"""Calibration of a cell-type head: expected calibration error, and the temperature that
makes its confidence honest (temperature scaling, Guo et al. 2017), fitted on validation cells
by the fine-tuning and applied by the runtime (`scgpt_runtime.results.temperature_scaled`)."""

from __future__ import annotations

from typing import Any

import numpy as np

from scgpt_runtime.results import temperature_scaled

BINS = 15  # equal-width confidence bins of the reliability diagram
T_RANGE = (0.05, 20.0)  # temperatures searched, on a log scale


def expected_calibration_error(probs: np.ndarray, codes: np.ndarray, bins: int = BINS) -> float:
    """Sum over confidence bins of |accuracy - confidence| weighted by the bin's share of
    cells; `codes` (n,) are the true classes."""
    conf, pred = probs.max(1), probs.argmax(1)
    right = pred == codes
    which = np.minimum((conf * bins).astype(int), bins - 1)
    total = 0.0
    for b in range(bins):
        members = which == b
        if members.any():
            total += members.mean() * abs(right[members].mean() - conf[members].mean())
    return float(total)


def nll(probs: np.ndarray, codes: np.ndarray) -> float:
    picked = probs[np.arange(len(codes)), codes].astype(np.float64)
    return float(-np.log(np.maximum(picked, 1e-300)).mean())


def fit_temperature(probs: np.ndarray, codes: np.ndarray) -> float:
    """The temperature in T_RANGE that minimises the negative log-likelihood of the true
    classes: a grid on log T, then golden-section search around its best point."""
    grid = np.geomspace(*T_RANGE, 41)
    losses = [nll(temperature_scaled(probs, t), codes) for t in grid]
    i = int(np.argmin(losses))
    lo, hi = np.log(grid[max(i - 1, 0)]), np.log(grid[min(i + 1, len(grid) - 1)])
    ratio = (np.sqrt(5) - 1) / 2
    for _ in range(40):
        a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
        if nll(temperature_scaled(probs, np.exp(a)), codes) <= nll(
            temperature_scaled(probs, np.exp(b)), codes
        ):
            hi = b
        else:
            lo = a
    return float(np.exp((lo + hi) / 2))


def calibrate(probs: np.ndarray, codes: np.ndarray) -> dict[str, Any]:
    """The calibration record of a head: its temperature, fitted on these validation cells,
    and their expected calibration error before and after."""
    t = fit_temperature(probs, codes)
    return {
        "temperature": round(t, 6),
        "ece_before": round(expected_calibration_error(probs, codes), 6),
        "ece_after": round(expected_calibration_error(temperature_scaled(probs, t), codes), 6),
        "n_cells": len(codes),
        "bins": BINS,
    }
