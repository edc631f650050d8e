"""`Matches`: the result every corrlab matcher returns."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from corrlab.errors import ShapeError, check_finite, check_shape

__all__ = ["Matches"]


@dataclass(frozen=True)
class Matches:
    """Point correspondences between two images.

    Attributes:
        pts0: ``(N, 2)`` float64 pixels (x, y) in image 0, corrlab convention (centre of the top-left pixel = (0, 0)).
        pts1: ``(N, 2)`` float64 pixels in image 1; ``pts0[i] <-> pts1[i]``.
        scores: ``(N,)`` float64 confidence, higher is better (its scale depends on the method).
        method: name of the matcher that produced them (``"sift"``, ``"superpoint+mnn"``, ...).
    """

    pts0: np.ndarray
    pts1: np.ndarray
    scores: np.ndarray
    method: str

    def __post_init__(self) -> None:
        for name in ("pts0", "pts1", "scores"):
            object.__setattr__(self, name, np.asarray(getattr(self, name), dtype=np.float64))
        check_shape("pts0", self.pts0, (None, 2), "(N, 2)")
        n = self.pts0.shape[0]
        check_shape("pts1", self.pts1, (n, 2), f"(N, 2) with N = len(pts0) = {n}")
        check_shape("scores", self.scores, (n,), f"(N,) with N = len(pts0) = {n}")
        for name in ("pts0", "pts1", "scores"):
            check_finite(name, getattr(self, name))
        if not isinstance(self.method, str) or not self.method:
            raise ShapeError(f"method: expected a non-empty str, got {self.method!r}")

    def __len__(self) -> int:
        return int(self.pts0.shape[0])

    @classmethod
    def empty(cls, method: str) -> "Matches":
        """No matches (e.g. an image without keypoints)."""
        return cls(np.zeros((0, 2)), np.zeros((0, 2)), np.zeros((0,)), method)

    def to_frame(self) -> "pandas.DataFrame":
        """Tidy table, one row per match: ``x0, y0, x1, y1, score, method``."""
        import pandas as pd

        return pd.DataFrame({"x0": self.pts0[:, 0], "y0": self.pts0[:, 1], "x1": self.pts1[:, 0],
                             "y1": self.pts1[:, 1], "score": self.scores, "method": self.method})

    def swapped(self) -> "Matches":
        """The same matches seen from image 1 (``pts0`` and ``pts1`` exchanged)."""
        return Matches(self.pts1, self.pts0, self.scores, self.method)
