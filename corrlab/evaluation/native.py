"""Epipolar scores of a probe record's native matches (the model's own correspondences).

A native match is the pair (centre of the source token in image ``src``, centre of the matched token in
image ``tgt``). Every ordered image pair ``(src, tgt)``, ``src != tgt``, is scored (native matches are
directional). Heads are pooled: with per-head matching each (head, token) is one match (``by_head=True``
adds a ``head`` column); for a count comparable to a keypoint matcher, match with ``heads="mean"``.

Row-wise layers (a record's ``row_wise_layers``: MV-Adapter's row-wise multi-view attention) can only
match within the source row. The row is the epipolar line only for orthographic views at elevation 0;
for any other cameras their precision measures the model's built-in row assumption as much as its
correspondences. :func:`score_record` warns (:class:`RowConstraintWarning`) when it scores such a layer
under cameras that are not orthographic-like at elevation 0, and ``df.attrs["row_wise_layers"]`` lists them.
"""
from __future__ import annotations

import json
import warnings
from typing import Sequence

import numpy as np
import pandas as pd

from ..errors import CorrlabError, check_choice
from .epipolar import as_geometry, as_score_table, pair_counts, score_rows
from .schema import DEFAULT_THRESHOLDS, DISTANCE_KINDS, as_record, check_thresholds

__all__ = ["RowConstraintWarning", "score_record", "record_geometry"]


class RowConstraintWarning(UserWarning):
    """A row-wise layer was scored under cameras whose epipolar lines are not the image rows."""


def record_geometry(rec, cameras=None):
    """The :class:`~corrlab.evaluation.epipolar.PairGeometry` of ``cameras`` (a list or a geometry), else of
    the cameras stored in the record; checked against the record's image count."""
    if cameras is None:
        cameras = rec.cameras
        if cameras is None:
            raise CorrlabError("cameras: the record holds no cameras; pass the generation's cameras (list of Camera)")
    return as_geometry(cameras, rec.num_images)


def score_record(
    rec,
    cameras=None,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    kind: str = "symmetric",
    kept_only: bool = True,
    by_head: bool = False,
) -> pd.DataFrame:
    """Epipolar precision and correct-match counts of a record's native matches.

    Args:
        rec: a :class:`~corrlab.probing.ProbeRecord` (or the path of a saved one).
        cameras: the generation's V cameras (or their :class:`PairGeometry`); default: the record's cameras.
        thresholds: pixel thresholds (default :data:`~corrlab.evaluation.DEFAULT_THRESHOLDS`).
        kind: epipolar distance kind, ``"symmetric"`` (default), ``"line"`` or ``"sampson"``.
        kept_only: score only matches that passed the confidence threshold (default True).
        by_head: one group per head (adds a ``head`` column) instead of pooling the heads.

    Returns:
        Score table (:data:`~corrlab.evaluation.SCORE_COLUMNS`), one row per (layer, step, [head,] src, tgt,
        threshold), method ``"native"``.
    """
    rec = as_record(rec)
    check_choice("kind", kind, DISTANCE_KINDS)
    th = check_thresholds(thresholds)
    geo = record_geometry(rec, cameras)
    ds = rec.ds
    match_row = ds["match_row"].values
    mx, my, kept = ds["match_x"].values, ds["match_y"].values, ds["kept"].values
    sx, sy = ds["src_x"].values, ds["src_y"].values
    n_layers, n_steps, v, _, n_heads, _, _ = match_row.shape
    layers, steps = np.array(rec.layers, dtype=object), np.asarray(rec.steps)
    timesteps = ds["timestep"].values
    heads_of_layer = ds["num_heads"].values
    per = n_heads if by_head else 1
    n_groups = n_layers * n_steps * per
    g_layer = np.repeat(np.arange(n_layers), n_steps * per)
    g_step = np.tile(np.repeat(np.arange(n_steps), per), n_layers)
    g_head = np.tile(np.arange(per), n_layers * n_steps)
    real = g_head < heads_of_layer[g_layer] if by_head else np.ones(n_groups, dtype=bool)
    frames = []
    for i in range(v):
        for j in range(v):
            if i == j:
                continue
            valid = match_row[:, :, i, j] >= 0
            if kept_only:
                valid &= kept[:, :, i, j]
            li, si, hi, ri, ci = np.nonzero(valid)
            pts_i = np.stack([sx[li, ri, ci], sy[li, ri, ci]], axis=1)
            pts_j = np.stack([mx[:, :, i, j][valid], my[:, :, i, j][valid]], axis=1).astype(np.float64)
            group = (li * n_steps + si) * per + (hi if by_head else 0)
            n, correct = pair_counts(geo.distances(i, j, pts_i, pts_j, kind), th, group, n_groups)
            keys = {"method": np.full(n_groups, "native", dtype=object), "layer": layers[g_layer],
                    "step": steps[g_step], "timestep": timesteps[g_step]}
            if by_head:
                keys["head"] = g_head
            keys.update(src=np.full(n_groups, i), tgt=np.full(n_groups, j),
                        view_angle=np.full(n_groups, geo.view_angle(i, j)))
            frames.append(score_rows(keys, n, correct, th)[np.repeat(real, len(th))])
    df = as_score_table(frames, kind)
    row_wise = json.loads(ds.attrs.get("row_wise_layers", "[]"))
    if row_wise:
        df.attrs["row_wise_layers"] = row_wise
        if not rows_are_epipolar(geo.cameras):
            warnings.warn(
                f"layers {row_wise} attend row by row, so their matches lie on the source row; the row is the "
                f"epipolar line only for orthographic views at elevation 0, which these cameras are not",
                RowConstraintWarning, stacklevel=2,
            )
    return df


def rows_are_epipolar(cameras, tol_deg: float = 1.0) -> bool:
    """Whether image rows are epipolar lines: orthographic cameras sharing one "down" axis (the first
    camera's) with optical axes perpendicular to it (an orbit at elevation 0), within ``tol_deg``.
    Perspective views at elevation 0 fail: there only the horizon row is an epipolar line."""
    try:
        Rs = [np.asarray(c.R, dtype=np.float64) for c in cameras]
        rows = [(float(c.K[1, 1]), float(c.K[1, 2]), float(c.t[1])) for c in cameras]  # y = fy (R[1].X + t_y) + cy
    except (AttributeError, TypeError, IndexError):
        return False
    up = Rs[0][1]  # the first camera's image "down" axis in world coordinates
    for R, row in zip(Rs, rows):
        if abs(float(np.dot(R[2], up))) > np.sin(np.radians(tol_deg)) or float(np.dot(R[1], up)) < 1 - 1e-3:
            return False
        if not np.allclose(row, rows[0], rtol=1e-6, atol=1e-6):
            return False
    return all(getattr(c, "model", "perspective") == "orthographic" for c in cameras)
