"""Pure plotting functions behind corrlab's dashboards and notebooks.

Every function takes arrays / tidy tables and returns a :class:`matplotlib.figure.Figure` (built
without pyplot, so nothing global is touched and nothing is shown by side effect) or numbers;
:func:`figure_to_png` turns a figure into PNG bytes for an ``ipywidgets.Image``.

Conventions (see :mod:`corrlab.geometry`): images are ``(V, 3, H, W)`` float in [0, 1] (torch or
numpy); pixel ``(x, y)`` has the centre of the top-left pixel at ``(0, 0)``, so every image is drawn
with ``extent = (-0.5, W - 0.5, H - 0.5, -0.5)`` (row 0 at the top) and points / lines are drawn in
pixels unchanged. A token heat map ``(h, w)`` is stretched over the same extent, so token
``(row, col)`` covers pixels ``[row * p, (row + 1) * p)`` as in the model's layout.
Result tables are the tidy score tables of :mod:`corrlab.evaluation` (at least
:data:`corrlab.evaluation.KEY_COLUMNS`); every pooled number is pooled there (``pool_scores``), never here.
"""
from __future__ import annotations

import io
import textwrap
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from .errors import CorrlabError, ShapeError, ValueRangeError, check_finite, describe, is_positive_number
from .probing.layouts import layer_sort_key  # the one layer order (forward order), re-exported for the widgets

__all__ = [
    "as_image_array",
    "figure_to_png",
    "show_image",
    "draw_epipolar_line",
    "image_rows_figure",
    "correspondence_figure",
    "match_lines_figure",
    "pca_rgb",
    "pca_figure",
    "token_similarity",
    "layer_sort_key",
    "accuracy_grid",
    "accuracy_heatmap_figure",
    "precision_curves_figure",
    "comparison_figure",
    "metric_comparison_figure",
    "message_figure",
]

KEPT_COLOUR = "#1a9850"  # green
REJECTED_COLOUR = "#d73027"  # red
SOURCE_COLOUR = "#ffd700"  # gold
EPIPOLAR_COLOUR = "#00bfff"  # sky blue


# ---------------------------------------------------------------------------- basics
def as_image_array(name: str, images: Any) -> np.ndarray:
    """Validate ``(V, 3, H, W)`` (or one ``(3, H, W)``) images in [0, 1]; return ``(V, H, W, 3)`` float32.

    Raises:
        ShapeError: wrong rank or channel count. ValueRangeError: non-finite or outside [0, 1].
    """
    arr = images.detach().cpu().numpy() if hasattr(images, "detach") else np.asarray(images)
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4 or arr.shape[1] != 3 or min(arr.shape[2:]) < 1:
        raise ShapeError(f"{name}: expected images of shape (V, 3, H, W) or (3, H, W), got {describe(images)}")
    if not np.issubdtype(arr.dtype, np.floating):
        raise ShapeError(f"{name}: expected float images in [0, 1], got {describe(images)}")
    check_finite(name, arr)
    lo, hi = float(arr.min()), float(arr.max())
    if lo < -1e-4 or hi > 1 + 1e-4:
        raise ValueRangeError(f"{name}: expected values in [0, 1], got range [{lo:.4g}, {hi:.4g}]")
    return np.clip(arr, 0.0, 1.0).transpose(0, 2, 3, 1).astype(np.float32)


def figure_to_png(fig: Figure, dpi: int = 100) -> bytes:
    """Render ``fig`` to PNG bytes (starts with the PNG signature ``b"\\x89PNG"``)."""
    if not isinstance(fig, Figure):
        raise CorrlabError(f"fig: expected a matplotlib Figure, got {describe(fig)}")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def show_image(ax, image_hwc: np.ndarray, title: str | None = None) -> None:
    """Draw one ``(H, W, 3)`` image with corrlab's pixel extent (row 0 on top) and no ticks."""
    H, W = image_hwc.shape[:2]
    ax.imshow(image_hwc, extent=(-0.5, W - 0.5, H - 0.5, -0.5), interpolation="nearest")
    ax.set_xlim(-0.5, W - 0.5)
    ax.set_ylim(H - 0.5, -0.5)
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=9)


def draw_epipolar_line(ax, line: Sequence[float], width: int, height: int, **style) -> bool:
    """Draw line ``a x + b y + c = 0`` (pixels) clipped to a ``width x height`` image.

    Returns False (and draws nothing) for a degenerate or non-finite line or one that misses the image.
    """
    a, b, c = (float(v) for v in line)
    if not all(np.isfinite([a, b, c])) or (a == 0 and b == 0):
        return False
    x0, x1, y0, y1 = -0.5, width - 0.5, -0.5, height - 0.5
    pts = []
    if b != 0:
        for x in (x0, x1):
            y = -(a * x + c) / b
            if y0 - 1e-9 <= y <= y1 + 1e-9:
                pts.append((x, y))
    if a != 0:
        for y in (y0, y1):
            x = -(b * y + c) / a
            if x0 - 1e-9 <= x <= x1 + 1e-9:
                pts.append((x, y))
    if len(pts) < 2:
        return False
    # the two intersections farthest apart (corners can appear twice)
    pa, pb = max(((p, q) for p in pts for q in pts), key=lambda pq: (pq[0][0] - pq[1][0]) ** 2 + (pq[0][1] - pq[1][1]) ** 2)
    from matplotlib import patheffects

    style = {"color": EPIPOLAR_COLOUR, "lw": 1.6, "ls": "--",
             "path_effects": [patheffects.withStroke(linewidth=3.2, foreground="black")], **style}
    ax.plot([pa[0], pb[0]], [pa[1], pb[1]], **style)
    return True


def _title(fig: Figure, text: str, fontsize: float = 10) -> None:
    """Figure title wrapped to the figure's width (about 11 characters per inch at 10 pt)."""
    width = int(fig.get_figwidth() * 110 / fontsize)
    fig.suptitle(textwrap.fill(text, max(20, width)), fontsize=fontsize)


def message_figure(text: str, width: float = 6.0, height: float = 1.2) -> Figure:
    """A figure showing only ``text`` (for empty selections in dashboards)."""
    fig = Figure(figsize=(width, height))
    ax = fig.add_subplot()
    ax.axis("off")
    ax.text(0.5, 0.5, text, ha="center", va="center", wrap=True, fontsize=10)
    return fig


# ---------------------------------------------------------------------------- image rows
def image_rows_figure(rows: Mapping[str, Any], view_titles: Sequence[str] | None = None,
                      panel_size: float = 1.8) -> Figure:
    """One row of views per entry of ``rows`` (e.g. ``{"before": (V, 3, H, W), "after": ...}``).

    Rows may have different view counts; each row is labelled with its key on the left.
    """
    if not isinstance(rows, Mapping) or len(rows) == 0:
        raise CorrlabError(f"rows: expected a non-empty mapping label -> (V, 3, H, W) images, got {describe(rows)}")
    arrays = {str(k): as_image_array(f"rows[{k!r}]", v) for k, v in rows.items()}
    ncols = max(a.shape[0] for a in arrays.values())
    if view_titles is not None and len(view_titles) < ncols:
        raise CorrlabError(f"view_titles: expected at least {ncols} titles, got {len(view_titles)}")
    fig = Figure(figsize=(panel_size * ncols + 0.6, panel_size * len(arrays) + 0.3), layout="constrained")
    axes = np.atleast_2d(fig.subplots(len(arrays), ncols, squeeze=False))
    for r, (label, imgs) in enumerate(arrays.items()):
        for c in range(ncols):
            ax = axes[r, c]
            if c >= imgs.shape[0]:
                ax.axis("off")
                continue
            title = view_titles[c] if (view_titles is not None and r == 0) else (f"view {c}" if r == 0 else None)
            show_image(ax, imgs[c], title)
            if c == 0:
                ax.set_ylabel(textwrap.fill(label, 16), fontsize=9)
    return fig


# ---------------------------------------------------------------------------- correspondences
def _points(name: str, pts: Any, n: int | None = None) -> np.ndarray:
    arr = np.asarray(pts.detach().cpu().numpy() if hasattr(pts, "detach") else pts, dtype=np.float64)
    if arr.ndim == 1 and arr.shape == (2,):
        arr = arr[None]
    if arr.ndim != 2 or arr.shape[1] != 2 or (n is not None and arr.shape[0] != n):
        want = "(N, 2)" if n is None else f"({n}, 2)"
        raise ShapeError(f"{name}: expected pixel points of shape {want}, got {describe(pts)}")
    return arr


def correspondence_figure(
    images: Any,
    source: int,
    source_xy: Sequence[float],
    matches: Mapping[int, Any],
    kept: Mapping[int, Any] | None = None,
    heatmaps: Mapping[int, Any] | None = None,
    epipolar: Mapping[int, Sequence[float]] | None = None,
    title: str | None = None,
    panel_size: float = 2.4,
) -> Figure:
    """A source pixel on its image and its matches on every other image.

    Args:
        images: ``(V, 3, H, W)`` views in [0, 1].
        source: index of the source view.
        source_xy: ``(2,)`` source pixel (x, y).
        matches: ``{target view: (M, 2) matched pixels}`` (one per head, or one), NaN rows are skipped.
        kept: ``{target view: (M,) bool}`` (default: all kept). Kept matches are green dots, rejected red crosses.
        heatmaps: ``{target view: (h, w) similarity}`` drawn under the matches (token grid over the image).
        epipolar: ``{target view: (a, b, c)}`` epipolar line of the source pixel in that view (pixels).
        title: figure title.
    """
    imgs = as_image_array("images", images)
    V, H, W = imgs.shape[:3]
    if not (isinstance(source, (int, np.integer)) and 0 <= int(source) < V):
        raise CorrlabError(f"source: expected a view index in [0, {V - 1}], got {source!r}")
    sxy = _points("source_xy", source_xy, 1)[0]
    for t in matches:
        if not (0 <= int(t) < V) or int(t) == int(source):
            raise CorrlabError(f"matches: expected target views in [0, {V - 1}] other than source {source}, got {t!r}")
    fig = Figure(figsize=(panel_size * V, panel_size + 0.7), layout="constrained")
    axes = fig.subplots(1, V, squeeze=False)[0]
    for v in range(V):
        ax = axes[v]
        show_image(ax, imgs[v])
        if v == int(source):
            ax.plot([sxy[0]], [sxy[1]], marker="*", ms=14, mfc=SOURCE_COLOUR, mec="black", ls="none")
            ax.set_title(f"view {v} (source)", fontsize=9, fontweight="bold")
            continue
        ax.set_title(f"view {v}", fontsize=9)
        if heatmaps is not None and v in heatmaps:
            hm = np.asarray(heatmaps[v], dtype=np.float64)
            if hm.ndim != 2:
                raise ShapeError(f"heatmaps[{v}]: expected an (h, w) map, got {describe(heatmaps[v])}")
            ax.imshow(hm, extent=(-0.5, W - 0.5, H - 0.5, -0.5), cmap="magma", alpha=0.55, interpolation="nearest")
        if epipolar is not None and v in epipolar:
            draw_epipolar_line(ax, epipolar[v], W, H)
        if v in matches:
            pts = _points(f"matches[{v}]", matches[v])
            k = np.ones(len(pts), bool) if kept is None or v not in kept else np.asarray(kept[v], bool).reshape(-1)
            if k.shape[0] != pts.shape[0]:
                raise ShapeError(f"kept[{v}]: expected ({pts.shape[0]},) flags matching matches[{v}], got {describe(kept[v])}")
            ok = np.isfinite(pts).all(1)
            ax.plot(pts[ok & k, 0], pts[ok & k, 1], "o", ms=7, mfc=KEPT_COLOUR, mec="white", ls="none")
            ax.plot(pts[ok & ~k, 0], pts[ok & ~k, 1], "x", ms=8, mew=2, color=REJECTED_COLOUR, ls="none")
        ax.set_xlim(-0.5, W - 0.5)
        ax.set_ylim(H - 0.5, -0.5)
    if title:
        _title(fig, title)
    return fig


def match_lines_figure(
    image0: Any,
    image1: Any,
    pts0: Any,
    pts1: Any,
    kept: Any | None = None,
    correct: Any | None = None,
    title: str = "",
    max_lines: int = 120,
    seed: int = 0,
    panel_size: float = 2.6,
) -> Figure:
    """Two images side by side with lines joining matched pixels ``pts0[i] <-> pts1[i]``.

    Colours: with ``correct`` given (e.g. epipolar distance under a threshold) green = correct,
    red = wrong; otherwise green = kept, red = rejected (``kept``). Rejected matches are drawn thin and
    dashed. At most ``max_lines`` lines are drawn (a seeded random subset); the title gives the counts.
    """
    a = as_image_array("image0", image0)[0]
    b = as_image_array("image1", image1)[0]
    if a.shape != b.shape:
        raise ShapeError(f"image1: expected the shape of image0 {a.shape[:2]}, got {b.shape[:2]}")
    p0 = _points("pts0", pts0)
    p1 = _points("pts1", pts1, p0.shape[0])
    n = p0.shape[0]
    k = np.ones(n, bool) if kept is None else np.asarray(kept, bool).reshape(-1)
    if k.shape[0] != n:
        raise ShapeError(f"kept: expected ({n},) flags, got {describe(kept)}")
    good = k if correct is None else np.asarray(correct, bool).reshape(-1)
    if good.shape[0] != n:
        raise ShapeError(f"correct: expected ({n},) flags, got {describe(correct)}")
    H, W = a.shape[:2]
    canvas = np.concatenate([a, np.ones((H, max(1, W // 16), 3), np.float32), b], axis=1)
    offset = W + max(1, W // 16)
    fig = Figure(figsize=(2 * panel_size + 0.3, panel_size + 0.6), layout="constrained")
    ax = fig.add_subplot()
    show_image(ax, canvas)
    ok = np.isfinite(p0).all(1) & np.isfinite(p1).all(1)
    idx = np.flatnonzero(ok)
    if idx.size > max_lines:
        idx = np.sort(np.random.default_rng(seed).choice(idx, max_lines, replace=False))
    for i in idx:
        style = dict(color=KEPT_COLOUR if good[i] else REJECTED_COLOUR, lw=0.9 if k[i] else 0.5,
                     ls="-" if k[i] else ":", alpha=0.85)
        ax.plot([p0[i, 0], p1[i, 0] + offset], [p0[i, 1], p1[i, 1]], **style)
    ax.set_xlim(-0.5, canvas.shape[1] - 0.5)
    label = "correct" if correct is not None else "kept"
    counts = f"{int((good & ok & k).sum())} {label} / {int((ok & k).sum())} kept / {int(ok.sum())} matches"
    ax.set_title(textwrap.fill(f"{title}: {counts}" if title else counts, int(fig.get_figwidth() * 12)), fontsize=9)
    return fig


# ---------------------------------------------------------------------------- features
def pca_rgb(features: Any, n_components: int = 3, percentile: float = 1.0) -> np.ndarray:
    """Joint PCA of ``(V, h, w, C)`` token features across all views, mapped to RGB in [0, 1].

    One PCA (scikit-learn) is fitted on the tokens of every view together, so equal colours in two
    views mean similar features. Each component is scaled to [0, 1] between its ``percentile`` and
    ``100 - percentile`` percentiles and clipped. Returns ``(V, h, w, 3)`` float32 (missing components,
    when ``C < 3``, stay 0).
    """
    from sklearn.decomposition import PCA

    arr = np.asarray(features.detach().cpu().float().numpy() if hasattr(features, "detach") else features,
                     dtype=np.float64)
    if arr.ndim != 4 or arr.shape[-1] < 1 or arr.shape[0] * arr.shape[1] * arr.shape[2] < 2:
        raise ShapeError(f"features: expected (V, h, w, C) token features with at least 2 tokens, got {describe(features)}")
    check_finite("features", arr)
    V, h, w, C = arr.shape
    flat = arr.reshape(-1, C)
    k = int(min(n_components, 3, C, flat.shape[0]))
    comps = PCA(n_components=k, svd_solver="full", random_state=0).fit_transform(flat)
    lo = np.percentile(comps, percentile, axis=0)
    hi = np.percentile(comps, 100 - percentile, axis=0)
    scaled = np.clip((comps - lo) / np.where(hi - lo > 1e-12, hi - lo, 1.0), 0.0, 1.0)
    rgb = np.zeros((flat.shape[0], 3), np.float32)
    rgb[:, :k] = scaled
    return rgb.reshape(V, h, w, 3)


def pca_figure(images: Any, features: Any, title: str | None = None, panel_size: float = 1.8) -> Figure:
    """Views (top row) over the joint PCA-to-RGB of their ``(V, h, w, C)`` token features (bottom row)."""
    imgs = as_image_array("images", images)
    rgb = pca_rgb(features)
    if rgb.shape[0] != imgs.shape[0]:
        raise ShapeError(f"features: expected {imgs.shape[0]} views like images, got {describe(features)}")
    V, H, W = imgs.shape[:3]
    fig = Figure(figsize=(panel_size * V + 0.6, 2 * panel_size + 0.5), layout="constrained")
    axes = fig.subplots(2, V, squeeze=False)
    for v in range(V):
        show_image(axes[0, v], imgs[v], f"view {v}")
        axes[1, v].imshow(rgb[v], extent=(-0.5, W - 0.5, H - 0.5, -0.5), interpolation="nearest")
        axes[1, v].set_xticks([])
        axes[1, v].set_yticks([])
    axes[0, 0].set_ylabel("image", fontsize=10)
    axes[1, 0].set_ylabel("keys: joint PCA", fontsize=10)
    if title:
        _title(fig, title)
    return fig


def token_similarity(query: Any, keys: Any, scale: float | None = None) -> np.ndarray:
    """The matcher's head-averaged softmax similarity of one source token to every token of one target view.

    :func:`corrlab.probing.matcher.similarity_map` with ``heads="mean"`` over the given heads (one head:
    that head's softmax), computed in float64: ``softmax_l(mean_h(scale * q_h . k_{h,l}))``, whose argmax is
    the match a probe with ``heads="mean"`` records.

    Args:
        query: ``(heads, d)`` the source token's query (or ``(d,)`` for one head).
        keys: ``(heads, h, w, d)`` the target view's keys (or ``(h, w, d)``).
        scale: the layer's softmax scale (default ``1 / sqrt(d)``, attention's own).

    Returns:
        ``(h, w)`` float64 map summing to 1.
    """
    import torch

    from .probing.matcher import similarity_map

    q = torch.as_tensor(np.asarray(query.detach().cpu() if hasattr(query, "detach") else query), dtype=torch.float64)
    k = torch.as_tensor(np.asarray(keys.detach().cpu() if hasattr(keys, "detach") else keys), dtype=torch.float64)
    if q.ndim == 1:
        q = q[None]
    if k.ndim == 3:
        k = k[None]
    if q.ndim != 2 or k.ndim != 4 or k.shape[0] != q.shape[0] or k.shape[-1] != q.shape[-1]:
        raise ShapeError(f"query, keys: expected (heads, d) and (heads, h, w, d), got {describe(query)} and {describe(keys)}")
    heads, h, w, d = k.shape
    if scale is None:
        scale = 1.0 / float(np.sqrt(d))
    if not is_positive_number(scale):
        raise ValueRangeError(f"scale: expected a positive finite number, got {scale!r}")
    p = similarity_map(q[:, None], k.reshape(heads, 1, h * w, d), scale=float(scale), heads="mean")
    return p[0, 0, 0].reshape(h, w).numpy()


# ---------------------------------------------------------------------------- accuracy
def _check_table(name: str, table: Any, columns: Sequence[str] | None = None) -> pd.DataFrame:
    from .evaluation.schema import KEY_COLUMNS, check_table

    return check_table(name, table, KEY_COLUMNS if columns is None else columns)


def _nearest_threshold(table: pd.DataFrame, threshold: float) -> float:
    values = np.unique(table["threshold"].to_numpy(dtype=np.float64))
    if values.size == 0:
        raise CorrlabError("table: expected at least one row, got an empty table")
    best = float(values[np.argmin(np.abs(values - float(threshold)))])
    if abs(best - float(threshold)) > 1e-6 * max(1.0, abs(best)):
        raise CorrlabError(f"threshold: expected one of the scored thresholds {values.tolist()}, got {threshold!r}")
    return best


def accuracy_grid(table: pd.DataFrame, threshold: float, value: str = "precision",
                  method: str = "native") -> pd.DataFrame:
    """Layer x step grid of ``value`` at ``threshold`` for ``method`` (rows naturally sorted layers).

    ``table`` is a score table (:data:`corrlab.evaluation.KEY_COLUMNS`, one row per view pair / set and
    cell); each (layer, step) is pooled by :func:`corrlab.evaluation.pool_scores` (precision NaN without
    matches, counts summed).
    """
    from .evaluation import pool_scores

    _check_table("table", table)
    if value not in ("precision", "n_correct", "n_matches"):
        raise CorrlabError(f"value: expected 'precision', 'n_correct' or 'n_matches', got {value!r}")
    sub = table[table["method"] == method]
    if sub.empty:
        raise CorrlabError(f"method: expected one of {sorted(table['method'].unique())}, got {method!r}")
    thr = _nearest_threshold(sub, threshold)
    sub = sub[np.isclose(sub["threshold"].astype(float), thr)]
    pooled = pool_scores(sub.assign(step=sub["step"].astype(np.int64), layer=sub["layer"].astype(str)), ("layer", "step"))
    grid = pooled.assign(step=pooled["step"].astype(np.int64)).pivot(index="layer", columns="step", values=value).astype(float)
    grid = grid.reindex(sorted(grid.index, key=layer_sort_key))
    grid.columns.name = "step"
    return grid.reindex(columns=sorted(grid.columns))


def accuracy_heatmap_figure(table: pd.DataFrame, threshold: float, value: str = "precision",
                            method: str = "native", selected: tuple[Any, Any] | None = None) -> Figure:
    """Heat map of :func:`accuracy_grid` (layers down, steps across), cells annotated.

    ``selected = (layer, step)`` outlines that cell.
    """
    import seaborn as sns

    grid = accuracy_grid(table, threshold, value, method)
    n_rows, n_cols = grid.shape
    fig = Figure(figsize=(min(14.0, max(4.5, 0.6 * n_cols + 2.8)), min(10.0, max(2.6, 0.42 * n_rows + 1.4))),
                 layout="constrained")
    ax = fig.add_subplot()
    is_precision = value == "precision"
    sns.heatmap(grid, ax=ax, annot=n_cols <= 16 and n_rows <= 24, fmt=".2f" if is_precision else ".0f",
                cmap="viridis", vmin=0.0 if is_precision else None, vmax=1.0 if is_precision else None,
                cbar_kws={"label": value}, annot_kws={"fontsize": 8}, linewidths=0.5, linecolor="white")
    ax.set_xlabel("step")
    ax.set_ylabel("layer")
    ax.set_title(f"{method}: {value} at {threshold:g} px", fontsize=10)
    ax.tick_params(axis="y", labelrotation=0, labelsize=8)
    ax.tick_params(axis="x", labelrotation=0, labelsize=8)
    if selected is not None:
        layer, step = selected
        if layer in grid.index and step in grid.columns:
            from matplotlib.patches import Rectangle

            r, c = list(grid.index).index(layer), list(grid.columns).index(step)
            ax.add_patch(Rectangle((c, r), 1, 1, fill=False, edgecolor="red", lw=2.5))
    return fig


#: Line style of each kind of curve: measured native numbers solid, in-sample (optimistic) ones dotted,
#: baselines and controls dashed.
CURVE_STYLES = {"native": "-", "optimistic": ":", "baseline": "--"}


def _curves_figure(curves: Sequence[tuple[str, str, pd.DataFrame]], per: str, unavailable: Sequence[str],
                   title: str | None) -> Figure:
    """Precision and correct matches ``per`` unit vs threshold: one line per ``(label, style kind, pooled
    rows with threshold, precision and the count column "per_unit")``."""
    fig = Figure(figsize=(11, 4), layout="constrained")
    ax_p, ax_n = fig.subplots(1, 2)
    from matplotlib import rcParams

    colours = [c["color"] for c in rcParams["axes.prop_cycle"]]
    handles = []
    for k, (label, kind, rows) in enumerate(curves):
        rows = rows.sort_values("threshold")
        style = dict(color=colours[k % len(colours)], ls=CURVE_STYLES[kind], marker="o", ms=4, lw=1.6)
        (h,) = ax_p.plot(rows["threshold"].astype(float), rows["precision"].astype(float), label=label, **style)
        ax_n.plot(rows["threshold"].astype(float), rows["per_unit"].astype(float), **style)
        handles.append(h)
    ax_p.set(xlabel="epipolar threshold (px)", ylabel="precision", ylim=(0, 1.02))
    ax_n.set(xlabel="epipolar threshold (px)", ylabel=f"correct matches per {per}")
    for ax in (ax_p, ax_n):
        ax.grid(alpha=0.3)
    if handles:
        fig.legend(handles, [h.get_label() for h in handles], loc="outside right upper", fontsize=8, frameon=False)
    if unavailable:
        fig.supxlabel(f"no scores (unavailable or no matches): {', '.join(map(str, unavailable))}",
                      fontsize=8, color="dimgray")
    if title:
        _title(fig, title)
    return fig


def precision_curves_figure(table: pd.DataFrame, native: Sequence[tuple[Any, Any]] = (),
                            title: str | None = None, curves: Mapping[str, Any] | None = None) -> Figure:
    """Pooled precision and correct matches per view pair vs threshold: native curves and every baseline.

    Args:
        table: score table (:data:`corrlab.evaluation.KEY_COLUMNS`, per-pair rows); rows with
            ``method != "native"`` are baselines / controls (their layer/step are ignored), drawn dashed.
        native: ``(layer, step)`` cells of the native method to draw, labelled ``native LAYER @ step STEP``.
        curves: more native curves, ``{label: per-pair rows}`` (e.g. held-out rows from
            :func:`corrlab.evaluation.held_out_scores`); a label containing "optimistic" is drawn dotted.

    Every curve is pooled over its rows by :func:`corrlab.evaluation.pool_scores`.
    """
    from .evaluation import pool_scores

    _check_table("table", table)
    parts: list[tuple[str, str, pd.DataFrame]] = []

    def add(label: str, kind: str, rows: pd.DataFrame, by=("threshold",)) -> None:
        pooled = pool_scores(rows, by)
        parts.append((label, kind, pooled.assign(per_unit=pooled["n_correct"] / pooled["n_pairs"])))

    nat = table[table["method"] == "native"]
    for layer, step in native:
        cell = nat[(nat["layer"] == layer) & (nat["step"] == step)]
        if cell.empty:
            raise CorrlabError(f"native: expected (layer, step) cells present in the table, got ({layer!r}, {step!r})")
        add(f"native {layer} @ step {step}", "native", cell)
    for label, rows in (curves or {}).items():
        _check_table(f"curves[{label!r}]", rows)
        if len(rows):
            add(str(label), "optimistic" if "optimistic" in str(label) else "native", rows)
    base = table[table["method"] != "native"]
    unavailable = []
    if not base.empty:
        pooled = pool_scores(base, ("method", "threshold"))
        has = pooled.groupby("method", sort=False)["n_matches"].sum() > 0
        unavailable = sorted(str(m) for m in has.index[~has.values])
        for method in has.index[has.values]:
            add(str(method), "baseline", base[base["method"] == method])
    if not parts:
        raise CorrlabError("table, native: expected baseline rows or at least one native (layer, step), got neither")
    return _curves_figure(parts, "view pair", unavailable, title)


def comparison_figure(table: pd.DataFrame, title: str | None = None) -> Figure:
    """Precision and correct matches per generated set vs epipolar threshold, one line per method.

    ``table`` is :func:`corrlab.evaluation.comparison_table`'s (already pooled; nothing is pooled here).
    ``native-held-out`` is drawn solid, ``native-best-in-sample`` dotted and labelled optimistic, controls
    and baselines dashed; methods without matches (unavailable baselines) are named under the plot.
    """
    _check_table("table", table, ("method", "layer", "step", "threshold", "precision", "n_correct", "n_matches", "n_sets"))
    has = table.groupby("method", sort=False)["n_matches"].sum() > 0
    missing = [str(m) for m in has.index[~has.values]]
    parts = []
    for method in has.index[has.values]:
        rows = table[table["method"] == method]
        lay, st = rows["layer"].iloc[0], rows["step"].iloc[0]
        cell = f"{lay} @ step {st}" if isinstance(lay, str) else None
        kind = "native" if str(method).startswith("native") else "baseline"
        if method == "native-held-out":
            label = f"native, held out ({cell})" if cell else "native, held out (cell chosen per fold)"
        elif method == "native-best-in-sample":
            label, kind = f"native best, optimistic (in-sample) ({cell})", "optimistic"
        else:
            label = f"{method} ({cell})" if cell else str(method)
        parts.append((label, kind, rows.assign(per_unit=rows["n_correct"] / rows["n_sets"])))
    return _curves_figure(parts, "generated set", missing, title)


def metric_comparison_figure(table: pd.DataFrame, x: str = "metric", y: str = "value", hue: str = "condition",
                             title: str | None = None) -> Figure:
    """Bar plot (mean with 95 % CI over rows) of a tidy metrics table, e.g. consistency with / without
    an intervention: columns ``metric, value, condition`` (one row per seed and metric)."""
    import seaborn as sns

    _check_table("table", table, (x, y, hue))
    if table.empty:
        raise CorrlabError("table: expected at least one row, got an empty table")
    width = max(4.5, 1.6 * table[x].nunique() + 2.5)
    fig = Figure(figsize=(width, 3.4), layout="constrained")
    ax = fig.add_subplot()
    sns.barplot(data=table, x=x, y=y, hue=hue, errorbar=("ci", 95), n_boot=300, seed=0, ax=ax)
    values = pd.to_numeric(table[y], errors="coerce")
    if values.isna().all() or (values.min() >= 0 and values.max() <= 1):
        ax.set_ylim(0, 1.05)
    for i, (_, group) in enumerate(table.groupby(x, sort=False)):
        if pd.to_numeric(group[y], errors="coerce").isna().all():
            ax.text(i, 0.02, "n/a (no data)", ha="center", va="bottom", fontsize=8, color="dimgray")
    ax.set_xlabel("")
    ax.set_ylabel(y)
    ax.grid(axis="y", alpha=0.3)
    leg = ax.get_legend()
    if leg is not None:
        leg.set_title(hue)
    if title:
        ax.set_title(textwrap.fill(title, int(width * 11)), fontsize=9)
    return fig
