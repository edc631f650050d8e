"""Epipolar scores of classical / learned matchers (SIFT, SuperPoint, DISK+LightGlue) under known cameras.

One scorer, :func:`score_baselines_on_set`: every unordered view pair is matched once, and the matches are
scored in both directions (every ordered pair, like native matches) by the per-pair scorer.
:func:`baseline_scores` runs it on rendered scenes (the foundation's baseline table, ``corrlab demo``'s
first part).
"""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from ..errors import CorrlabError, check_choice
from .epipolar import as_geometry, as_score_table
from .pooling import pool_scores
from .schema import DEFAULT_THRESHOLDS, DISTANCE_KINDS, as_set, check_thresholds

__all__ = ["DEFAULT_BASELINES", "score_baselines_on_set", "baseline_scores", "baseline_summary"]

DEFAULT_BASELINES = ("sift", "superpoint", "disk+lightglue")


def score_baselines_on_set(
    mvset,
    matchers: Sequence[str] = DEFAULT_BASELINES,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    kind: str = "symmetric",
    cameras=None,
) -> pd.DataFrame:
    """Epipolar scores of matchers on a set's images, under its cameras (or ``cameras``: a list or a
    :class:`~corrlab.evaluation.PairGeometry` shared with the other scorers of the set).

    A matcher whose weights are missing (or that fails to load or run) gives one row per threshold with
    ``precision`` NaN, zero counts and ``note`` = ``"unavailable: <reason>"`` instead of an error.
    Unknown matcher names raise. Returns a score table, one row per matcher x ordered pair x threshold.
    """
    from ..baselines import MATCHERS, available_matchers, get_matcher

    mvset = as_set(mvset)
    check_choice("kind", kind, DISTANCE_KINDS)
    th = check_thresholds(thresholds)
    geo = as_geometry(mvset.cameras if cameras is None else cameras, mvset.num_views)
    status = available_matchers()
    frames = []
    for name in matchers:
        check_choice("matchers", name, list(MATCHERS))
        reason = None if status.get(name) is True else str(status.get(name))
        results = {}
        if reason is None:
            matcher = get_matcher(name)
            try:
                for i in range(mvset.num_views):
                    for j in range(i + 1, mvset.num_views):
                        m = matcher(mvset.images[i], mvset.images[j])
                        results[(i, j)], results[(j, i)] = m, m.swapped()
            except (CorrlabError, ImportError, OSError, RuntimeError) as e:
                reason = f"{type(e).__name__}: {e}"
        if reason is not None:
            frames.append(pd.DataFrame({
                "method": name, "layer": None, "step": None, "src": None, "tgt": None, "view_angle": np.nan,
                "threshold": th, "precision": np.nan, "n_correct": 0, "n_matches": 0, "note": f"unavailable: {reason}",
            }))
            continue
        for (i, j), m in sorted(results.items()):
            frames.append(geo.score_pair(i, j, m.pts0, m.pts1, th, kind, name))
    return as_score_table(frames, kind)


def baseline_scores(
    seeds: Iterable[int],
    views: int = 4,
    size: int = 128,
    layout: str = "even",
    matchers: Sequence[str] | None = None,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    kind: str = "symmetric",
    progress: bool = True,
) -> tuple[pd.DataFrame, dict[str, str]]:
    """Per-pair scores of the available matchers on rendered sets (one ``views``-view set per seed, a
    ``set`` column = the seed), and ``{matcher: reason}`` for the matchers that could not run."""
    from ..baselines import available_matchers
    from ..scenes import render_scene

    status = available_matchers()
    wanted = list(matchers) if matchers is not None else list(status)
    usable = [m for m in wanted if status.get(m) is True]
    skipped = {m: str(status.get(m, "unknown matcher")) for m in wanted if m not in usable}
    frames = [
        score_baselines_on_set(render_scene(s, views=views, size=size, layout=layout), usable, thresholds, kind)
        .assign(set=s)
        for s in tqdm(list(seeds), desc="baselines on rendered sets", disable=not progress)
    ]
    return pd.concat(frames, ignore_index=True), skipped


def baseline_summary(df: pd.DataFrame) -> pd.DataFrame:
    """Pooled precision and correct-match counts per method x threshold, with mean correct matches per
    ordered view pair (``correct_per_pair``)."""
    s = pool_scores(df, by=("method", "threshold"))
    s["correct_per_pair"] = s["n_correct"] / s["n_pairs"]
    return s
