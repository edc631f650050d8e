"""corrlab.evaluation on constructed matches with known epipolar distances: score_matches, pck, pool_scores."""
from __future__ import annotations

import math
from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pandas as pd
import pytest
import torch

from corrlab.errors import CorrlabError, ShapeError, ValueRangeError
from corrlab.geometry import Camera, fundamental_matrix
from corrlab.evaluation import DEFAULT_THRESHOLDS, SCORE_COLUMNS, epipolar_scores, pck, pool_scores, score_matches


def _K(f=100.0):
    return np.array([[f, 0.0, 32.0], [0.0, f, 24.0], [0.0, 0.0, 1.0]])


def _cameras():
    """Three cameras on the x axis, R = I, same K: epipolar lines of every pair are image rows."""
    return [Camera(K=_K(), R=np.eye(3), t=np.array([-b, 0.0, 0.0])) for b in (0.0, 0.5, 1.5)]


OFFSETS = np.array([0.0, 0.5, 1.5, 3.0, 10.0])  # distance of each match from its epipolar row


def _matches(offsets=OFFSETS, seed=0):
    rng = np.random.default_rng(seed)
    pts1 = rng.uniform(0, 48, size=(len(offsets), 2))
    pts2 = pts1 + np.stack([rng.uniform(-5, 5, len(offsets)), offsets], axis=1)  # slide along the row, then offset
    return pts1, pts2


@dataclass
class FakeMatches:
    pts0: np.ndarray
    pts1: np.ndarray


def test_epipolar_scores_line_kind_counts_known_distances():
    cams = _cameras()
    F = fundamental_matrix(cams[0], cams[1])
    pts1, pts2 = _matches()
    df = epipolar_scores(pts1, pts2, F, thresholds=(1, 2, 5), kind="line")
    assert list(df.columns) == ["threshold", "precision", "n_correct", "n_matches", "kind"]
    assert df["n_correct"].tolist() == [2, 3, 4]
    assert df["precision"].tolist() == pytest.approx([0.4, 0.6, 0.8])
    assert (df["n_matches"] == 5).all() and (df["kind"] == "line").all()


def test_epipolar_scores_symmetric_is_sqrt2_times_offset_here():
    cams = _cameras()
    F = fundamental_matrix(cams[0], cams[1])
    pts1, pts2 = _matches()
    # symmetric = sqrt(2) * offset: 0, 0.71, 2.12, 4.24, 14.1
    df = epipolar_scores(torch.as_tensor(pts1), torch.as_tensor(pts2), F, thresholds=(1, 2, 2.2, 5))
    assert df["n_correct"].tolist() == [2, 2, 3, 4]
    assert (df["kind"] == "symmetric").all()


def test_epipolar_scores_empty_is_nan_precision_and_zero_counts():
    F = fundamental_matrix(*_cameras()[:2])
    df = epipolar_scores(np.zeros((0, 2)), np.zeros((0, 2)), F, thresholds=(1, 5))
    assert len(df) == 2
    assert df["precision"].isna().all()
    assert df["n_correct"].tolist() == [0, 0] and df["n_matches"].tolist() == [0, 0]


def test_pck_with_valid_mask():
    gt = np.array([[0.0, 0.0], [10.0, 10.0], [np.nan, np.nan], [5.0, 5.0]])
    pred = np.array([[0.5, 0.0], [13.0, 14.0], [1.0, 1.0], [5.0, 7.0]])  # errors 0.5, 5, -, 2
    valid = np.array([True, True, False, True])
    df = pck(pred, gt, thresholds=(1, 2, 4.9, 5), valid=valid)
    assert list(df.columns) == ["threshold", "pck", "n"]
    assert df["pck"].tolist() == pytest.approx([1 / 3, 2 / 3, 2 / 3, 1.0])
    assert (df["n"] == 3).all()
    empty = pck(pred, gt, thresholds=(1,), valid=np.zeros(4, dtype=bool))
    assert math.isnan(empty["pck"][0]) and empty["n"][0] == 0
    with pytest.raises(ValueRangeError, match="gt"):
        pck(pred, gt)  # NaN ground truth counted without a mask
    with pytest.raises(ShapeError, match="valid"):
        pck(pred, gt, valid=valid[:3])
    with pytest.raises(ShapeError, match="gt"):
        pck(pred, gt[:2])


def test_score_matches_and_pool_scores_pool_over_pairs():
    cams = _cameras()
    a1, a2 = _matches(OFFSETS, seed=1)  # 5 matches, 2 within 1 px (line)
    b1, b2 = _matches(np.array([0.2, 0.3, 7.0]), seed=2)  # 3 matches, 2 within 1 px
    by_pair = {(0, 1): (a1, a2), (1, 2): FakeMatches(b1, b2), (0, 2): (np.zeros((0, 2)), np.zeros((0, 2)))}
    df = score_matches(by_pair, cams, thresholds=(1, 5), kind="line", method="sift")
    assert list(df.columns) == list(SCORE_COLUMNS)
    assert df["layer"].isna().all() and df["step"].isna().all() and (df["note"] == "").all()
    assert len(df) == 6
    row = df[(df.src == 1) & (df.tgt == 2) & (df.threshold == 1)].iloc[0]
    assert row.n_correct == 2 and row.n_matches == 3 and row.precision == pytest.approx(2 / 3)
    # R = I for all three cameras: angle 0 up to arccos's rounding near 1 (sqrt(2 * 2^-52) rad ~ 1e-6 deg)
    np.testing.assert_allclose(df["view_angle"], 0.0, rtol=0, atol=1e-5)

    summary = pool_scores(df, by=("method", "threshold"))
    assert list(summary.columns) == ["method", "threshold", "precision", "n_correct", "n_matches", "n_pairs", "kind"]
    assert (summary["kind"] == "line").all()
    at1 = summary[summary.threshold == 1].iloc[0]
    assert at1.n_correct == 4 and at1.n_matches == 8 and at1.n_pairs == 3
    assert at1.precision == pytest.approx(4 / 8)  # pooled: a ratio of exact counts, one float division


def test_pool_scores_refuses_to_pool_distance_kinds_and_plots_in_one_line():
    cams = _cameras()
    m = {(0, 1): _matches()}
    df = pd.concat(
        [score_matches(m, cams, kind="line", method="a"), score_matches(m, cams, kind="sampson", method="a")],
        ignore_index=True,
    )
    with pytest.raises(CorrlabError, match="kind"):
        pool_scores(df, by=("method", "threshold"))
    summary = pool_scores(df, by=["method", "kind", "threshold"])
    assert len(summary) == 2 * len(DEFAULT_THRESHOLDS)
    import seaborn as sns

    ax = sns.lineplot(summary, x="threshold", y="precision", hue="kind")
    assert len(ax.get_lines()) >= 2


def test_score_matches_bad_input():
    cams = _cameras()
    with pytest.raises(ValueRangeError, match="outside cameras"):
        score_matches({(0, 3): _matches()}, cams)
    with pytest.raises(CorrlabError, match="matches_by_pair"):
        score_matches({(0, 1): np.zeros((3, 2))}, cams)
    with pytest.raises(ShapeError, match="pts_j"):
        score_matches({(0, 1): (np.zeros((3, 2)), np.zeros((2, 2)))}, cams)
    with pytest.raises(ValueRangeError, match="thresholds"):
        score_matches({(0, 1): _matches()}, cams, thresholds=(-1,))
    with pytest.raises(CorrlabError, match="kind"):
        score_matches({(0, 1): _matches()}, cams, kind="euclid")
    empty = score_matches({}, cams)
    assert len(empty) == 0 and "precision" in empty.columns
