"""Correspondence metrics as tidy pandas tables: epipolar precision, correct-match counts, PCK.

Every table is long (one row per pair x threshold) and plots with seaborn in one line, e.g.
``sns.lineplot(summarise(df), x="threshold", y="precision", hue="method")``.

Empty inputs never crash: a pair with no matches has ``n_matches = 0``, ``n_correct = 0`` and
``precision = NaN`` (undefined, not 0: a matcher that returns nothing is not wrong, it is silent).
A match counts as correct when its distance is ``<= threshold`` (pixels, never squared).
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from .errors import CorrlabError, ShapeError, ValueRangeError, check_choice, describe
from .geometry import DISTANCE_KINDS, Camera, as_points, epipolar_distance, fundamental_matrix, relative_view_angle

__all__ = [
    "DEFAULT_THRESHOLDS",
    "epipolar_scores",
    "pck",
    "score_matches",
    "summarise",
]

DEFAULT_THRESHOLDS = (1.0, 2.0, 5.0)
SCORE_COLUMNS = ["method", "src", "tgt", "view_angle", "threshold", "precision", "n_correct", "n_matches", "kind"]


def _thresholds(thresholds: Iterable[float]) -> np.ndarray:
    try:
        th = np.asarray(list(thresholds) if not np.isscalar(thresholds) else [thresholds], dtype=np.float64)
    except (TypeError, ValueError):
        raise CorrlabError(f"thresholds: expected a sequence of numbers, got {describe(thresholds)}") from None
    if th.ndim != 1 or th.size == 0:
        raise ShapeError(f"thresholds: expected a non-empty 1-D sequence, got {describe(thresholds)}")
    if not np.all(np.isfinite(th)) or np.any(th < 0):
        raise ValueRangeError(f"thresholds: expected finite values >= 0 (pixels), got {th.tolist()}")
    return th


def _precision_rows(dist: np.ndarray, th: np.ndarray) -> list[dict[str, Any]]:
    n = int(dist.size)
    rows = []
    for t in th:
        n_correct = int(np.count_nonzero(dist <= t))
        rows.append(
            {
                "threshold": float(t),
                "precision": n_correct / n if n else float("nan"),
                "n_correct": n_correct,
                "n_matches": n,
            }
        )
    return rows


def epipolar_scores(pts1, pts2, F, thresholds: Sequence[float] = DEFAULT_THRESHOLDS, kind: str = "symmetric") -> pd.DataFrame:
    """Epipolar precision of matches ``pts1[n] <-> pts2[n]`` under a fundamental matrix.

    Args:
        pts1: (N, 2) pixels in the first image (numpy or torch); N may be 0.
        pts2: (N, 2) pixels in the second image.
        F: (3, 3) fundamental matrix, ``x2^T F x1 = 0``.
        thresholds: pixel thresholds; a match is correct when its distance is ``<= threshold``.
        kind: epipolar distance kind (``"symmetric"``, ``"line"`` or ``"sampson"``).

    Returns:
        DataFrame with one row per threshold: threshold, precision, n_correct, n_matches, kind.
        With no matches: precision NaN, n_correct 0, n_matches 0.
    """
    th = _thresholds(thresholds)
    dist = epipolar_distance(pts1, pts2, F, kind=kind).numpy()
    df = pd.DataFrame(_precision_rows(dist, th))
    df["kind"] = kind
    return df


def pck(pred, gt, thresholds: Sequence[float] = DEFAULT_THRESHOLDS, valid=None) -> pd.DataFrame:
    """Percentage of correct keypoints: fraction of predictions within ``threshold`` px of the truth.

    Args:
        pred: (N, 2) predicted pixels.
        gt: (N, 2) ground-truth pixels (NaN allowed only where ``valid`` is False).
        thresholds: pixel thresholds; correct when ``||pred - gt|| <= threshold``.
        valid: optional (N,) bool mask of the entries that count (e.g. the ``valid`` output of
            :func:`corrlab.geometry.ground_truth_match_for`).

    Returns:
        DataFrame with one row per threshold: threshold, pck (in [0, 1], NaN when n = 0), n (entries counted).
    """
    th = _thresholds(thresholds)
    p = as_points("pred", pred)
    g = torch.as_tensor(gt)
    if g.shape != p.shape:
        raise ShapeError(f"gt: expected shape {tuple(p.shape)} matching pred, got {describe(gt)}")
    g = g.to(torch.float64)
    if valid is None:
        mask = torch.ones(p.shape[0], dtype=torch.bool)
    else:
        mask = torch.as_tensor(valid)
        if mask.dtype != torch.bool or mask.shape != (p.shape[0],):
            raise ShapeError(f"valid: expected a bool array of shape ({p.shape[0]},), got {describe(valid)}")
    g_used = g[mask]
    if not bool(torch.isfinite(g_used).all()):
        raise ValueRangeError(f"gt: expected finite values where valid, got {int((~torch.isfinite(g_used)).sum())} non-finite")
    err = (p[mask] - g_used).norm(dim=1).numpy()
    rows = _precision_rows(err, th)
    return pd.DataFrame([{"threshold": r["threshold"], "pck": r["precision"], "n": r["n_matches"]} for r in rows])


def _pair_points(key, value) -> tuple[Any, Any]:
    if hasattr(value, "pts0") and hasattr(value, "pts1"):
        return value.pts0, value.pts1
    if isinstance(value, (tuple, list)) and len(value) == 2:
        return value[0], value[1]
    raise CorrlabError(
        f"matches_by_pair[{key!r}]: expected (pts_i, pts_j) or a Matches with pts0/pts1, got {describe(value)}"
    )


def score_matches(
    matches_by_pair: Mapping[tuple[int, int], Any],
    cameras: Sequence[Camera],
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    kind: str = "symmetric",
    method: str = "matcher",
) -> pd.DataFrame:
    """Epipolar precision of one method's matches over several view pairs.

    Args:
        matches_by_pair: ``{(i, j): (pts_i (N, 2), pts_j (N, 2))}`` or ``{(i, j): Matches}``, pixels in
            views i and j.
        cameras: the views' cameras (indexed by i, j).
        thresholds: pixel thresholds.
        kind: epipolar distance kind.
        method: name of the matcher (a column, for comparing methods).

    Returns:
        Long DataFrame, one row per pair x threshold: method, src, tgt, view_angle (degrees between the
        optical axes), threshold, precision, n_correct, n_matches, kind.
    """
    check_choice("kind", kind, DISTANCE_KINDS)
    th = _thresholds(thresholds)
    if not isinstance(method, str) or not method:
        raise CorrlabError(f"method: expected a non-empty name, got {method!r}")
    cams = list(cameras)
    frames = []
    for key, value in matches_by_pair.items():
        if not (isinstance(key, tuple) and len(key) == 2 and all(isinstance(k, (int, np.integer)) for k in key)):
            raise CorrlabError(f"matches_by_pair: expected keys (i, j) of view indices, got {key!r}")
        i, j = int(key[0]), int(key[1])
        for name, v in (("i", i), ("j", j)):
            if not 0 <= v < len(cams):
                raise ValueRangeError(
                    f"matches_by_pair[{key!r}]: view index {name} = {v} outside cameras (len {len(cams)})"
                )
        pts_i, pts_j = _pair_points(key, value)
        F = fundamental_matrix(cams[i], cams[j])
        df = epipolar_scores(pts_i, pts_j, F, th, kind=kind)
        df.insert(0, "method", method)
        df.insert(1, "src", i)
        df.insert(2, "tgt", j)
        df.insert(3, "view_angle", relative_view_angle(cams[i], cams[j]))
        frames.append(df)
    if not frames:
        return pd.DataFrame({c: pd.Series(dtype=object if c in ("method", "kind") else float) for c in SCORE_COLUMNS})
    return pd.concat(frames, ignore_index=True)[SCORE_COLUMNS]


def summarise(df: pd.DataFrame, by: Sequence[str] = ("method", "threshold")) -> pd.DataFrame:
    """Pool per-pair scores (from :func:`score_matches`) into one row per group.

    Columns: the ``by`` columns, then ``precision`` (pooled: sum n_correct / sum n_matches),
    ``precision_mean`` and ``precision_std`` (over pairs with at least one match), ``n_correct``,
    ``n_matches`` (sums), ``n_pairs`` and ``kind`` (the distance kind, when the table has one). Raises if the table mixes distance kinds that ``by`` would pool.
    """
    by = [by] if isinstance(by, str) else list(by)
    need = {"precision", "n_correct", "n_matches"} | set(by)
    missing = sorted(need - set(df.columns))
    if missing:
        raise CorrlabError(f"df: expected columns {sorted(need)}, missing {missing}")
    if "kind" in df.columns and "kind" not in by and df["kind"].nunique() > 1:
        raise CorrlabError(
            f"by: the table mixes distance kinds {sorted(df['kind'].unique())}; add 'kind' to by={by}"
        )
    grouped = df.groupby(by, sort=True, dropna=False)
    out = grouped.agg(
        n_correct=("n_correct", "sum"),
        n_matches=("n_matches", "sum"),
        precision_mean=("precision", "mean"),
        precision_std=("precision", "std"),
        n_pairs=("precision", "size"),
    ).reset_index()
    out.insert(len(by), "precision", out["n_correct"] / out["n_matches"].where(out["n_matches"] > 0))
    cols = by + ["precision", "precision_mean", "precision_std", "n_correct", "n_matches", "n_pairs"]
    if "kind" in df.columns and "kind" not in by and len(df):
        out["kind"] = df["kind"].iloc[0]  # one kind (checked above): keep it so every threshold says its distance
        cols.append("kind")
    return out[cols]
