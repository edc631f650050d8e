"""corrlab.evaluation as one room: one per-pair scorer (F once per pair, same numbers as corrlab 0.1), held-out
selection that never looks at the scenes it scores, and pooling done in one place (plots and dashboards agree).

``tests/data/evaluation_reference_v0_1.csv`` holds the scores corrlab 0.1 computed (``probing.scoring`` and
``metrics`` at commit dfe4b48, before the move) for :func:`reference_case`, every kind and threshold. Counts
are compared exactly (integers; the same F and distance functions), precisions and view angles within
1e-12 (the CSV stores 17 significant digits, a ratio or an arccos re-read from text may differ in the last bit).
"""
from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import corrlab.evaluation.epipolar as epi
from corrlab.errors import CorrlabError
from corrlab.evaluation import (
    OPTIMISTIC_LABEL,
    PairGeometry,
    best_layer_step,
    comparison_from_scores,
    held_out_scores,
    held_out_selection,
    pool_scores,
    score_controls,
    score_matches,
    score_record,
    score_set,
    split_sets,
)

REFERENCE = Path(__file__).parent / "data" / "evaluation_reference_v0_1.csv"
THRESHOLDS = (1, 2, 5, 10)


def reference_case():
    """A fixed record and set: 3 rendered views (32 px, non-trivial cameras), two layers (4x4 and 2x2 grids),
    two steps, two heads, seeded random matches and kept flags."""
    from corrlab.probing import ProbeRecord, RecordBuilder
    from corrlab.scenes import render_scene

    mvs = render_scene(5, views=3, size=32, layout="even")
    g = torch.Generator().manual_seed(11)
    b = RecordBuilder({"threshold": 0.05})
    grids = {"fine": (4, 4), "coarse": (2, 2)}
    for name, (h, w) in grids.items():
        p = 32 // h
        rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        centres = torch.stack([cols.reshape(-1) * p + (p - 1) / 2, rows.reshape(-1) * p + (p - 1) / 2], 1).double()
        b.add_layer(name, (h, w), 2, centres, (32, 32))
    for step, t in ((0, 1.0), (2, 0.5)):
        for i in range(3):
            tgts = [j for j in range(3) if j != i]
            for name, (h, w) in grids.items():
                idx = torch.randint(0, h * w, (2, 2, h * w), generator=g)
                conf = torch.rand(2, 2, h * w, generator=g)
                b.add(name, step, t, i, tgts, idx, conf, conf < 0.7, num_images=3)
    rec = ProbeRecord(builder=b)
    rec.set_meta(prompt=mvs.prompt, seed=5, cameras=mvs.cameras)
    return rec, mvs


@pytest.fixture(scope="module")
def case():
    return reference_case()


def random_pairs():
    g = np.random.default_rng(3)
    return {(i, j): (g.uniform(0, 31, (20, 2)), g.uniform(0, 31, (20, 2))) for i in range(3) for j in range(3) if i != j}


# ------------------------------------------------------------------------------------------ one scorer
def test_scores_equal_corrlab_0_1s(case):
    rec, mvs = case
    frames = []
    for kind in ("symmetric", "sampson", "line"):  # the reference's order
        geo = PairGeometry(mvs.cameras)
        frames += [score_record(rec, geo, THRESHOLDS, kind),
                   score_controls(rec, mvs.images, geo, THRESHOLDS, kind, controls=("chance", "identity", "appearance")),
                   score_matches(random_pairs(), geo, THRESHOLDS, kind, method="random-points")]
    new = pd.concat(frames, ignore_index=True)
    ref = pd.read_csv(REFERENCE)
    assert len(new) == len(ref) == 576
    for col in ("method", "src", "tgt", "kind", "threshold", "n_correct", "n_matches"):
        assert new[col].tolist() == ref[col].tolist(), col
    assert new["layer"].fillna("-").tolist() == ref["layer"].fillna("-").tolist()
    np.testing.assert_allclose(new["precision"], ref["precision"], rtol=0, atol=1e-12)
    np.testing.assert_allclose(new["view_angle"], ref["view_angle"], rtol=0, atol=1e-12)
    assert ref["n_correct"].sum() > 0 and (ref["n_correct"] < ref["n_matches"]).any()  # a case that can fail


def test_F_and_view_angle_once_per_ordered_pair(case, monkeypatch):
    rec, mvs = case
    calls = {"F": [], "angle": []}
    real_F, real_angle = epi.fundamental_matrix, epi.relative_view_angle
    monkeypatch.setattr(epi, "fundamental_matrix", lambda a, b: calls["F"].append((id(a), id(b))) or real_F(a, b))
    monkeypatch.setattr(epi, "relative_view_angle", lambda a, b: calls["angle"].append((id(a), id(b))) or real_angle(a, b))
    df = score_set(rec, mvs, THRESHOLDS, controls=("chance", "identity", "appearance"), baselines=("sift",))
    # native (2 layers x 2 steps), 3 controls and SIFT, 4 thresholds: still one F and one angle per ordered pair
    assert len(calls["F"]) == len(set(calls["F"])) == 6
    assert len(calls["angle"]) == len(set(calls["angle"])) == 6
    assert {"native", "chance", "identity", "appearance", "sift"} == set(df["method"])
    # without a shared geometry each scorer computes them once per pair itself (not per control, layer or threshold)
    calls["F"].clear()
    score_controls(rec, mvs.images, mvs.cameras, THRESHOLDS, controls=("chance", "identity", "appearance"))
    assert len(calls["F"]) == 6


def test_one_geometry_gives_the_same_numbers_as_fresh_ones(case):
    rec, mvs = case
    shared = score_set(rec, mvs, THRESHOLDS, baselines=())
    fresh = pd.concat([score_record(rec, mvs.cameras, THRESHOLDS), score_controls(rec, mvs.images, mvs.cameras, THRESHOLDS)],
                      ignore_index=True)
    pd.testing.assert_frame_equal(shared, fresh)  # exact: the same computation, F cached or not


# ------------------------------------------------------------------------------------------ held-out selection
def split_table() -> pd.DataFrame:
    """4 scenes, 2 cells: cell A wins on scenes 0 and 2 (0.9 vs 0.1), cell B on scenes 1 and 3 (0.8 vs 0.2).
    In-sample, A wins (0.55 vs 0.45); held out, each half is scored at the other half's winner."""
    prec = {(0, "A"): 0.9, (0, "B"): 0.1, (1, "A"): 0.2, (1, "B"): 0.8}
    rows = []
    for s, (cell, layer), thr in itertools.product(range(4), [("A", "blocks.0.attn"), ("B", "blocks.1.attn")], (2.0, 5.0)):
        n_correct = int(round(100 * prec[(s % 2, cell)]))
        rows.append(dict(method="native", layer=layer, step=3, threshold=thr, src=0, tgt=1, set=s,
                         n_matches=100, n_correct=n_correct, precision=n_correct / 100))
    for s, thr in itertools.product(range(4), (2.0, 5.0)):
        rows.append(dict(method="sift", layer=None, step=None, threshold=thr, src=0, tgt=1, set=s, n_matches=10,
                         n_correct=3, precision=0.3, note=""))
    return pd.DataFrame(rows)


def test_held_out_selection_never_uses_the_scored_sets():
    table = split_table()
    assert best_layer_step(table, 5.0) == ("blocks.0.attn", 3)  # in-sample: A
    rows, sel = held_out_scores(table, 5.0)
    assert sel["scored_on"].tolist() == [[0, 2], [1, 3]] and sel["selected_on"].tolist() == [[1, 3], [0, 2]]
    assert sel["layer"].tolist() == ["blocks.1.attn", "blocks.0.attn"]  # each half gets the other half's winner
    assert set(rows.loc[rows["set"].isin([0, 2]), "layer"]) == {"blocks.1.attn"}
    assert set(rows.loc[rows["set"].isin([1, 3]), "layer"]) == {"blocks.0.attn"}
    held = pool_scores(rows, ("threshold",)).set_index("threshold")["precision"]
    assert held[5.0] == pytest.approx(0.15, abs=1e-12)  # (10 + 10 + 20 + 20) / 400; in-sample A would say 0.55
    table = comparison_from_scores(split_table(), select_threshold=5.0).set_index(["method", "threshold"])
    assert table.loc[("native-held-out", 5.0), "precision"] == pytest.approx(0.15, abs=1e-12)
    assert table.loc[("native-best-in-sample", 5.0), "precision"] == pytest.approx(0.55, abs=1e-12)
    assert table.loc[("native-best-in-sample", 5.0), "note"].startswith(OPTIMISTIC_LABEL)
    assert table.loc[("native-held-out", 5.0), "layer"] is None  # the halves chose different cells
    assert table.loc[("sift", 5.0), "precision"] == pytest.approx(0.3, abs=1e-12)


def test_a_folds_choice_ignores_its_own_scores():
    rng = np.random.default_rng(0)
    cells = [(f"blocks.{layer}.attn", step) for layer in range(3) for step in (0, 4)]
    rows = [dict(method="native", layer=l, step=s, threshold=5.0, set=k, n_matches=50, n_correct=int(rng.integers(0, 51)))
            for k in range(6) for l, s in cells]
    table = pd.DataFrame(rows).assign(precision=lambda d: d["n_correct"] / d["n_matches"])
    sel = held_out_selection(table, 5.0, folds=3)
    for fold in sel.itertuples(index=False):
        assert not set(fold.selected_on) & set(fold.scored_on)
        shuffled = table.copy()  # rewrite the scored scenes' numbers: that fold's choice must not move
        mine = shuffled["set"].isin(fold.scored_on)
        shuffled.loc[mine, "n_correct"] = rng.integers(0, 51, int(mine.sum()))
        again = held_out_selection(shuffled, 5.0, folds=3).set_index("fold").loc[fold.fold]
        assert (again["layer"], again["step"]) == (fold.layer, fold.step)


def test_too_few_sets_to_split_is_a_clear_error():
    with pytest.raises(CorrlabError, match="at least 2 scenes"):
        split_sets([7, 7, 7])
    one = split_table().query("set == 0")
    with pytest.raises(CorrlabError, match="at least 2 scenes"):
        comparison_from_scores(one)
    only = comparison_from_scores(one, selection="in-sample")
    assert "native-held-out" not in set(only["method"])
    assert split_sets([3, 1, 3, 2, 5]) == [[3, 2], [1, 5]]  # distinct scenes, alternating in order of appearance


# ------------------------------------------------------------------------------------------ pooling in one place
def test_plots_and_dashboard_show_the_evaluation_pooling(monkeypatch):
    import corrlab.evaluation
    from corrlab import plotting as P
    from corrlab.widgets import AccuracyDashboard

    table = split_table()
    pooled = pool_scores(table)
    cell = pooled[(pooled["method"] == "native") & (pooled["threshold"] == 5.0)].set_index("layer")["precision"]
    grid = P.accuracy_grid(table, 5.0)
    for layer in ("blocks.0.attn", "blocks.1.attn"):
        assert grid.loc[layer, 3] == cell[layer]  # exact: the very same pool_scores output, pivoted

    seen = []
    real = corrlab.evaluation.pool_scores
    monkeypatch.setattr(corrlab.evaluation, "pool_scores", lambda *a, **k: seen.append(1) or real(*a, **k))
    fig = P.precision_curves_figure(table, native=[("blocks.0.attn", 3)])
    assert seen  # the curves are pooled by corrlab.evaluation.pool_scores
    lines = {l.get_label(): l for l in fig.axes[0].get_lines()}
    sift = pooled[pooled["method"] == "sift"].sort_values("threshold")["precision"].to_numpy(float)
    np.testing.assert_array_equal(lines["sift"].get_ydata(), sift)  # exact: plotted values are the pooled ones
    np.testing.assert_array_equal(lines["native blocks.0.attn @ step 3"].get_ydata(),
                                  pooled[pooled["layer"] == "blocks.0.attn"].sort_values("threshold")["precision"].to_numpy(float))

    dash = AccuracyDashboard(table, threshold=5.0)
    assert dash.set_column == "set" and dash.last_error is None
    summary = dash.summary.value
    assert "held out" in summary and "0.150" in summary  # the held-out native score leads
    assert OPTIMISTIC_LABEL in summary and "0.550" in summary  # the in-sample best, labelled
    assert "0.300" in summary  # sift pooled over its 4 scenes


def test_dashboard_without_scenes_labels_its_best_cell_optimistic():
    from corrlab.widgets import AccuracyDashboard

    dash = AccuracyDashboard(split_table().drop(columns="set"), threshold=5.0)
    assert OPTIMISTIC_LABEL in dash.summary.value and "held out (" not in dash.summary.value
    assert "no scene column" in dash.summary.value


# ------------------------------------------------------------------------------------------ corrlab score
def test_a_rescored_record_equals_corrlab_score(case, tmp_path, capsys):
    from corrlab.cli import main
    from corrlab.sets import save_set

    rec, mvs = case
    d = save_set(mvs, tmp_path / "set")
    rec.save(d / "record.nc")
    assert main(["score", str(d), "--json", "--baselines", "--thresholds", "2", "5", "--kind", "sampson"]) == 0
    cli = pd.DataFrame(json.loads(capsys.readouterr().out))
    # independent: the loaded record scored per pair, summed here by hand (not by pool_scores)
    again = pd.concat([score_record(d / "record.nc", thresholds=(2, 5), kind="sampson"),
                       score_controls(d / "record.nc", mvs.images, thresholds=(2, 5), kind="sampson")])
    again = again.assign(layer=again["layer"].fillna("-"), step=again["step"].fillna(-1).astype(int))
    sums = again.groupby(["method", "layer", "step", "threshold"])[["n_correct", "n_matches"]].sum()
    want = {k: (int(v["n_correct"]), int(v["n_matches"])) for k, v in sums.iterrows()}
    got = {(r.method, "-" if pd.isna(r.layer) else r.layer, -1 if pd.isna(r.step) else int(r.step), float(r.threshold)):
           (int(r.n_correct), int(r.n_matches)) for r in cli.itertuples(index=False)}
    assert got == want
    assert len(cli) == len(sums) and cli["n_matches"].sum() > 0
    assert main(["score", str(d), "--kind", "euclid", "--baselines"]) == 2  # one distance-kind list, checked


def test_comparison_figure_labels_the_in_sample_curve_optimistic():
    from corrlab import plotting as P

    table = comparison_from_scores(split_table(), select_threshold=5.0)
    fig = P.comparison_figure(table, title="split")
    lines = {l.get_label(): l for l in fig.axes[0].get_lines()}
    optimistic = [k for k in lines if OPTIMISTIC_LABEL in k]
    assert len(optimistic) == 1 and lines[optimistic[0]].get_linestyle() == ":"
    held = [k for k in lines if k.startswith("native, held out")]
    assert len(held) == 1 and lines[held[0]].get_linestyle() == "-"
    # the plotted held-out precision is the table's (pooled there, not here): exact
    np.testing.assert_array_equal(lines[held[0]].get_ydata(),
                                  table[table.method == "native-held-out"].sort_values("threshold")["precision"].to_numpy(float))


def test_best_cell_default_weighs_precision_by_its_support():
    """The default rule is the lower 95 % Wilson bound: 2 of 6 (0.33) loses to 100 of 400 (0.25) on support,
    while the raw pooled precision picks the 6-match cell."""
    import math

    from corrlab.evaluation import best_layer_step, wilson_lower

    # hand value: k=100, n=400, z=1.96 -> (0.25 + 0.0048020 - 1.96*sqrt(0.25*0.75/400 + 1.96**2/640000)) / 1.0096040
    z = 1.96
    expected = (0.25 + z * z / 800 - z * math.sqrt(0.25 * 0.75 / 400 + z * z / (4 * 400 * 400))) / (1 + z * z / 400)
    assert wilson_lower(100, 400) == pytest.approx(expected, rel=1e-12)
    assert 0.20 < wilson_lower(100, 400) < 0.25 and wilson_lower(2, 6) < 0.1
    assert math.isnan(float(wilson_lower(0, 0)))
    rows = [dict(method="native", layer="blocks.0.attn", step=4, threshold=5.0, n_correct=2, n_matches=6),
            dict(method="native", layer="blocks.1.attn", step=1, threshold=5.0, n_correct=100, n_matches=400)]
    table = pd.DataFrame(rows).assign(precision=lambda d: d.n_correct / d.n_matches)
    assert best_layer_step(table, 5.0) == ("blocks.1.attn", 1)
    assert best_layer_step(table, 5.0, value="precision") == ("blocks.0.attn", 4)
    with pytest.raises(CorrlabError, match="value"):
        best_layer_step(table, 5.0, value="f1")
