"""The one epipolar scorer: F and the view angle once per ordered view pair, matches counted per threshold.

Every score of corrlab under known cameras (native matches, the trivial controls, baseline matchers, any
``{(i, j): matches}``) goes through :class:`PairGeometry` and :func:`pair_counts`: the fundamental
matrix (:func:`corrlab.geometry.fundamental_matrix`) and the view angle
(:func:`corrlab.geometry.relative_view_angle`) of a pair are computed on first use and reused by every
method scored on the same cameras. Distances are in pixels, never squared; a match is correct when its
distance is ``<= threshold``.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from ..errors import CorrlabError, ShapeError, ValueRangeError, check_choice, describe
from ..geometry.epipolar import epipolar_distance, fundamental_matrix, relative_view_angle
from .schema import DEFAULT_THRESHOLDS, DISTANCE_KINDS, SCORE_COLUMNS, check_thresholds

__all__ = [
    "PairGeometry",
    "as_geometry",
    "pair_counts",
    "score_rows",
    "as_score_table",
    "epipolar_scores",
    "score_matches",
    "score_token_matches",
]


class PairGeometry:
    """The epipolar geometry of V cameras, computed once per ordered pair and cached.

    ``fundamental(i, j)`` is ``(3, 3)`` float64 with ``x_j^T F x_i = 0``; ``view_angle(i, j)`` degrees
    between the optical axes. Pass one ``PairGeometry`` to several scorers (native, controls, baselines)
    of one set so that none recomputes them.
    """

    def __init__(self, cameras: Sequence):
        self.cameras = list(cameras)
        self._F: dict[tuple[int, int], torch.Tensor] = {}
        self._angle: dict[tuple[int, int], float] = {}

    def __len__(self) -> int:
        return len(self.cameras)

    def __getitem__(self, i: int):
        return self.cameras[i]

    def _check(self, i: int, j: int) -> tuple[int, int]:
        v = len(self.cameras)
        if not (0 <= i < v and 0 <= j < v) or i == j:
            raise ValueRangeError(f"i, j: expected two different view indices in [0, {v - 1}], got ({i}, {j})")
        return int(i), int(j)

    def fundamental(self, i: int, j: int) -> torch.Tensor:
        key = self._check(i, j)
        if key not in self._F:
            self._F[key] = fundamental_matrix(self.cameras[key[0]], self.cameras[key[1]])
        return self._F[key]

    def view_angle(self, i: int, j: int) -> float:
        key = self._check(i, j)
        if key not in self._angle:
            self._angle[key] = float(relative_view_angle(self.cameras[key[0]], self.cameras[key[1]]))
        return self._angle[key]

    def score_pair(self, i: int, j: int, pts_i, pts_j, thresholds: np.ndarray, kind: str, method: str) -> pd.DataFrame:
        """The per-pair scorer: one row per threshold (method, src, tgt, view_angle, threshold, precision,
        n_correct, n_matches) of matches ``pts_i (N, 2)`` in view i <-> ``pts_j (N, 2)`` in view j."""
        n, correct = pair_counts(self.distances(i, j, pts_i, pts_j, kind), thresholds)
        return score_rows({"method": [method], "src": [i], "tgt": [j], "view_angle": [self.view_angle(i, j)]},
                          n, correct, thresholds)

    def distances(self, i: int, j: int, pts_i, pts_j, kind: str = "symmetric") -> np.ndarray:
        """``(N,)`` epipolar distances (pixels) of matches ``pts_i (N, 2)`` in view i <-> ``pts_j (N, 2)`` in view j."""
        if len(pts_i) == 0:
            self._check(i, j)
            return np.zeros(0)
        pts_i, pts_j = torch.as_tensor(np.asarray(pts_i, dtype=np.float64)), torch.as_tensor(np.asarray(pts_j, dtype=np.float64))
        return epipolar_distance(pts_i, pts_j, self.fundamental(i, j), kind=kind).numpy()


def as_geometry(cameras, num_views: int | None = None) -> PairGeometry:
    """``cameras`` as a :class:`PairGeometry` (itself when it is one), checking ``num_views`` when given."""
    geo = cameras if isinstance(cameras, PairGeometry) else PairGeometry(list(cameras))
    if num_views is not None and len(geo) != num_views:
        raise ShapeError(f"cameras: expected {num_views} cameras (one per image), got {describe(geo.cameras)}")
    return geo


def pair_counts(dist: np.ndarray, thresholds: np.ndarray, group: np.ndarray | None = None,
                n_groups: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """``(G,)`` match counts and ``(G, T)`` correct counts (``dist <= threshold``) per group id ``group (N,)``."""
    group = np.zeros(len(dist), dtype=np.int64) if group is None else group
    n = np.bincount(group, minlength=n_groups).astype(np.int64)
    correct = np.stack(
        [np.bincount(group, weights=(dist <= t).astype(np.float64), minlength=n_groups) for t in thresholds], axis=1
    ).round().astype(np.int64)
    return n, correct


def score_rows(keys: Mapping[str, Any], n: np.ndarray, correct: np.ndarray, thresholds: np.ndarray) -> pd.DataFrame:
    """Long rows: the ``(G,)`` key columns repeated per threshold, then threshold, precision and the counts."""
    g, t = correct.shape
    out = {}
    for k, v in keys.items():
        arr = np.asarray(v)
        out[k] = np.repeat(np.asarray(v, dtype=object) if arr.dtype.kind in "OU" else arr, t)
    n_rep = np.repeat(n, t)
    c_flat = correct.reshape(-1)
    out["threshold"] = np.tile(thresholds, g)
    with np.errstate(invalid="ignore", divide="ignore"):
        out["precision"] = np.where(n_rep > 0, c_flat / np.maximum(n_rep, 1), np.nan)
    out["n_correct"] = c_flat
    out["n_matches"] = n_rep
    return pd.DataFrame(out)


_FILL = {"layer": None, "step": None, "timestep": np.nan, "view_angle": np.nan, "note": ""}


def as_score_table(frames: Sequence[pd.DataFrame] | pd.DataFrame, kind: str) -> pd.DataFrame:
    """Rows in the :data:`~corrlab.evaluation.schema.SCORE_COLUMNS` order, missing columns filled
    (layer/step None, timestep/view_angle NaN, note ""), extra columns (``head``, ``set``, ...) kept after ``tgt``."""
    if isinstance(frames, pd.DataFrame):
        frames = [frames]
    frames = [f for f in frames if len(f)]
    df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame({c: [] for c in SCORE_COLUMNS})
    df["kind"] = kind
    for c, fill in _FILL.items():
        if c not in df.columns:
            df[c] = [fill] * len(df) if fill is None else fill
    extra = [c for c in df.columns if c not in SCORE_COLUMNS]
    cols = list(SCORE_COLUMNS)
    at = cols.index("tgt") + 1
    return df[cols[:at] + extra + cols[at:]]


# ------------------------------------------------------------------------------------------ public scorers
def epipolar_scores(pts1, pts2, F, thresholds: Sequence[float] = DEFAULT_THRESHOLDS, kind: str = "symmetric") -> pd.DataFrame:
    """Epipolar precision of matches ``pts1[n] <-> pts2[n]`` under one fundamental matrix.

    Args:
        pts1: (N, 2) pixels in the first image (numpy or torch); N may be 0.
        pts2: (N, 2) pixels in the second image.
        F: (3, 3) fundamental matrix, ``x2^T F x1 = 0``.
        thresholds: pixel thresholds (default :data:`DEFAULT_THRESHOLDS`).
        kind: epipolar distance kind (:data:`DISTANCE_KINDS`).

    Returns:
        DataFrame with one row per threshold: threshold, precision, n_correct, n_matches, kind.
        With no matches: precision NaN, n_correct 0, n_matches 0.
    """
    th = check_thresholds(thresholds)
    dist = epipolar_distance(pts1, pts2, F, kind=kind).numpy()
    n, correct = pair_counts(dist, th)
    df = score_rows({}, n, correct, th)
    df["kind"] = kind
    return df


def _pair_points(key, value) -> tuple[Any, Any]:
    if hasattr(value, "pts0") and hasattr(value, "pts1"):
        return value.pts0, value.pts1
    if isinstance(value, (tuple, list)) and len(value) == 2:
        return value[0], value[1]
    raise CorrlabError(
        f"matches_by_pair[{key!r}]: expected (pts_i, pts_j) or a Matches with pts0/pts1, got {describe(value)}"
    )


def _points(name: str, pts) -> np.ndarray:
    arr = np.asarray(pts.detach().cpu().numpy() if hasattr(pts, "detach") else pts, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise ShapeError(f"{name}: expected (N, 2) pixel points, got {describe(pts)}")
    return arr


def score_matches(
    matches_by_pair: Mapping[tuple[int, int], Any],
    cameras,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    kind: str = "symmetric",
    method: str = "matcher",
) -> pd.DataFrame:
    """Epipolar precision of one method's matches over several view pairs.

    Args:
        matches_by_pair: ``{(i, j): (pts_i (N, 2), pts_j (N, 2))}`` or ``{(i, j): Matches}``, pixels in
            views i and j.
        cameras: the views' cameras (a list of Camera, or a :class:`PairGeometry` to share F between calls).
        thresholds: pixel thresholds (default :data:`DEFAULT_THRESHOLDS`).
        kind: epipolar distance kind (:data:`DISTANCE_KINDS`).
        method: name of the matcher (the ``method`` column).

    Returns:
        Score table (:data:`SCORE_COLUMNS`), one row per pair x threshold, in the order of ``matches_by_pair``.
    """
    check_choice("kind", kind, DISTANCE_KINDS)
    th = check_thresholds(thresholds)
    if not isinstance(method, str) or not method:
        raise CorrlabError(f"method: expected a non-empty name, got {method!r}")
    geo = as_geometry(cameras)
    frames = []
    for key, value in matches_by_pair.items():
        if not (isinstance(key, tuple) and len(key) == 2 and all(isinstance(k, (int, np.integer)) for k in key)):
            raise CorrlabError(f"matches_by_pair: expected keys (i, j) of view indices, got {key!r}")
        i, j = int(key[0]), int(key[1])
        for name, v in (("i", i), ("j", j)):
            if not 0 <= v < len(geo):
                raise ValueRangeError(f"matches_by_pair[{key!r}]: view index {name} = {v} outside cameras (len {len(geo)})")
        pts_i, pts_j = _pair_points(key, value)
        pts_i, pts_j = _points(f"matches_by_pair[{key!r}]", pts_i), _points(f"matches_by_pair[{key!r}]", pts_j)
        if pts_i.shape != pts_j.shape:
            raise ShapeError(f"matches_by_pair[{key!r}]: expected pts_i and pts_j of one shape, got "
                             f"{describe(pts_i)} and {describe(pts_j)}")
        frames.append(geo.score_pair(i, j, pts_i, pts_j, th, kind, method))
    return as_score_table(frames, kind)


def score_token_matches(
    index: torch.Tensor,
    centres: torch.Tensor | np.ndarray,
    cameras,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    kind: str = "symmetric",
    method: str = "matcher",
) -> pd.DataFrame:
    """Epipolar scores of token-level matches ``index (V, V, N)`` (``-1`` = no match) on one token grid.

    ``centres (N, 2)`` are the pixel centres of the grid's tokens; ``cameras`` V cameras (or a
    :class:`PairGeometry`). Returns a score table, one row per ordered pair x threshold.
    """
    check_choice("kind", kind, DISTANCE_KINDS)
    th = check_thresholds(thresholds)
    idx = torch.as_tensor(index).long().numpy()
    c = np.asarray(torch.as_tensor(centres, dtype=torch.float64))
    if idx.ndim != 3 or idx.shape[0] != idx.shape[1] or idx.shape[2] != c.shape[0]:
        raise ShapeError(f"index: expected (V, V, N) with N = {c.shape[0]} tokens, got {describe(index)}")
    geo = as_geometry(cameras, idx.shape[0])
    frames = []
    for i in range(idx.shape[0]):
        for j in range(idx.shape[0]):
            if i == j:
                continue
            ok = idx[i, j] >= 0
            frames.append(geo.score_pair(i, j, c[ok], c[idx[i, j][ok]], th, kind, method))
    return as_score_table(frames, kind)
