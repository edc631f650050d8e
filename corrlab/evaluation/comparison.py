"""The headline comparison: native correspondences vs controls and baselines on the same generated images.

:func:`score_set` scores one probed set (native matches, controls, baselines) under one
:class:`~corrlab.evaluation.PairGeometry`; :func:`score_sets` does it for many sets (a ``set`` column);
:func:`comparison_from_scores` pools such a table into the headline rows, and :func:`comparison_table`
does both from set directories. The native row that stands for "the model" is chosen honestly by default:
each scene is scored at the (layer, step) chosen on the other scenes (``native-held-out``,
:func:`~corrlab.evaluation.selection.held_out_scores`). The best cell chosen and scored on all scenes stays
as ``native-best-in-sample``, its ``note`` saying it is optimistic.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Sequence

import pandas as pd
from tqdm.auto import tqdm

from ..errors import CorrlabError, ValueRangeError, check_choice
from .baselines import DEFAULT_BASELINES, score_baselines_on_set
from .controls import score_controls
from .native import record_geometry, score_record
from .pooling import pool_scores
from .schema import DEFAULT_THRESHOLDS, SET_COLUMN, as_record, as_set, check_thresholds
from .selection import OPTIMISTIC_LABEL, best_layer_step, held_out_scores, split_sets

__all__ = ["COMPARISON_COLUMNS", "score_set", "score_sets", "comparison_from_scores", "comparison_table"]

#: Columns of the pooled comparison table.
COMPARISON_COLUMNS = ["method", "layer", "step", "threshold", "precision", "n_correct", "n_matches", "n_sets", "note"]


def score_set(rec, mvset, thresholds: Sequence[float] = DEFAULT_THRESHOLDS, kind: str = "symmetric",
              kept_only: bool = True, controls: Sequence[str] = ("chance", "identity", "appearance"),
              baselines: Sequence[str] = DEFAULT_BASELINES) -> pd.DataFrame:
    """Per-pair score rows of one probed set: native (every layer, step), controls, baselines.

    F and the view angle of each ordered pair are computed once (one :class:`PairGeometry` of the set's
    cameras) and shared by the three scorers. Returns a score table (:data:`SCORE_COLUMNS`).
    """
    rec, mvset = as_record(rec), as_set(mvset)
    geo = record_geometry(rec, mvset.cameras)
    frames = [score_record(rec, geo, thresholds, kind, kept_only)]
    if controls:
        frames.append(score_controls(rec, mvset.images, geo, thresholds, kind, controls=list(controls)))
    if baselines:
        frames.append(score_baselines_on_set(mvset, list(baselines), thresholds, kind, cameras=geo))
    return pd.concat(frames, ignore_index=True)


def _sets_and_records(sets, records) -> tuple[list, list]:
    sets = list(sets)
    if records is None:
        if not all(isinstance(s, (str, os.PathLike)) for s in sets):
            raise CorrlabError("records: expected records for in-memory sets (only set directories imply DIR/record.nc)")
        records = [Path(s) / "record.nc" for s in sets]
    records = list(records)
    if len(records) != len(sets) or not sets:
        raise CorrlabError(f"records: expected one record per set ({len(sets)} sets), got {len(records)}")
    return sets, records


def score_sets(sets: Iterable, records: Iterable | None = None, thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
               kind: str = "symmetric", kept_only: bool = True,
               controls: Sequence[str] = ("chance", "identity", "appearance"),
               baselines: Sequence[str] = DEFAULT_BASELINES, progress: bool = True) -> pd.DataFrame:
    """:func:`score_set` of every set, with a ``set`` column (the set's position in ``sets``).

    ``records``: their probe records (``ProbeRecord`` or paths); default: ``DIR/record.nc`` of each directory.
    """
    sets, records = _sets_and_records(sets, records)
    frames = [score_set(r, s, thresholds, kind, kept_only, controls, baselines).assign(**{SET_COLUMN: k})
              for k, (s, r) in enumerate(tqdm(list(zip(sets, records)), desc="scoring sets", disable=not progress,
                                               leave=False))]
    return pd.concat(frames, ignore_index=True)


def _cell(rows: pd.DataFrame) -> tuple:
    cells = rows[["layer", "step"]].drop_duplicates()
    return (cells.iloc[0]["layer"], int(cells.iloc[0]["step"])) if len(cells) == 1 else (None, None)


def comparison_from_scores(scores: pd.DataFrame, select_threshold: float = 5.0, selection: str = "held-out",
                           layer: str | None = None, step: int | None = None, set_column: str = SET_COLUMN,
                           folds: int = 2) -> pd.DataFrame:
    """Pool a per-pair score table (native, controls, baselines of several sets) into the headline rows.

    Args:
        scores: per-pair rows with a ``set_column`` (e.g. :func:`score_sets`).
        select_threshold: the best (layer, step) maximises pooled precision at this threshold.
        selection: ``"held-out"`` (default): add ``native-held-out``, each scene scored at the cell chosen on
            the other folds' scenes (needs at least ``folds`` scenes); ``"in-sample"``: only the optimistic row.
        layer, step: an extra chosen native (layer, step) to report (``native-chosen``).

    Returns:
        :data:`COMPARISON_COLUMNS`, pooled over sets and ordered pairs. Methods: ``native-held-out``
        (``layer``/``step`` set when every fold chose the same cell; ``note`` lists the choices),
        ``native-best-in-sample`` (``note`` starts with ``"optimistic (in-sample)"``), ``native-chosen``,
        then the controls and baselines.
    """
    check_choice("selection", selection, ("held-out", "in-sample"))
    native = scores[scores["method"] == "native"]
    if native.empty:
        raise CorrlabError("scores: expected native rows (method 'native'), got none")
    if not (native["threshold"].astype(float) == float(select_threshold)).any():
        raise ValueRangeError(f"select_threshold: expected one of the thresholds "
                              f"{sorted(native['threshold'].astype(float).unique())}, got {select_threshold!r}")
    n_sets = scores[set_column].nunique() if set_column in scores.columns else 1
    frames = []
    if selection == "held-out":
        rows, sel = held_out_scores(native, select_threshold, set_column, folds)
        lay, stp = _cell(rows)
        note = "; ".join(f"sets {s.scored_on} scored at {s.layer} @ step {s.step}, chosen on sets {s.selected_on}"
                         for s in sel.itertuples(index=False))
        frames.append(pool_scores(rows, ("threshold",)).assign(method="native-held-out", layer=lay, step=stp,
                                                               note="held out: " + note))
    best = best_layer_step(native, select_threshold)
    picks = [("native-best-in-sample", best, f"{OPTIMISTIC_LABEL}: chosen and scored on the same {n_sets} set(s)")]
    if layer is not None or step is not None:
        if layer is None or step is None:
            raise CorrlabError(f"layer, step: expected both for a chosen native (layer, step), got {layer!r}, {step!r}")
        if not ((native["layer"] == layer) & (native["step"] == step)).any():
            raise CorrlabError(f"layer, step: ({layer!r}, {step!r}) is not in the records")
        picks.append(("native-chosen", (layer, int(step)), ""))
    for name, (lay, stp), note in picks:
        sub = native[(native["layer"] == lay) & (native["step"] == stp)]
        frames.append(pool_scores(sub, ("layer", "step", "threshold")).assign(method=name, note=note))
    rest = scores[scores["method"] != "native"]
    if len(rest):
        rest = rest.assign(note=rest["note"].fillna("")) if "note" in rest.columns else rest.assign(note="")
        frames.append(pool_scores(rest, ("method", "threshold", "note")).assign(layer=None, step=None))
    out = pd.concat(frames, ignore_index=True)
    out["n_sets"] = n_sets
    return out[COMPARISON_COLUMNS]


def comparison_table(
    sets: Iterable,
    records: Iterable | None = None,
    thresholds: Sequence[float] = tuple(range(1, 11)),
    kind: str = "symmetric",
    layer: str | None = None,
    step: int | None = None,
    baselines: Sequence[str] = DEFAULT_BASELINES,
    controls: Sequence[str] = ("identity", "chance"),
    kept_only: bool = True,
    select_threshold: float = 5.0,
    selection: str = "held-out",
    progress: bool = True,
) -> pd.DataFrame:
    """The headline comparison of generated sets: :func:`score_sets` then :func:`comparison_from_scores`.

    Args:
        sets: generated sets (``MultiViewSet`` or set directories).
        records: their probe records (``ProbeRecord`` or paths); default: ``DIR/record.nc`` of each directory.
        thresholds: pixel thresholds (default 1..10).
        layer, step: an extra chosen native (layer, step) to report next to the selected one.
        baselines: matcher names (unavailable ones are rows with a ``note``).
        controls: trivial matchers on the native grid; the identity matcher's epipolar precision belongs
            next to every native number (shared-elevation cameras make it high).
        select_threshold: the best (layer, step) maximises pooled precision at this threshold (5 px).
        selection: ``"held-out"`` (default; needs 2+ sets) or ``"in-sample"`` (only the optimistic row).
    """
    th = check_thresholds(thresholds)
    if float(select_threshold) not in th.tolist():
        raise ValueRangeError(f"select_threshold: expected one of the thresholds {th.tolist()}, got {select_threshold!r}")
    check_choice("selection", selection, ("held-out", "in-sample"))
    sets, records = _sets_and_records(sets, records)
    if selection == "held-out":
        split_sets(range(len(sets)))  # fail before scoring when there are too few sets to hold any out
    scores = score_sets(sets, records, th, kind, kept_only, controls, baselines, progress)
    return comparison_from_scores(scores, select_threshold, selection, layer, step)
