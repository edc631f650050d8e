"""Percentile-bootstrap confidence intervals of a mean, over independent units (scenes, pairs).

The one CI of corrlab's benchmarks: effects are paired differences per scene (config - base, same scene
and seed), and their uncertainty is the spread of the mean over scenes resampled with replacement.
Non-finite values (a scene where a metric is undefined, e.g. no SIFT match) are dropped first; with fewer
than two values left there is no interval and its bounds are NaN.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ..errors import CorrlabError

__all__ = ["MeanCI", "bootstrap_mean_ci"]


class MeanCI(NamedTuple):
    """Mean of the finite values, the interval's bounds, and how many values went in."""

    mean: float
    lo: float
    hi: float
    n: int

    def format(self, digits: int = 3) -> str:
        """``"+0.123 [+0.010, +0.230]"``."""
        return f"{self.mean:+.{digits}f} [{self.lo:+.{digits}f}, {self.hi:+.{digits}f}]"


def bootstrap_mean_ci(x, n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> MeanCI:
    """Mean of ``x`` (N,) and its percentile-bootstrap interval at ``level``.

    ``n_boot`` resamples of the N finite values with replacement (numpy ``default_rng(seed)``, so the
    same input gives the same interval); bounds are the ``(1 - level) / 2`` and ``(1 + level) / 2``
    percentiles of the resampled means.
    """
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 1:
        raise CorrlabError(f"bootstrap_mean_ci: x must be 1-D (N,), got shape {tuple(arr.shape)}")
    if not isinstance(n_boot, (int, np.integer)) or n_boot < 1:
        raise CorrlabError(f"bootstrap_mean_ci: n_boot must be a positive int, got {n_boot!r}")
    if not 0.0 < level < 1.0:
        raise CorrlabError(f"bootstrap_mean_ci: level must be in (0, 1), got {level!r}")
    arr = arr[np.isfinite(arr)]
    if len(arr) == 0:
        return MeanCI(float("nan"), float("nan"), float("nan"), 0)
    if len(arr) < 2:
        return MeanCI(float(arr[0]), float("nan"), float("nan"), 1)
    means = np.random.default_rng(seed).choice(arr, size=(n_boot, len(arr)), replace=True).mean(axis=1)
    tail = 100.0 * (1.0 - level) / 2.0
    return MeanCI(float(arr.mean()), float(np.percentile(means, tail)), float(np.percentile(means, 100.0 - tail)),
                  len(arr))
