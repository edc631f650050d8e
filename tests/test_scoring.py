"""corrlab.evaluation: native matches, controls and baselines scored on a scene whose geometry is known exactly.

Three cameras on a line (pure x translation, same K): epipolar lines are image rows, and a
fronto-parallel plane at depth 4 moves by 8 px (one 8-px token) per unit of baseline.

Counts are compared exactly: every distance here is 0 or at least 8 px (11.3 px symmetric), far from the
thresholds, so rounding cannot move a match across one. Precisions and PCKs are ratios of those counts
(a float division) and are compared with a tolerance.
"""
import numpy as np
import pytest
import torch

import corrlab.baselines
from corrlab.errors import CorrlabError, ValueRangeError
from corrlab.geometry import Camera
from corrlab.geometry.epipolar import fundamental_matrix
from corrlab.evaluation import (
    comparison_table,
    epipolar_scores,
    pck_record,
    score_baselines_on_set,
    score_controls,
    score_record,
)
from corrlab.probing import MatchingOptions, ProbeRecord, RecordBuilder, control_matches
from corrlab.sets import MultiViewSet, save_set

SIZE, GRID, PITCH = 32, (4, 4), 8
K = [[32.0, 0, 15.5], [0, 32.0, 15.5], [0, 0, 1]]
CAMERAS = [Camera(K=K, R=torch.eye(3), t=[-float(b), 0.0, 0.0]) for b in range(3)]  # camera b sits at x = b
DEPTH = torch.full((3, SIZE, SIZE), 4.0)


def centres():
    rows, cols = torch.meshgrid(torch.arange(4), torch.arange(4), indexing="ij")
    return torch.stack([cols.reshape(-1) * PITCH + 3.5, rows.reshape(-1) * PITCH + 3.5], 1).double()


def true_index(i, j):
    """Token of image j that sees what token of image i sees (column shifts by i - j), clamped."""
    rows, cols = torch.arange(16) // 4, torch.arange(16) % 4
    return rows * 4 + (cols + (i - j)).clamp(0, 3)


def row_shift_index():
    rows, cols = torch.arange(16) // 4, torch.arange(16) % 4
    return (rows + 1).clamp(max=3) * 4 + cols


def make_record(kept_fraction=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    b = RecordBuilder({"threshold": 0.05})
    for layer in ("good", "rowshift", "random"):
        b.add_layer(layer, GRID, 2, centres(), (SIZE, SIZE))
    for step, t in ((0, 1.0), (1, 0.5)):
        for i in range(3):
            tgts = [j for j in range(3) if j != i]
            for layer in ("good", "rowshift", "random"):
                if layer == "good":
                    idx = torch.stack([true_index(i, j) for j in tgts])
                elif layer == "rowshift":
                    idx = row_shift_index().expand(2, 16)
                else:
                    idx = torch.randint(0, 16, (2, 16), generator=g)
                idx = idx.expand(2, 2, 16)  # two heads agree
                conf = torch.rand(2, 2, 16, generator=g)
                kept = conf < kept_fraction
                b.add(layer, step, t, i, tgts, idx, conf, kept, num_images=3)
    rec = ProbeRecord(builder=b)
    rec.set_meta(prompt="plane", seed=seed, cameras=CAMERAS)
    return rec


def pooled(df, by=("method", "layer", "threshold")):
    g = df.groupby(list(by), dropna=False)[["n_correct", "n_matches"]].sum()
    return (g["n_correct"] / g["n_matches"]).to_dict()


def test_native_precision_on_known_geometry():
    rec = make_record()
    df = score_record(rec, thresholds=(1, 5, 10, 12), kind="line")
    assert set(df.columns) >= {"method", "layer", "step", "timestep", "src", "tgt", "threshold", "precision",
                               "n_correct", "n_matches", "view_angle", "kind"}
    assert len(df) == 3 * 2 * 6 * 4  # layers x steps x ordered pairs x thresholds
    p = pooled(df)
    assert all(p[("native", "good", t)] == pytest.approx(1.0) for t in (1, 5, 10, 12))
    # a one-row shift is 8 px off the (horizontal) epipolar line, except on the clamped last row
    assert p[("native", "rowshift", 5)] == pytest.approx(0.25) and p[("native", "rowshift", 10)] == pytest.approx(1.0)
    sym = pooled(score_record(rec, thresholds=(10, 12), kind="symmetric"))
    assert sym[("native", "rowshift", 10)] == pytest.approx(0.25) and sym[("native", "rowshift", 12)] == pytest.approx(1.0)  # 8 * sqrt(2)
    assert (df["n_matches"] == 32).all()  # 2 heads x 16 tokens
    assert sorted(df["timestep"].unique()) == [0.5, 1.0]  # exact: the stored input values


def test_native_scores_equal_metrics_reference():
    rec = make_record(kept_fraction=0.6, seed=3)
    df = score_record(rec, thresholds=(1, 2, 5), by_head=True)
    ds = rec.ds
    sel = ds.sel(layer="random", step=1, src=2, tgt=0, head=1)
    keep = sel["kept"].values.reshape(-1)
    pts_i = np.stack([ds["src_x"].sel(layer="random").values.reshape(-1), ds["src_y"].sel(layer="random").values.reshape(-1)], 1)
    pts_j = np.stack([sel["match_x"].values.reshape(-1), sel["match_y"].values.reshape(-1)], 1)
    ref = epipolar_scores(pts_i[keep], pts_j[keep], fundamental_matrix(CAMERAS[2], CAMERAS[0]), (1, 2, 5))
    mine = df[(df.layer == "random") & (df.step == 1) & (df.src == 2) & (df.tgt == 0) & (df["head"] == 1)]
    assert mine["n_matches"].tolist() == ref["n_matches"].tolist() == [int(keep.sum())] * 3
    assert mine["n_correct"].tolist() == ref["n_correct"].tolist()
    assert 0 < int(keep.sum()) < 16
    all_matches = score_record(rec, thresholds=(1,), kept_only=False)
    assert (all_matches["n_matches"] == 32).all()


def test_controls_identity_shortcut_and_chance_seed():
    rec = make_record()
    images = torch.rand(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    df = score_controls(rec, images, thresholds=(1, 5), kind="line")
    p = pooled(df, ("method", "threshold"))
    assert p[("identity", 1)] == pytest.approx(1.0)  # same position lies on the row-aligned epipolar line
    assert {"chance", "identity", "appearance"} == set(df["method"])
    assert df["layer"].isna().all() and df["step"].isna().all()
    a = control_matches("chance", 3, GRID, seed=5)
    assert torch.equal(a, control_matches("chance", 3, GRID, seed=5))  # exact: integer indices, same seed
    assert not torch.equal(a, control_matches("chance", 3, GRID, seed=6))
    assert (a[[0, 1, 2], [0, 1, 2]] == -1).all()
    # appearance NN finds a shifted copy of an image exactly
    shifted = torch.roll(images[0], shifts=-PITCH, dims=-1)
    nn = control_matches("appearance", 2, GRID, images=torch.stack([images[0], shifted]))
    cols = torch.arange(16) % 4
    # exact: indices; the true patch is a copy (distance ~0), every other patch of the random image is O(1) away
    assert torch.equal(nn[0, 1][cols > 0], (torch.arange(16) - 1)[cols > 0])


def test_pck_splits_by_displacement():
    rec = make_record()
    df = pck_record(rec, DEPTH, thresholds=(1, 10), images=None, controls=("identity",))
    good = df[(df.method == "native") & (df.layer == "good")]
    assert np.allclose(good.loc[good.n_points > 0, "pck"], 1.0, rtol=0, atol=1e-12)
    ident = df[(df.method == "identity") & (df.n_points > 0)]
    near = ident[(ident.displacement == "<2")]  # neighbouring cameras: the plane moves 1 token
    far = ident[(ident.displacement == ">=2")]  # cameras 0 and 2: 2 tokens
    assert set(near[["src", "tgt"]].apply(tuple, axis=1)) == {(0, 1), (1, 0), (1, 2), (2, 1)}
    assert (near.groupby("threshold")["n_correct"].sum() / near.groupby("threshold")["n_points"].sum()).tolist() == pytest.approx([0.0, 1.0], abs=1e-12)
    assert set(far[["src", "tgt"]].apply(tuple, axis=1)) == {(0, 2), (2, 0)}
    assert far["pck"].max() == pytest.approx(0.0, abs=1e-12)
    # only the 12 tokens whose match stays inside the next image count
    assert near[(near.src == 0) & (near.tgt == 1) & (near.threshold == 1)]["n_points"].item() == 12
    tok = pck_record(rec, DEPTH, thresholds=(1,), unit="tokens", controls=("identity",))
    near_tok = tok[(tok.method == "identity") & (tok.displacement == "<2")]
    assert np.allclose(near_tok.loc[near_tok.n_points > 0, "pck"], 1.0, rtol=0, atol=1e-12)


def make_set(seed):
    images = torch.rand(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))
    return MultiViewSet(images=images, cameras=CAMERAS, prompt="plane", seed=seed)


def test_baselines_unavailable_are_marked(monkeypatch):
    monkeypatch.setattr(corrlab.baselines, "available_matchers",
                        lambda: {"sift": "no OpenCV today", "superpoint": True, "disk+lightglue": True})
    df = score_baselines_on_set(make_set(0), matchers=("sift",), thresholds=(1, 5))
    assert df["method"].tolist() == ["sift", "sift"]
    assert df["note"].str.startswith("unavailable: no OpenCV today").all() and df["precision"].isna().all()
    with pytest.raises(CorrlabError, match="matchers"):
        score_baselines_on_set(make_set(0), matchers=("orb",))


def test_baselines_score_both_directions():
    from corrlab.scenes import render_scene

    mvs = render_scene(1, views=4, size=64)
    df = score_baselines_on_set(mvs, matchers=("sift",), thresholds=(2,))
    assert len(df) == 12 and (df["note"] == "").all()
    fwd = df.set_index(["src", "tgt"])["n_matches"]
    assert all(fwd[(i, j)] == fwd[(j, i)] for i in range(4) for j in range(4) if i != j)
    assert fwd.sum() > 0


def test_comparison_table(tmp_path):
    dirs = []
    for seed in (0, 1):
        d = save_set(make_set(seed), tmp_path / f"set{seed}")
        make_record(seed=seed).save(d / "record.nc")
        dirs.append(d)
    table = comparison_table(dirs, thresholds=(1, 5, 10), kind="line", layer="rowshift", step=0,
                             baselines=("sift",), progress=False)
    assert list(table.columns) == ["method", "layer", "step", "threshold", "precision", "n_correct", "n_matches",
                                   "n_sets", "note"]
    best = table[table.method == "native-best-in-sample"]
    assert best["layer"].unique().tolist() == ["good"] and np.allclose(best["precision"], 1.0, rtol=0, atol=1e-12)
    assert best["n_matches"].iloc[0] == 2 * 6 * 32  # sets x pairs x (heads x tokens), one step
    assert best["note"].str.startswith("optimistic (in-sample)").all()
    held = table[table.method == "native-held-out"]  # "good" is perfect in both sets: both halves choose it
    assert held["layer"].unique().tolist() == ["good"] and np.allclose(held["precision"], 1.0, rtol=0, atol=1e-12)
    assert held["n_matches"].iloc[0] == 2 * 6 * 32 and held["note"].str.startswith("held out").all()
    chosen = table[table.method == "native-chosen"].set_index("threshold")["precision"]
    assert chosen[5.0] == pytest.approx(0.25) and chosen[10.0] == pytest.approx(1.0)
    ident = table[table.method == "identity"].set_index("threshold")["precision"]
    assert np.allclose(ident, 1.0, rtol=0, atol=1e-12)
    assert {"chance", "sift"} <= set(table["method"]) and (table["n_sets"] == 2).all()
    with pytest.raises(ValueRangeError, match="select_threshold"):
        comparison_table(dirs, thresholds=(1, 2), baselines=(), progress=False)
    with pytest.raises(CorrlabError, match="at least 2 scenes"):
        comparison_table(dirs[:1], thresholds=(1, 5), baselines=(), progress=False)
    one = comparison_table(dirs[:1], thresholds=(1, 5), baselines=(), selection="in-sample", progress=False)
    assert "native-held-out" not in set(one["method"]) and "native-best-in-sample" in set(one["method"])


def test_probe_rendered_then_pck():
    from corrlab.model import CorrlabPipeline, MultiViewDiT
    from corrlab.probing import probe_rendered
    from corrlab.scenes import render_scene

    torch.manual_seed(0)
    model = MultiViewDiT(sample_size=16, patch_size=4, hidden_size=32, num_layers=2, num_heads=2, mlp_ratio=2.0)
    with torch.no_grad():
        for p in [b.ada[1].weight for b in model.blocks]:
            p.normal_(0.0, 0.2)
    pipe = CorrlabPipeline(model)
    # close, near cameras so many token centres have a visible true match in the other views
    mvs = render_scene(0, views=3, size=32, layout="train", azimuth_gap_deg=(20.0, 30.0), distance_range=(2.2, 2.6))
    rec = probe_rendered(pipe, mvs, 0.4, layers=["blocks.1.attn"], seed=3, heads="mean")
    assert rec.layers == ["blocks.1.attn"] and rec.steps == [0]
    assert float(rec.ds["timestep"].values[0]) == pytest.approx(0.4)
    assert rec.prompt == mvs.prompt and rec.seed == 3 and int(rec.ds.sizes["head"]) == 1
    # exact: same computation twice (same seed)
    assert rec.equals(probe_rendered(pipe, mvs, 0.4, layers=["blocks.1.attn"], seed=3, heads="mean"))
    assert not rec.ds["confidence"].equals(
        probe_rendered(pipe, mvs, 0.4, layers=["blocks.1.attn"], seed=4, heads="mean").ds["confidence"])
    # the same options as a MatchingOptions object (as probe_generations takes them): the same record
    assert rec.equals(probe_rendered(pipe, mvs, 0.4, layers=["blocks.1.attn"], seed=3,
                                     matching=MatchingOptions(heads="mean")))
    df = pck_record(rec, mvs.depth, images=mvs.images, thresholds=(4, 8))
    assert {"native", "chance", "identity", "appearance"} == set(df["method"])
    assert (df["n_correct"] <= df["n_points"]).all() and df["n_points"].sum() > 100
    # every control and the native matcher without the confidence filter count the same visible tokens
    everything = pck_record(rec, mvs.depth, images=mvs.images, thresholds=(4, 8), kept_only=False)
    assert everything.groupby("method")["n_points"].sum().nunique() == 1
    # identity's error IS the true displacement: under 2 tokens (8 px) it is within 8 px, from 2 tokens on beyond 4 px
    ident = everything[everything.method == "identity"].groupby(["displacement", "threshold"])[["n_correct", "n_points"]].sum()
    assert ident.loc[("<2", 8.0), "n_correct"] == ident.loc[("<2", 8.0), "n_points"] > 0
    assert ident.loc[(">=2", 4.0), "n_correct"] == 0 and ident.loc[(">=2", 4.0), "n_points"] > 0
    with pytest.raises(ValueRangeError, match="t:"):
        probe_rendered(pipe, mvs, 1.5)
