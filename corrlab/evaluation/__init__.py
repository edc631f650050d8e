"""Evaluation: every score of corrlab, in one room.

Native correspondences (a :class:`~corrlab.probing.ProbeRecord`), the trivial controls and baseline
matchers are all scored by one per-pair epipolar scorer (:mod:`.epipolar`: F and the view angle once
per ordered view pair) into one tidy table (:mod:`.schema`: documented columns), pooled in one place
(:func:`pool_scores`), and the best (layer, step) is chosen by one rule (:func:`best_layer_step`), held out
by default (:func:`held_out_scores`: chosen on other scenes than those it is scored on).

==================  ===============================================================================
:mod:`.schema`      the score table's columns, ``DEFAULT_THRESHOLDS``, ``DISTANCE_KINDS``, input checks
:mod:`.epipolar`    ``PairGeometry`` and the per-pair scorer; ``score_matches``, ``score_token_matches``
:mod:`.native`      ``score_record``: a record's native matches
:mod:`.controls`    ``score_controls``: chance / identity / appearance on the record's grid
:mod:`.baselines`   ``score_baselines_on_set`` (SIFT, SuperPoint, DISK+LightGlue), rendered-scene tables
:mod:`.pck`         ``pck``, ``pck_record``: against ground truth from depth
:mod:`.pooling`     ``pool_scores``
:mod:`.selection`   ``best_layer_step`` (in-sample), ``held_out_scores`` (cross-fitted over scenes)
:mod:`.comparison`  ``score_set(s)``, ``comparison_table``: the headline comparison
:mod:`.bootstrap`   ``bootstrap_mean_ci``: the 95 % CI of a mean over scenes (paired effects)
==================  ===============================================================================

>>> from corrlab.evaluation import score_sets, comparison_from_scores          # doctest: +SKIP
>>> scores = score_sets(set_dirs)                   # per pair, with a "set" column   # doctest: +SKIP
>>> comparison_from_scores(scores)                  # native-held-out next to SIFT    # doctest: +SKIP
"""
from .bootstrap import MeanCI, bootstrap_mean_ci
from .baselines import DEFAULT_BASELINES, baseline_scores, baseline_summary, score_baselines_on_set
from .comparison import COMPARISON_COLUMNS, comparison_from_scores, comparison_table, score_set, score_sets
from .controls import score_controls
from .epipolar import PairGeometry, as_geometry, epipolar_scores, score_matches, score_token_matches
from .native import RowConstraintWarning, score_record
from .pck import pck, pck_record
from .pooling import pool_scores
from .schema import DEFAULT_THRESHOLDS, DISTANCE_KINDS, KEY_COLUMNS, SCORE_COLUMNS, SET_COLUMN
from .selection import (
    OPTIMISTIC_LABEL,
    SELECTION_VALUES,
    best_layer_step,
    held_out_scores,
    held_out_selection,
    split_sets,
    wilson_lower,
)

__all__ = [
    "DEFAULT_THRESHOLDS",
    "DISTANCE_KINDS",
    "SCORE_COLUMNS",
    "KEY_COLUMNS",
    "SET_COLUMN",
    "PairGeometry",
    "as_geometry",
    "epipolar_scores",
    "score_matches",
    "score_token_matches",
    "score_record",
    "RowConstraintWarning",
    "score_controls",
    "DEFAULT_BASELINES",
    "score_baselines_on_set",
    "baseline_scores",
    "baseline_summary",
    "pck",
    "pck_record",
    "pool_scores",
    "OPTIMISTIC_LABEL",
    "best_layer_step",
    "SELECTION_VALUES",
    "wilson_lower",
    "split_sets",
    "held_out_selection",
    "held_out_scores",
    "COMPARISON_COLUMNS",
    "score_set",
    "score_sets",
    "comparison_from_scores",
    "comparison_table",
    "MeanCI",
    "bootstrap_mean_ci",
]
