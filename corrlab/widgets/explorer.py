"""Correspondence explorer: pick layer, step, head, source view and token; see its matches everywhere.

A thin ipywidgets 8 dashboard over :mod:`corrlab.plotting`. It reads a probing record (an xarray
Dataset with dims ``(layer, step, src, tgt, head, row, col)`` and variables ``match_x``, ``match_y``,
``confidence``, ``kept``), the generated views and their cameras, and optionally an attention cache
(:func:`corrlab.probing.cache_attention`: the layers' q and k read off the taps, for every model family
the taps support) for heat maps and the PCA view.
Every figure is an ``ipywidgets.Image`` holding PNG bytes, so the state can be checked without a kernel.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import ipywidgets as widgets
import numpy as np

from ..errors import CorrlabError, describe
from ..geometry.tokens import token_centres
from ..plotting import (
    correspondence_figure,
    figure_to_png,
    layer_sort_key,
    match_lines_figure,
    message_figure,
    pca_figure,
    token_similarity,
)
from .common import figure_image, guarded, set_figure, show_message

__all__ = ["CorrespondenceExplorer", "RECORD_DIMS", "RECORD_VARIABLES", "check_record"]

RECORD_DIMS = ("layer", "step", "src", "tgt", "head", "row", "col")
RECORD_VARIABLES = ("match_x", "match_y", "kept")


def check_record(record: Any):
    """The record's xarray Dataset; raise :class:`CorrlabError` unless ``record`` is a probing record
    (a :class:`corrlab.probing.ProbeRecord` or its Dataset, with :data:`RECORD_DIMS` and
    :data:`RECORD_VARIABLES`)."""
    ds = getattr(record, "ds", record)
    dims = getattr(ds, "dims", None)
    if dims is None or not hasattr(ds, "data_vars"):
        raise CorrlabError(f"record: expected a probing record (ProbeRecord or xarray Dataset), got {describe(record)}")
    missing_dims = [d for d in RECORD_DIMS if d not in dims]
    missing_vars = [v for v in RECORD_VARIABLES if v not in ds.data_vars]
    if missing_dims or missing_vars:
        raise CorrlabError(
            f"record: expected dims {list(RECORD_DIMS)} and variables {list(RECORD_VARIABLES)}, "
            f"missing dims {missing_dims} and variables {missing_vars}"
        )
    return ds


def _views_and_cameras(views: Any, cameras: Any):
    images = getattr(views, "images", views)
    if cameras is None:
        cameras = getattr(views, "cameras", None)
    if not hasattr(images, "shape") or len(images.shape) != 4 or images.shape[1] != 3:
        raise CorrlabError(f"views: expected a MultiViewSet or (V, 3, H, W) images, got {describe(views)}")
    if cameras is not None and len(cameras) != images.shape[0]:
        raise CorrlabError(f"cameras: expected {images.shape[0]} cameras (one per view), got {len(cameras)}")
    return images, (list(cameras) if cameras is not None else None)


class CorrespondenceExplorer:
    """Explore one probed generation.

    Args:
        record: probing record (:class:`corrlab.probing.ProbeRecord` or its Dataset, see :func:`check_record`).
        views: the generated ``MultiViewSet`` (images and cameras) or ``(V, 3, H, W)`` images.
        cameras: cameras of the views (default: ``views.cameras``, else the record's); enable epipolar
            lines and the correct / wrong colouring.
        features: an :class:`~corrlab.probing.AttentionCache` of the same generation
            (:func:`corrlab.probing.cache_attention`) for the similarity heat maps (the matcher's softmax:
            :func:`corrlab.plotting.token_similarity`) and the PCA view.
        matchers: ``{name: matcher(img0, img1) -> Matches}`` baselines (default: every matcher of
            :mod:`corrlab.baselines` whose weights are installed: SIFT, DISK+LightGlue, SuperPoint; the first
            is selected, the others run when picked).
        threshold: epipolar threshold (px) that colours matches correct / wrong.
        distance: epipolar distance kind (``"symmetric"``, ``"line"``, ``"sampson"``).

    Attributes: the controls ``layer, step, head, source, row, col, target, matcher, threshold``; the
    figures ``correspondence, pair, baseline, pca`` (``ipywidgets.Image``); ``message`` (HTML);
    ``widget`` (the whole dashboard).
    """

    def __init__(self, record, views, cameras=None, features=None,
                 matchers: Mapping[str, Callable] | None = None, threshold: float = 2.0,
                 distance: str = "symmetric"):
        from ..geometry import DISTANCE_KINDS
        from ..errors import check_choice

        self.ds = check_record(record)
        check_choice("distance", distance, DISTANCE_KINDS)
        if cameras is None and getattr(views, "cameras", None) is None:
            cameras = getattr(record, "cameras", None)
        self.images, self.cameras = _views_and_cameras(views, cameras)
        V, _, self.height, self.width = (int(s) for s in self.images.shape)
        if self.ds.sizes["src"] < 1 or int(self.ds["src"].max()) >= V or int(self.ds["tgt"].max()) >= V:
            raise CorrlabError(f"record: expected src/tgt view indices below {V} (the number of views), "
                               f"got src {self.ds['src'].values.tolist()}")
        self.features = features
        if matchers is None:
            from ..baselines import available_matchers, get_matcher

            matchers = {name: get_matcher(name) for name, ok in available_matchers().items() if ok is True}
        self.matchers = dict(matchers)
        self.distance = distance
        self.last_error = None
        self._baseline_cache: dict = {}
        self._pca_cache: dict = {}
        self._quiet = False

        layers = sorted((str(v) for v in self.ds["layer"].values), key=layer_sort_key)
        steps = [int(s) for s in self.ds["step"].values]
        srcs = [int(s) for s in self.ds["src"].values]
        style = {"description_width": "70px"}
        self.layer = widgets.Dropdown(options=layers, value=layers[-1], description="layer", style=style)
        self.step = widgets.SelectionSlider(options=steps, value=steps[-1], description="step", style=style,
                                            continuous_update=False)
        self.head = widgets.Dropdown(options=[("all heads", "all")], value="all", description="head", style=style)
        self.source = widgets.Dropdown(options=[(f"view {s}", s) for s in srcs], value=srcs[0],
                                       description="source", style=style)
        self.row = widgets.IntSlider(value=0, min=0, max=0, description="token row", style=style,
                                     continuous_update=False)
        self.col = widgets.IntSlider(value=0, min=0, max=0, description="token col", style=style,
                                     continuous_update=False)
        self.target = widgets.Dropdown(options=[], description="pair with", style=style)
        self.matcher = widgets.Dropdown(options=["none"] + list(self.matchers),
                                        value=next(iter(self.matchers), "none"), description="baseline", style=style)
        self.threshold = widgets.FloatSlider(value=float(threshold), min=0.5, max=10.0, step=0.5,
                                             description="epi. px", style=style, continuous_update=False)
        self.correspondence = figure_image("correspondence")
        self.pair = figure_image("pair")
        self.baseline = figure_image("baseline")
        self.pca = figure_image("pca")
        self.message = widgets.HTML()
        self._update_layer_controls(centre=True)
        self._update_targets()
        self.layer.observe(self._on_layer, names="value")
        self.source.observe(self._on_source, names="value")
        redraws = {
            self.step: ("correspondence", "pair", "pca"), self.head: ("correspondence", "pair"),
            self.row: ("correspondence",), self.col: ("correspondence",), self.target: ("pair", "baseline"),
            self.matcher: ("baseline",), self.threshold: ("pair", "baseline"),
        }
        for w, parts in redraws.items():
            w.observe(lambda _change, parts=parts: self._on_change(parts), names="value")
        controls = widgets.HBox([
            widgets.VBox([self.layer, self.step, self.head]),
            widgets.VBox([self.source, self.row, self.col]),
            widgets.VBox([self.target, self.matcher, self.threshold]),
        ])
        self.widget = widgets.VBox([
            widgets.HTML("<b>Correspondence explorer</b>: the source token (star) and its match in every other "
                         "view (green dot kept, red cross rejected; blue dashed: epipolar line; heat map: similarity)"),
            controls, self.message, self.correspondence,
            widgets.HBox([self.pair, self.baseline]), self.pca,
        ])
        self.widget.add_class("corrlab-explorer")
        self.refresh()

    # ------------------------------------------------------------------ display
    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)

    def select(self, layer: str, step: int) -> None:
        """Jump to ``(layer, step)`` (used by the accuracy dashboard)."""
        if layer not in self.layer.options:
            raise CorrlabError(f"layer: expected one of {list(self.layer.options)}, got {layer!r}")
        if step not in self.step.options:
            raise CorrlabError(f"step: expected one of {list(self.step.options)}, got {step!r}")
        self._quiet = True
        try:
            self.layer.value = layer
            self.step.value = step
        finally:
            self._quiet = False
        self.refresh()

    # ------------------------------------------------------------------ controls
    def _on_change(self, parts=None) -> None:
        if not self._quiet:
            self.refresh(parts)

    def _update_then_redraw(self, update, parts) -> None:
        """Run ``update()`` (which sets controls) without redrawing per control, then redraw ``parts`` once."""
        self._quiet, was = True, self._quiet
        try:
            update()
        finally:
            self._quiet = was
        self._on_change(parts)

    def _on_layer(self, _change) -> None:
        self._update_then_redraw(self._update_layer_controls, ("correspondence", "pair", "pca"))

    def _on_source(self, _change) -> None:
        self._update_then_redraw(self._update_targets, None)

    def _layer_size(self, coord: str, dim: str, layer: str | None = None) -> int:
        """A per-layer size coordinate of the record (e.g. ``grid_rows``), else the padded dim's size."""
        lay = self.ds.sel(layer=layer or self.layer.value)
        return int(lay[coord]) if coord in lay.coords else int(self.ds.sizes[dim])

    def grid(self, layer: str | None = None) -> tuple[int, int]:
        """Token grid ``(rows, cols)`` of ``layer`` (default: the selected one)."""
        return self._layer_size("grid_rows", "row", layer), self._layer_size("grid_cols", "col", layer)

    def _num_heads(self) -> int:
        return self._layer_size("num_heads", "head")

    def _update_layer_controls(self, centre: bool = False) -> None:
        rows, cols = self.grid()
        self.row.max, self.col.max = rows - 1, cols - 1
        if centre:
            self.row.value, self.col.value = rows // 2, cols // 2
        heads = list(range(self._num_heads()))
        current = self.head.value
        self.head.options = [("all heads", "all")] + [(f"head {h}", h) for h in heads]
        self.head.value = current if current in heads else "all"

    def _update_targets(self) -> None:
        targets = [int(t) for t in self.ds["tgt"].values if int(t) != int(self.source.value)]
        current = self.target.value
        self.target.options = [(f"view {t}", t) for t in targets]
        if targets:
            self.target.value = current if current in targets else targets[0]

    # ------------------------------------------------------------------ data access
    def _cell(self):
        rows, cols = self.grid()
        cell = self.ds.sel(layer=self.layer.value, step=self.step.value, src=self.source.value)
        return cell.isel(row=slice(0, rows), col=slice(0, cols), head=slice(0, self._num_heads()))

    def _heads(self, da):
        return da if self.head.value == "all" else da.sel(head=[self.head.value])

    def token_centres(self) -> np.ndarray:
        """``(rows * cols, 2)`` pixel centres of the selected layer's source tokens, row-major."""
        rows, cols = self.grid()
        if "src_x" in self.ds.data_vars:
            lay = self.ds.sel(layer=self.layer.value)
            xs = lay["src_x"].values[:rows, :cols].reshape(-1)
            ys = lay["src_y"].values[:rows, :cols].reshape(-1)
            if np.isfinite(xs).all() and np.isfinite(ys).all():
                return np.stack([xs, ys], axis=1).astype(np.float64)
        return token_centres((rows, cols), (self.height, self.width)).numpy()

    def source_xy(self) -> np.ndarray:
        """``(2,)`` pixel centre of the selected source token."""
        rows, cols = self.grid()
        if not (0 <= self.row.value < rows and 0 <= self.col.value < cols):
            raise CorrlabError(f"row, col: expected a token of the {rows} x {cols} grid of {self.layer.value}, "
                               f"got ({self.row.value}, {self.col.value})")
        return self.token_centres()[self.row.value * cols + self.col.value]

    def _fundamental(self, src: int, tgt: int):
        from ..geometry import fundamental_matrix

        return fundamental_matrix(self.cameras[src], self.cameras[tgt])

    # ------------------------------------------------------------------ figures
    FIGURES = ("correspondence", "pair", "baseline", "pca")

    @guarded
    def refresh(self, parts=None) -> None:
        """Redraw ``parts`` (names from :attr:`FIGURES`; default all) for the current selection."""
        show_message(self.message, "")
        for name in self.FIGURES:
            if parts is None or name in parts:
                getattr(self, f"_draw_{name}")()

    def _draw_correspondence(self) -> None:
        from ..geometry import epipolar_lines

        cell = self._cell()
        src, r, c = int(self.source.value), self.row.value, self.col.value
        sxy = self.source_xy()
        matches, kept, epi = {}, {}, {}
        for tgt in (int(t) for t in cell["tgt"].values):
            if tgt == src:
                continue
            one = self._heads(cell.sel(tgt=tgt, row=r, col=c))
            matches[tgt] = np.stack([one["match_x"].values, one["match_y"].values], axis=-1).reshape(-1, 2)
            kept[tgt] = one["kept"].values.reshape(-1).astype(bool)
            if self.cameras is not None:
                epi[tgt] = epipolar_lines(sxy[None], self._fundamental(src, tgt))[0].numpy()
        heatmaps = self.similarity_maps()
        n_kept = sum(int(k.sum()) for k in kept.values())
        n_all = sum(int(np.isfinite(m).all(1).sum()) for m in matches.values())
        title = (f"{self.layer.value}, step {self.step.value}, token ({r}, {c}) of view {src}: "
                 f"{n_kept}/{n_all} matches kept")
        set_figure(self.correspondence, correspondence_figure(
            self.images, src, sxy, matches, kept, heatmaps or None, epi or None, title=title))

    def similarity_maps(self) -> dict[int, np.ndarray]:
        """``{target view: (h, w) map}`` of the selected source token (empty without cached q / k): the matcher's
        head-averaged softmax over the selected heads (:func:`corrlab.plotting.token_similarity`, the layer's
        own scale); on a row-wise layer over the token's row only (the rest of the map is 0)."""
        if not self._has_features():
            return {}
        layer, step, src = self.layer.value, self.step.value, int(self.source.value)
        r, c = self.row.value, self.col.value
        q = self.features.query(layer, step, src, r, c)
        layout, scale = self.features.layout(layer, step), self.features.scale(layer, step)
        maps = {}
        for tgt in range(layout.num_images):
            if tgt == src:
                continue
            k = self.features.view_keys(layer, step, tgt)
            qh, kh = (q, k) if self.head.value == "all" else (q[[self.head.value]], k[[self.head.value]])
            if layout.row_wise:
                full = np.zeros(layout.grid)
                full[r:r + 1] = token_similarity(qh, kh[:, r:r + 1], scale)
                maps[tgt] = full
            else:
                maps[tgt] = token_similarity(qh, kh, scale)
        return maps

    def _correct(self, src: int, tgt: int, pts0: np.ndarray, pts1: np.ndarray):
        if self.cameras is None:
            return None
        from ..geometry import epipolar_distance

        ok = np.isfinite(pts0).all(1) & np.isfinite(pts1).all(1)
        dist = np.full(len(pts0), np.inf)
        if ok.any():
            dist[ok] = epipolar_distance(pts0[ok], pts1[ok], self._fundamental(src, tgt), kind=self.distance).numpy()
        return dist < float(self.threshold.value)

    def _draw_pair(self) -> None:
        src, tgt = int(self.source.value), self.target.value
        if tgt is None:
            set_figure(self.pair, message_figure("no other view to pair with"))
            return
        one = self._heads(self._cell().sel(tgt=tgt)).transpose("head", "row", "col", ...)
        pts0 = np.tile(self.token_centres(), (one.sizes["head"], 1))
        pts1 = np.stack([one["match_x"].values.reshape(-1), one["match_y"].values.reshape(-1)], axis=-1)
        kept = one["kept"].values.reshape(-1).astype(bool)
        correct = self._correct(src, tgt, pts0, pts1)
        what = f"native {src}->{tgt}" + (f", <{self.threshold.value:g} px" if correct is not None else "")
        set_figure(self.pair, match_lines_figure(self.images[src], self.images[tgt], pts0, pts1, kept=kept,
                                                 correct=None if correct is None else correct & kept,
                                                 title=what))

    def _draw_baseline(self) -> None:
        name, src, tgt = self.matcher.value, int(self.source.value), self.target.value
        if name == "none" or tgt is None:
            set_figure(self.baseline, message_figure("no baseline matcher selected"))
            return
        key = (name, src, tgt)
        if key not in self._baseline_cache:
            self._baseline_cache[key] = self.matchers[name](self.images[src], self.images[tgt])
        m = self._baseline_cache[key]
        correct = self._correct(src, tgt, m.pts0, m.pts1) if len(m) else None
        what = f"{name} {src}->{tgt}" + (f", <{self.threshold.value:g} px" if correct is not None else "")
        set_figure(self.baseline, match_lines_figure(self.images[src], self.images[tgt], m.pts0, m.pts1,
                                                     correct=correct, title=what))

    def _has_features(self) -> bool:
        return self.features is not None and (self.layer.value, self.step.value) in self.features

    def _draw_pca(self) -> None:
        if not self._has_features():
            set_figure(self.pca, message_figure(
                f"keys of {self.layer.value} at step {self.step.value} were not captured: pass "
                "features=cache_attention(...) for the PCA view and heat maps", width=9, height=0.8))
            return
        key = (self.layer.value, self.step.value)
        if key not in self._pca_cache:
            fig = pca_figure(self.images, self.features.key_features(*key),
                             title=f"joint PCA of {key[0]} keys at step {key[1]} (same colour = similar key)")
            self._pca_cache[key] = figure_to_png(fig, dpi=90)
        self.pca.value = self._pca_cache[key]
