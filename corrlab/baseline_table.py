"""The foundation's baseline table: classical and learned matchers on rendered multi-view scenes.

``baseline_scores(seeds, ...)`` renders one 4-view set per seed, runs every available matcher on every
unordered view pair and scores the matches under the epipolar geometry of the known cameras
(:func:`corrlab.metrics.score_matches`). Unavailable matchers (no weights) are listed, not fatal.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import pandas as pd
from tqdm.auto import tqdm

from .baselines import available_matchers, get_matcher
from .metrics import score_matches, summarise
from .scenes import render_scene
from .sets import MultiViewSet

__all__ = ["score_set_with_matchers", "baseline_scores", "baseline_summary"]


def score_set_with_matchers(
    mv: MultiViewSet,
    matchers: Sequence[str] = ("sift", "disk+lightglue"),
    thresholds: Sequence[float] = (1.0, 2.0, 5.0),
    kind: str = "symmetric",
) -> pd.DataFrame:
    """Score every matcher on every unordered view pair (i < j) of ``mv``: one row per pair x threshold x method."""
    frames = []
    V = mv.num_views
    for name in matchers:
        match = get_matcher(name)
        pairs = {}
        for i in range(V):
            for j in range(i + 1, V):
                m = match(mv.images[i], mv.images[j])
                pairs[(i, j)] = (m.pts0, m.pts1)
        frames.append(score_matches(pairs, mv.cameras, thresholds, kind=kind, method=name))
    df = pd.concat(frames, ignore_index=True)
    df.insert(0, "seed", mv.seed)
    return df


def baseline_scores(
    seeds: Iterable[int],
    views: int = 4,
    size: int = 128,
    layout: str = "even",
    matchers: Sequence[str] | None = None,
    thresholds: Sequence[float] = (1.0, 2.0, 5.0),
    kind: str = "symmetric",
    progress: bool = True,
) -> tuple[pd.DataFrame, dict[str, str]]:
    """Per-pair scores on rendered sets, and ``{matcher: reason}`` for the matchers that could not run."""
    status = available_matchers()
    wanted = list(matchers) if matchers is not None else list(status)
    usable = [m for m in wanted if status.get(m) is True]
    skipped = {m: str(status.get(m, "unknown matcher")) for m in wanted if m not in usable}
    seeds = list(seeds)
    frames = [
        score_set_with_matchers(render_scene(s, views=views, size=size, layout=layout), usable, thresholds, kind)
        for s in tqdm(seeds, desc="baselines on rendered sets", disable=not progress)
    ]
    return pd.concat(frames, ignore_index=True), skipped


def baseline_summary(df: pd.DataFrame) -> pd.DataFrame:
    """Pooled precision and correct-match counts per method x threshold, with mean correct matches per pair."""
    s = summarise(df, by=["method", "threshold"])
    s["correct_per_pair"] = s["n_correct"] / s["n_pairs"]
    return s
