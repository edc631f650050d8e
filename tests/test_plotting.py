"""corrlab.plotting: pure figure functions, checked on their rendered pixels and artists."""
from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from corrlab import plotting as P
from corrlab.errors import CorrlabError, ShapeError, ValueRangeError


def render(fig: Figure) -> np.ndarray:
    """RGB uint8 pixels of a figure (H, W, 3)."""
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def axes_overlap(fig: Figure) -> list[tuple[int, int]]:
    """Pairs of visible axes whose drawn extents (tick labels and titles included) intersect."""
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    boxes = [ax.get_tightbbox(renderer) for ax in fig.axes if ax.get_visible() and ax.axison and ax.get_label() != "<colorbar>"]
    bad = []
    for (i, a), (j, b) in itertools.combinations(enumerate(boxes), 2):
        w = min(a.x1, b.x1) - max(a.x0, b.x0)
        h = min(a.y1, b.y1) - max(a.y0, b.y0)
        if w > 1 and h > 1:  # more than a pixel of shared area
            bad.append((i, j))
    return bad


def oriented_views(V: int = 2, H: int = 16, W: int = 16) -> torch.Tensor:
    """Views whose top half is red and bottom half blue, with a green left column: orientation markers."""
    img = torch.zeros(V, 3, H, W)
    img[:, 0, : H // 2] = 1.0
    img[:, 2, H // 2 :] = 1.0
    img[:, :, :, :2] = torch.tensor([0.0, 1.0, 0.0])[:, None, None]
    return img


def score_table(seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for layer, step, thr in itertools.product(["blocks.2.attn", "blocks.10.attn"], [0, 5], [1.0, 2.0, 5.0]):
        for pair in range(2):
            n = 40
            rows.append(dict(method="native", layer=layer, step=step, threshold=thr, src=pair, tgt=pair + 1,
                             n_matches=n, n_correct=int(rng.integers(0, n + 1)), precision=np.nan))
    for method, thr, pair in itertools.product(["sift", "identity"], [1.0, 2.0, 5.0], range(2)):
        rows.append(dict(method=method, layer=None, step=None, threshold=thr, src=pair, tgt=pair + 1,
                         n_matches=30, n_correct=int(rng.integers(0, 31)), precision=np.nan))
    df = pd.DataFrame(rows)
    df["precision"] = df["n_correct"] / df["n_matches"]
    return df


# ---------------------------------------------------------------------------- basics
def test_figure_to_png_gives_png_bytes_and_rejects_non_figures():
    fig = Figure(figsize=(1, 1))
    fig.add_subplot().plot([0, 1], [0, 1])
    png = P.figure_to_png(fig)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(CorrlabError, match="fig"):
        P.figure_to_png("not a figure")


def test_as_image_array_layout_and_errors():
    imgs = oriented_views(V=3, H=8, W=6)
    arr = P.as_image_array("images", imgs)
    assert arr.shape == (3, 8, 6, 3)
    # exact: as_image_array only moves the input values (no arithmetic)
    assert tuple(arr[0, 0, 5]) == (1.0, 0.0, 0.0)  # top right red
    assert tuple(arr[0, 7, 5]) == (0.0, 0.0, 1.0)  # bottom right blue
    assert P.as_image_array("one", imgs[0]).shape == (1, 8, 6, 3)
    with pytest.raises(ShapeError, match="images"):
        P.as_image_array("images", torch.zeros(2, 4, 8, 8))
    with pytest.raises(ValueRangeError, match=r"\[0, 1\]"):
        P.as_image_array("images", torch.full((1, 3, 4, 4), 2.0))
    with pytest.raises(ShapeError, match="float"):
        P.as_image_array("images", np.zeros((1, 3, 4, 4), dtype=np.uint8))


def test_images_are_drawn_the_right_way_round():
    """Top of the image (row 0, red) is drawn above the bottom (blue); column 0 (green) on the left."""
    fig = P.image_rows_figure({"a": oriented_views(V=1, H=32, W=32)})
    px = render(fig)
    red = (px[..., 0] > 200) & (px[..., 1] < 60) & (px[..., 2] < 60)
    blue = (px[..., 2] > 200) & (px[..., 0] < 60) & (px[..., 1] < 60)
    green = (px[..., 1] > 200) & (px[..., 0] < 60) & (px[..., 2] < 60)
    ys_red, xs_red = np.nonzero(red)
    ys_blue, _ = np.nonzero(blue)
    _, xs_green = np.nonzero(green)
    assert ys_red.size > 100 and ys_blue.size > 100 and xs_green.size > 10
    assert ys_red.mean() < ys_blue.mean()
    assert xs_green.mean() < xs_red.mean()


def test_draw_epipolar_line_clips_to_the_image():
    fig = Figure()
    ax = fig.add_subplot()
    # the end points are computed (line / border intersections): compared up to float64 rounding
    assert P.draw_epipolar_line(ax, (0.0, 1.0, -5.0), width=20, height=10)  # y = 5
    xs, ys = ax.lines[-1].get_data()
    assert sorted(xs) == pytest.approx([-0.5, 19.5], abs=1e-12) and list(ys) == pytest.approx([5.0, 5.0], abs=1e-12)
    assert P.draw_epipolar_line(ax, (1.0, -1.0, 0.0), width=10, height=10)  # y = x: corner to corner
    xs, ys = ax.lines[-1].get_data()
    assert sorted(xs) == pytest.approx([-0.5, 9.5], abs=1e-12) and sorted(ys) == pytest.approx([-0.5, 9.5], abs=1e-12)
    n = len(ax.lines)
    assert not P.draw_epipolar_line(ax, (0.0, 0.0, 1.0), 10, 10)  # degenerate
    assert not P.draw_epipolar_line(ax, (0.0, 1.0, -50.0), 10, 10)  # y = 50 misses the image
    assert not P.draw_epipolar_line(ax, (np.nan, 1.0, 0.0), 10, 10)
    assert len(ax.lines) == n


# ---------------------------------------------------------------------------- correspondences
def test_correspondence_figure_marks_kept_and_rejected_matches():
    imgs = torch.rand(3, 3, 16, 16)
    matches = {1: np.array([[2.0, 3.0], [5.0, 5.0], [np.nan, np.nan]]), 2: np.array([[8.0, 8.0]])}
    kept = {1: np.array([True, False, False]), 2: np.array([True])}
    fig = P.correspondence_figure(imgs, 0, (4.0, 4.0), matches, kept,
                                  heatmaps={1: np.ones((4, 4)), 2: np.eye(4)}, epipolar={1: (0.0, 1.0, -3.0)})
    ax0, ax1, ax2 = fig.axes
    src = [l for l in ax0.lines if l.get_marker() == "*"]
    assert len(src) == 1 and tuple(src[0].get_xydata()[0]) == (4.0, 4.0)  # exact: the given point, drawn as is
    kept_pts = [l.get_xydata() for l in ax1.lines if l.get_marker() == "o"][0]
    rejected = [l.get_xydata() for l in ax1.lines if l.get_marker() == "x"][0]
    # exact: the given points, drawn as is (no arithmetic); the NaN row is skipped
    assert kept_pts.tolist() == [[2.0, 3.0]] and rejected.tolist() == [[5.0, 5.0]]
    assert any(l.get_linestyle() == "--" for l in ax1.lines)  # the epipolar line
    assert len(ax1.images) == 2 and len(ax2.images) == 2  # view + heat map
    assert ax1.get_ylim() == pytest.approx((15.5, -0.5), abs=1e-12)  # row 0 on top (limits computed from H)
    assert axes_overlap(fig) == []


def test_correspondence_figure_rejects_bad_selections():
    imgs = torch.rand(2, 3, 8, 8)
    with pytest.raises(CorrlabError, match="source"):
        P.correspondence_figure(imgs, 2, (1.0, 1.0), {})
    with pytest.raises(CorrlabError, match="other than source"):
        P.correspondence_figure(imgs, 0, (1.0, 1.0), {0: np.zeros((1, 2))})
    with pytest.raises(ShapeError, match="kept"):
        P.correspondence_figure(imgs, 0, (1.0, 1.0), {1: np.zeros((2, 2))}, kept={1: np.ones(3, bool)})
    with pytest.raises(ShapeError, match="source_xy"):
        P.correspondence_figure(imgs, 0, (1.0, 1.0, 2.0), {})


def test_match_lines_figure_counts_and_colours():
    a, b = torch.rand(3, 10, 12), torch.rand(3, 10, 12)
    p0 = np.array([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0], [4.0, np.nan]])
    p1 = p0 + 1.0
    fig = P.match_lines_figure(a, b, p0, p1, kept=[True, True, False, True], correct=[True, False, False, True])
    ax = fig.axes[0]
    assert ax.get_title() == "1 correct / 2 kept / 3 matches"
    assert len(ax.lines) == 3  # the NaN match is not drawn
    colours = [l.get_color() for l in ax.lines]
    assert colours.count(P.KEPT_COLOUR) == 1 and colours.count(P.REJECTED_COLOUR) == 2
    # p1 drawn in the right image, after a 1 px gap (a computed offset: float64 rounding tolerance)
    assert ax.lines[0].get_xdata()[1] == pytest.approx(2.0 + 12 + 1, abs=1e-12)
    many = np.random.default_rng(0).uniform(0, 9, size=(500, 2))
    fig = P.match_lines_figure(a, b, many, many, max_lines=50)
    assert len(fig.axes[0].lines) == 50
    with pytest.raises(ShapeError, match="pts1"):
        P.match_lines_figure(a, b, p0, p1[:2])
    with pytest.raises(ShapeError, match="image1"):
        P.match_lines_figure(a, torch.rand(3, 8, 8), p0, p1)


# ---------------------------------------------------------------------------- features
def test_pca_rgb_is_joint_across_views():
    g = torch.Generator().manual_seed(0)
    view = torch.randn(4, 5, 16, generator=g)
    feats = torch.stack([view, view, torch.randn(4, 5, 16, generator=g)])
    rgb = P.pca_rgb(feats)
    assert rgb.shape == (3, 4, 5, 3) and rgb.dtype == np.float32
    assert rgb.min() >= 0.0 and rgb.max() <= 1.0
    # Equal features, equal colours in both views. Views 0 and 1 are different rows of one float64 PCA, and
    # BLAS may round rows differently (~1e-16); the result is then rounded once to float32, which can move
    # a value in [0, 1] by at most one float32 ulp (<= 2^-24). atol = float32 eps (2^-23) covers both.
    np.testing.assert_allclose(rgb[0], rgb[1], rtol=0, atol=np.finfo(np.float32).eps)
    assert not np.allclose(rgb[0], rgb[2])
    with pytest.raises(ShapeError, match="features"):
        P.pca_rgb(torch.zeros(4, 5, 16))


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 3), st.integers(1, 4), st.integers(1, 6), st.integers(0, 10_000))
def test_pca_rgb_range_and_shape_property(V, h, C, seed):
    feats = np.random.default_rng(seed).normal(size=(V, h, 3, C))
    rgb = P.pca_rgb(feats)
    assert rgb.shape == (V, h, 3, 3)
    assert np.isfinite(rgb).all() and rgb.min() >= 0.0 and rgb.max() <= 1.0
    if C < 3:
        assert np.all(rgb[..., C:] == 0)  # exact: missing components are never written (zeros by construction)


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 3), st.integers(1, 4), st.integers(1, 4), st.integers(1, 8), st.integers(0, 10_000))
def test_token_similarity_is_the_matchers_head_mean_softmax(heads, h, w, d, seed):
    from corrlab.probing.matcher import match_views, similarity_map

    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(heads, d, generator=g), torch.randn(heads, h, w, d, generator=g)
    sim = P.token_similarity(q, k)
    # the definition written out in float64: softmax over the target's tokens of the head-averaged logits
    logits = torch.einsum("nd,nhwd->nhw", q.double(), k.double()).reshape(heads, -1).mean(0) / d**0.5
    ref = torch.softmax(logits, dim=0).reshape(h, w)
    # float64 both ways, summed in different orders: a few ulps of values <= 1
    np.testing.assert_allclose(sim, ref.numpy(), rtol=1e-10, atol=1e-14)
    assert sim.sum() == pytest.approx(1.0, abs=1e-12)
    # the matcher's own function on the float32 tensors: float32 rounding of logits of size <~ 10 (|d| <= 8)
    # moves probabilities by < 1e-5 relative
    mine = similarity_map(q[:, None], k.reshape(heads, 1, h * w, d), scale=d**-0.5, heads="mean")
    np.testing.assert_allclose(sim, mine[0, 0, 0].reshape(h, w).double().numpy(), rtol=1e-5, atol=1e-6)
    # and its argmax is the match a heads="mean" matcher picks (unless two tokens tie within float32 rounding)
    m = match_views(q[:, None], k.reshape(heads, 1, h * w, d), (h, w), scale=d**-0.5, heads="mean")
    top = np.sort(sim.reshape(-1))[::-1]
    if top.size == 1 or top[0] - top[1] > 1e-5:
        assert int(m.index[0, 0, 0]) == int(sim.argmax())


def test_token_similarity_peaks_at_the_matching_key():
    k = torch.zeros(1, 3, 4, 8)
    q = torch.zeros(1, 8)
    q[0, 2] = 10.0
    k[0, 2, 1, 2] = 10.0
    sim = P.token_similarity(q, k)
    assert np.unravel_index(sim.argmax(), sim.shape) == (2, 1)
    assert P.token_similarity(q, k, scale=0.5)[2, 1] > sim[2, 1]  # a larger scale sharpens the softmax
    with pytest.raises(ShapeError, match="query, keys"):
        P.token_similarity(torch.zeros(2, 8), k)
    with pytest.raises(ValueRangeError, match="scale"):
        P.token_similarity(q, k, scale=0.0)


def test_pca_figure_stacks_images_over_features():
    fig = P.pca_figure(torch.rand(2, 3, 16, 16), torch.randn(2, 4, 4, 6), title="keys")
    assert len(fig.axes) == 4
    assert fig.axes[0].get_ylabel() == "image" and fig.axes[2].get_ylabel() == "keys: joint PCA"
    assert axes_overlap(fig) == []
    with pytest.raises(ShapeError, match="features"):
        P.pca_figure(torch.rand(2, 3, 16, 16), torch.randn(3, 4, 4, 6))


# ---------------------------------------------------------------------------- accuracy
def test_layer_sort_key_is_natural():
    names = ["blocks.10.attn", "blocks.2.attn", "blocks.1.attn", "down.0"]
    assert sorted(names, key=P.layer_sort_key) == ["blocks.1.attn", "blocks.2.attn", "blocks.10.attn", "down.0"]


def test_accuracy_grid_pools_pairs():
    df = score_table()
    grid = P.accuracy_grid(df, 2.0)
    assert list(grid.index) == ["blocks.2.attn", "blocks.10.attn"]
    assert list(grid.columns) == [0, 5]
    cell = df[(df.method == "native") & (df.layer == "blocks.10.attn") & (df.step == 5) & (df.threshold == 2.0)]
    assert grid.loc["blocks.10.attn", 5] == pytest.approx(cell.n_correct.sum() / cell.n_matches.sum())
    counts = P.accuracy_grid(df, 2.0, "n_correct")
    assert counts.loc["blocks.10.attn", 5] == cell.n_correct.sum()


def test_accuracy_grid_rejects_bad_requests():
    df = score_table()
    with pytest.raises(CorrlabError, match="threshold"):
        P.accuracy_grid(df, 3.0)
    with pytest.raises(CorrlabError, match="method"):
        P.accuracy_grid(df, 2.0, method="superglue")
    with pytest.raises(CorrlabError, match="value"):
        P.accuracy_grid(df, 2.0, value="recall")
    with pytest.raises(CorrlabError, match="missing"):
        P.accuracy_grid(df.drop(columns="n_matches"), 2.0)


def test_accuracy_heatmap_outlines_the_selected_cell():
    from matplotlib.patches import Rectangle

    fig = P.accuracy_heatmap_figure(score_table(), 2.0, selected=("blocks.10.attn", 0))
    ax = fig.axes[0]
    rects = [p for p in ax.patches if isinstance(p, Rectangle) and p.get_edgecolor()[:3] == (1.0, 0.0, 0.0)]
    assert len(rects) == 1 and rects[0].get_xy() == (0, 1)  # column of step 0, row of blocks.10
    assert ax.get_xlabel() == "step" and ax.get_ylabel() == "layer"
    assert [t.get_text() for t in ax.get_yticklabels()] == ["blocks.2.attn", "blocks.10.attn"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0", "5"]
    assert axes_overlap(fig) == []


def test_precision_curves_draw_native_cells_and_baselines():
    df = score_table()
    fig = P.precision_curves_figure(df, native=[("blocks.2.attn", 5)])
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels == ["native blocks.2.attn @ step 5", "sift", "identity"]
    ax_p, ax_n = fig.axes[:2]
    assert ax_p.get_ylabel() == "precision" and "correct" in ax_n.get_ylabel()
    assert axes_overlap(fig) == []
    with pytest.raises(CorrlabError, match="native"):
        P.precision_curves_figure(df, native=[("blocks.3.attn", 0)])


def test_precision_curves_name_unavailable_baselines():
    df = score_table()
    missing = df[df.method == "sift"].assign(method="superpoint", precision=np.nan, n_correct=0, n_matches=0)
    fig = P.precision_curves_figure(pd.concat([df, missing]), native=[("blocks.2.attn", 0)])
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert "superpoint" not in labels
    assert "superpoint" in fig._supxlabel.get_text()


def test_metric_comparison_figure_marks_missing_values():
    table = pd.DataFrame({"metric": ["a", "a", "b", "b"], "value": [0.5, 0.7, np.nan, np.nan],
                          "condition": ["plain", "adapter", "plain", "adapter"]})
    fig = P.metric_comparison_figure(table, title="consistency")
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.texts] == ["n/a (no data)"]
    assert ax.get_ylim() == (0.0, 1.05)  # exact: the literal limits the figure sets
    with pytest.raises(CorrlabError, match="columns"):
        P.metric_comparison_figure(table.drop(columns="condition"))


def test_image_rows_figure_labels_rows_and_checks_titles():
    fig = P.image_rows_figure({"plain": torch.rand(3, 3, 8, 8), "CorrAdapter eta=0.1 r=3": torch.rand(2, 3, 8, 8)})
    axes = fig.axes
    assert axes[0].get_ylabel() == "plain" and "CorrAdapter" in axes[3].get_ylabel()
    assert not axes[5].axison  # the second row has one view fewer
    assert axes_overlap(fig) == []
    with pytest.raises(CorrlabError, match="rows"):
        P.image_rows_figure({})
    with pytest.raises(CorrlabError, match="view_titles"):
        P.image_rows_figure({"a": torch.rand(3, 3, 8, 8)}, view_titles=["x"])


@settings(max_examples=40, deadline=None)
@given(st.floats(-1, 1), st.floats(-1, 1), st.floats(-30, 30), st.integers(4, 40), st.integers(4, 40))
def test_drawn_epipolar_segments_lie_on_the_line_and_the_image_border(a, b, c, width, height):
    fig = Figure()
    ax = fig.add_subplot()
    drawn = P.draw_epipolar_line(ax, (a, b, c), width, height)
    if not drawn:
        return
    xs, ys = ax.lines[-1].get_data()
    for x, y in zip(xs, ys):
        assert abs(a * x + b * y + c) <= 1e-6 * max(1.0, abs(c))  # on the line
        on_border = min(abs(x + 0.5), abs(x - width + 0.5), abs(y + 0.5), abs(y - height + 0.5)) < 1e-6
        assert on_border and -0.5 - 1e-6 <= x <= width - 0.5 + 1e-6 and -0.5 - 1e-6 <= y <= height - 0.5 + 1e-6
