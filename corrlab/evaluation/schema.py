"""The tidy score table: its columns, the default thresholds and distance kinds, and input checks.

Every scorer in :mod:`corrlab.evaluation` returns the same long table, one row per
(method, [layer, step,] ordered view pair, threshold) and :func:`~corrlab.evaluation.pooling.pool_scores`
is the one place rows are pooled. Columns (:data:`SCORE_COLUMNS`, in this order):

========== ============================================================================================
method     ``"native"`` (the model's own matches), a control (``"chance"``, ``"identity"``,
           ``"appearance"``), a baseline matcher (``"sift"``, ...) or any name given to
           :func:`~corrlab.evaluation.epipolar.score_matches`
layer      attention layer of a native row (``None`` otherwise)
step       recorded denoising step of a native row (``None`` otherwise)
timestep   the model's time input at that step (NaN / ``None`` otherwise)
src, tgt   the ordered view pair: matches go from image ``src`` to image ``tgt`` (``src != tgt``)
view_angle degrees between the two cameras' optical axes
threshold  epipolar distance threshold in pixels; a match is correct when its distance is ``<= threshold``
precision  ``n_correct / n_matches``; NaN when there is no match (undefined, not 0)
n_correct  matches within the threshold
n_matches  matches scored
kind       the epipolar distance: ``"symmetric"`` (default), ``"line"`` or ``"sampson"``
note       ``""``, or why a row has no scores (``"unavailable: <reason>"`` for a baseline without weights)
========== ============================================================================================

Optional columns: ``head`` (``score_record(by_head=True)``) and :data:`SET_COLUMN` (``"set"``: which
generated set / scene a row comes from; a sweep's tables use its item ``key``). The scene column is
what held-out selection (:mod:`corrlab.evaluation.selection`) splits on.
"""
from __future__ import annotations

import os

import numpy as np

from ..errors import CorrlabError, ShapeError, ValueRangeError, describe
from ..geometry.epipolar import DISTANCE_KINDS

__all__ = ["SCORE_COLUMNS", "KEY_COLUMNS", "SET_COLUMN", "DEFAULT_THRESHOLDS", "DISTANCE_KINDS", "check_thresholds",
           "check_table", "as_record", "as_set"]

#: Default pixel thresholds of every scorer. 1 and 2 px are sub-token accuracy, 5 px selects the best
#: (layer, step) (:func:`~corrlab.evaluation.selection.best_layer_step`), and 10 px is about one token of
#: the embedded models' coarsest grids (8-px tokens), so the table shows where token-level matches
#: saturate. (corrlab 0.1 had a second default, (1, 2, 5), for keypoint matchers: a subset of these
#: rows, so tables made with either still join.)
DEFAULT_THRESHOLDS = (1.0, 2.0, 5.0, 10.0)

#: Every column of a per-pair score table, in order (see the module docstring).
SCORE_COLUMNS = ("method", "layer", "step", "timestep", "src", "tgt", "view_angle", "threshold", "precision",
                 "n_correct", "n_matches", "kind", "note")

#: The columns every consumer (pooling, plots, dashboards) needs.
KEY_COLUMNS = ("method", "layer", "step", "threshold", "precision", "n_correct", "n_matches")

#: The scene column held-out selection splits on.
SET_COLUMN = "set"


def check_thresholds(thresholds) -> np.ndarray:
    """``(T,)`` float64 thresholds: a non-empty sequence (or one number) of finite pixel values >= 0."""
    try:
        th = np.asarray(list(thresholds) if not np.isscalar(thresholds) else [thresholds], dtype=np.float64)
    except (TypeError, ValueError):
        raise CorrlabError(f"thresholds: expected a sequence of pixel values, got {describe(thresholds)}") from None
    if th.ndim != 1 or th.size == 0:
        raise ShapeError(f"thresholds: expected a non-empty 1-D sequence, got {describe(thresholds)}")
    if not np.all(np.isfinite(th)) or np.any(th < 0):
        raise ValueRangeError(f"thresholds: expected finite values >= 0 (pixels), got {th.tolist()}")
    return th


def check_table(name: str, table, columns=KEY_COLUMNS):
    """``table`` if it is a DataFrame holding ``columns``; else a :class:`CorrlabError` naming what is missing."""
    import pandas as pd

    if not isinstance(table, pd.DataFrame):
        raise CorrlabError(f"{name}: expected a pandas DataFrame with columns {list(columns)}, got {describe(table)}")
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise CorrlabError(f"{name}: expected columns {list(columns)}, missing {missing} (got {list(table.columns)})")
    return table


def as_record(rec):
    """A :class:`~corrlab.probing.ProbeRecord`, loaded when ``rec`` is a path."""
    from ..probing.record import ProbeRecord

    if isinstance(rec, ProbeRecord):
        return rec
    if isinstance(rec, (str, os.PathLike)):
        return ProbeRecord.load(rec)
    raise CorrlabError(f"rec: expected a ProbeRecord or the path of a saved one, got {describe(rec)}")


def as_set(mvset):
    """A :class:`~corrlab.sets.MultiViewSet`, loaded when ``mvset`` is a set directory."""
    from ..sets import MultiViewSet, load_set

    if isinstance(mvset, MultiViewSet):
        return mvset
    if isinstance(mvset, (str, os.PathLike)):
        return load_set(mvset)
    raise CorrlabError(f"mvset: expected a MultiViewSet or a set directory, got {describe(mvset)}")
