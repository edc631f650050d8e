"""Choosing the best native (layer, step): in-sample (optimistic) and held out (honest).

:func:`best_layer_step` is the one best-cell rule: by default the highest *lower 95 % Wilson bound* of the
pooled precision at a threshold (``value="precision_lower"``), so a cell with 2 correct of 6 matches does
not beat one with 100 of 400 on noise; ``"precision"`` (the raw pooled precision) and ``"n_correct"`` are
options. Ties are broken by more correct matches, then by the table's order. Scoring a cell on the
same scenes it was chosen on is optimistic: with many (layer, step) cells, the best of them on a few
scenes is partly the best noise. :func:`held_out_scores` is the honest version: scenes are split into
folds by alternating position (scene 0 -> fold 0, scene 1 -> fold 1, scene 2 -> fold 0, ...); each
fold's rows are scored at the cell chosen on the *other* folds' scenes only (cross-fitting, so every
scene is scored once and never by a cell its own scores chose).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

from ..errors import CorrlabError, ValueRangeError
from .pooling import pool_scores
from .schema import KEY_COLUMNS, SET_COLUMN, check_table

__all__ = ["OPTIMISTIC_LABEL", "SELECTION_VALUES", "wilson_lower", "best_layer_step", "split_sets", "held_out_selection", "held_out_scores"]

#: How corrlab labels a (layer, step) chosen and scored on the same scenes, in tables and plots.
OPTIMISTIC_LABEL = "optimistic (in-sample)"


def _rows_at(table: pd.DataFrame, threshold: float, method: str) -> pd.DataFrame:
    rows = table[table["method"] == method]
    th = rows["threshold"].astype(float)
    at = rows[np.isclose(th, float(threshold), rtol=0, atol=1e-9)]
    if at.empty:
        raise CorrlabError(f"threshold: expected one of the scored thresholds {sorted(set(th.tolist()))} of "
                           f"method {method!r}, got {threshold!r}")
    return at


#: The selection criteria :func:`best_layer_step` knows.
SELECTION_VALUES = ("precision_lower", "precision", "n_correct")


def wilson_lower(n_correct, n_matches, z: float = 1.96):
    """Lower bound of the Wilson score interval of a proportion ``n_correct / n_matches`` (NaN without matches).

    ``(p + z^2/2n - z sqrt(p(1-p)/n + z^2/4n^2)) / (1 + z^2/n)``; arrays or scalars; ``z = 1.96``: 95 %.
    """
    k = np.asarray(n_correct, dtype=float)
    n = np.asarray(n_matches, dtype=float)
    with np.errstate(invalid="ignore", divide="ignore"):
        p = k / n
        centre = p + z * z / (2 * n)
        spread = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
        return np.where(n > 0, (centre - spread) / (1 + z * z / n), np.nan)


def best_layer_step(table: pd.DataFrame, threshold: float = 5.0, value: str = "precision_lower",
                    method: str = "native") -> tuple[str, int]:
    """The ``(layer, step)`` of ``method`` with the highest pooled ``value`` at ``threshold``.

    Args:
        table: a score table (per-pair rows; other methods are ignored).
        threshold: pixel threshold the cells are compared at (default 5 px).
        value: ``"precision_lower"`` (default: the lower 95 % Wilson bound of the pooled precision, which
            weighs a cell's precision by how many matches support it), ``"precision"`` (pooled) or
            ``"n_correct"``.

    Cells without matches never win; ties go to more correct matches, then to the first cell in the table.
    Raises :class:`CorrlabError` when no cell has a match at ``threshold``.
    """
    check_table("table", table, KEY_COLUMNS)
    if value not in SELECTION_VALUES:
        raise CorrlabError(f"value: expected one of {SELECTION_VALUES}, got {value!r}")
    pooled = pool_scores(_rows_at(table, threshold, method), ("layer", "step"))
    pooled = pooled[pooled["n_matches"] > 0].copy()
    pooled["precision_lower"] = wilson_lower(pooled["n_correct"], pooled["n_matches"])
    if pooled.empty:
        raise CorrlabError(f"threshold: no {method} match scored at {threshold:g} px (expected cells with matches)")
    best = pooled.sort_values([value, "n_correct"], ascending=False, kind="stable").iloc[0]
    return str(best["layer"]), int(best["step"])


def split_sets(sets: Sequence, folds: int = 2) -> list[list]:
    """Distinct scene ids in ``folds`` alternating folds: scene k goes to fold ``k % folds`` (order of first
    appearance). Raises :class:`CorrlabError` with fewer scenes than folds."""
    ids = list(dict.fromkeys(sets))
    if not isinstance(folds, (int, np.integer)) or folds < 2:
        raise ValueRangeError(f"folds: expected an integer >= 2, got {folds!r}")
    if len(ids) < folds:
        raise CorrlabError(
            f"sets: held-out selection needs at least {folds} scenes (choose on some, score on the others), got "
            f"{len(ids)} ({ids}); score more scenes, or use the in-sample best, labelled {OPTIMISTIC_LABEL!r}")
    return [ids[k::folds] for k in range(folds)]


def held_out_selection(table: pd.DataFrame, threshold: float = 5.0, set_column: str = SET_COLUMN, folds: int = 2,
                       value: str = "precision_lower", method: str = "native") -> pd.DataFrame:
    """Per fold, the cell chosen without it: columns ``fold, layer, step, selected_on, scored_on`` (scene id lists).

    ``selected_on`` and ``scored_on`` never share a scene. Raises when ``set_column`` is missing or there are
    fewer scenes than folds.
    """
    check_table("table", table, (*KEY_COLUMNS, set_column))
    nat = table[table["method"] == method]
    parts = split_sets(nat[set_column].tolist(), folds)
    rows = []
    for k, scored in enumerate(parts):
        chosen_on = [s for p, part in enumerate(parts) if p != k for s in part]
        layer, step = best_layer_step(nat[nat[set_column].isin(chosen_on)], threshold, value, method)
        rows.append({"fold": k, "layer": layer, "step": step, "selected_on": chosen_on, "scored_on": list(scored)})
    return pd.DataFrame(rows)


def held_out_scores(table: pd.DataFrame, threshold: float = 5.0, set_column: str = SET_COLUMN, folds: int = 2,
                    value: str = "precision_lower", method: str = "native") -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per-pair rows of ``method`` at held-out cells: each scene's rows at the cell chosen on the other folds.

    Returns ``(rows, selection)``: ``rows`` keeps the table's columns (every threshold; ``layer``/``step``
    say which cell scored each scene), ``selection`` is :func:`held_out_selection`. Pool ``rows`` with
    :func:`~corrlab.evaluation.pool_scores` for one held-out curve.
    """
    selection = held_out_selection(table, threshold, set_column, folds, value, method)
    nat = table[table["method"] == method]
    parts = []
    for sel in selection.itertuples(index=False):
        parts.append(nat[nat[set_column].isin(sel.scored_on) & (nat["layer"] == sel.layer) & (nat["step"] == sel.step)])
    return pd.concat(parts, ignore_index=True), selection
