"""Accuracy dashboard: layer x step heat map of epipolar precision, curves vs threshold with baselines.

A thin ipywidgets 8 dashboard over :func:`corrlab.plotting.accuracy_heatmap_figure` and
:func:`corrlab.plotting.precision_curves_figure`. It takes a tidy score table (columns
``method, layer, step, threshold, precision, n_correct, n_matches``; ``method == "native"`` for the
model's own correspondences, anything else is a baseline drawn beside them), and optionally a
:class:`~corrlab.widgets.explorer.CorrespondenceExplorer` that "Show in explorer" jumps to.
"""
from __future__ import annotations

import html

import ipywidgets as widgets
import numpy as np
import pandas as pd

from ..errors import CorrlabError
from ..plotting import (
    SCORE_COLUMNS,
    accuracy_grid,
    accuracy_heatmap_figure,
    figure_to_png,
    layer_sort_key,
    precision_curves_figure,
)
from .common import figure_image, guarded, set_figure, show_message

__all__ = ["AccuracyDashboard", "best_cell"]


def best_cell(table: pd.DataFrame, threshold: float, value: str = "precision") -> tuple[str, int]:
    """``(layer, step)`` of the native cell with the highest pooled ``value`` at ``threshold``
    (ties: more correct matches); cells without matches never win."""
    grid = accuracy_grid(table, threshold, value)
    counts = accuracy_grid(table, threshold, "n_correct")
    cells = pd.DataFrame({"value": grid.stack(), "n_correct": counts.stack()}).dropna(subset=["value"])
    if cells.empty:
        raise CorrlabError(f"threshold: expected native cells with matches at {threshold:g} px, got none")
    cells = cells.sort_values(["value", "n_correct"], ascending=False, kind="stable")
    layer, step = cells.index[0]
    return str(layer), int(step)


def _pooled(rows: pd.DataFrame) -> tuple[float, float]:
    n = float(rows["n_matches"].sum())
    return (float(rows["n_correct"].sum()) / n if n > 0 else float("nan")), float(rows["n_correct"].sum())


class AccuracyDashboard:
    """Layer x step heat map at a chosen threshold, precision curves, and a jump to the explorer.

    Args:
        table: tidy score table (columns :data:`corrlab.plotting.SCORE_COLUMNS`).
        explorer: optional :class:`~corrlab.widgets.explorer.CorrespondenceExplorer` for "Show in explorer".
        threshold: initial threshold (px; must be one of the table's thresholds, else the nearest).

    Attributes: controls ``threshold, value, layer, step, show``; figures ``heatmap, curves``;
    ``summary`` (HTML: best cell, its precision beside every baseline's); ``message``; ``widget``.
    """

    def __init__(self, table: pd.DataFrame, explorer=None, threshold: float | None = None):
        if not isinstance(table, pd.DataFrame):
            raise CorrlabError(f"table: expected a pandas DataFrame with columns {list(SCORE_COLUMNS)}, got {type(table).__name__}")
        missing = [c for c in SCORE_COLUMNS if c not in table.columns]
        if missing:
            raise CorrlabError(f"table: expected columns {list(SCORE_COLUMNS)}, missing {missing}")
        nat = table[table["method"] == "native"]
        if nat.empty:
            raise CorrlabError("table: expected rows with method 'native', got none")
        self.table = table
        self.explorer = explorer
        self.last_error = None
        thresholds = sorted(float(t) for t in table["threshold"].unique())
        if threshold is None:
            threshold = thresholds[len(thresholds) // 2]
        threshold = min(thresholds, key=lambda t: abs(t - float(threshold)))
        layers = sorted({str(l) for l in nat["layer"]}, key=layer_sort_key)
        steps = sorted({int(s) for s in nat["step"]})
        style = {"description_width": "70px"}
        self.threshold = widgets.Dropdown(options=[(f"{t:g} px", t) for t in thresholds], value=threshold,
                                          description="threshold", style=style)
        self.value = widgets.ToggleButtons(options=[("precision", "precision"), ("correct matches", "n_correct")],
                                           value="precision", style={"button_width": "120px"})
        best = self._best(threshold) or (layers[-1], steps[-1])
        self.layer = widgets.Dropdown(options=layers, value=best[0], description="layer", style=style)
        self.step = widgets.Dropdown(options=steps, value=best[1], description="step", style=style)
        self.show = widgets.Button(description="Show in explorer", icon="search",
                                   disabled=explorer is None, tooltip="open this layer and step in the explorer")
        self.heatmap = figure_image("heatmap")
        self.curves = figure_image("curves")
        self.summary = widgets.HTML()
        self.message = widgets.HTML()
        redraws = {self.threshold: ("heatmap", "curves", "summary"), self.value: ("heatmap",),
                   self.layer: ("heatmap", "curves", "summary"), self.step: ("heatmap", "curves", "summary")}
        for w, parts in redraws.items():
            w.observe(lambda _change, parts=parts: self.refresh(parts), names="value")
        self._curves_cache: dict = {}
        self.show.on_click(lambda _b: self.show_in_explorer())
        self.widget = widgets.VBox([
            widgets.HTML("<b>Accuracy dashboard</b>"),
            widgets.HBox([self.threshold, self.value]),
            widgets.HBox([self.layer, self.step, self.show]),
            self.message, self.summary, self.heatmap, self.curves,
        ])
        self.widget.add_class("corrlab-accuracy")
        self.refresh()

    @classmethod
    def from_sweep(cls, sweep, where: dict | None = None, explorer=None, threshold: float | None = None,
                   **eq) -> "AccuracyDashboard":
        """A dashboard over a sweep's score table, pooled over its items and view pairs.

        ``sweep``: a store path, a :class:`~corrlab.sweeps.SweepResult` or a
        :class:`~corrlab.sweeps.SweepHandle`. ``where`` / ``eq`` keep the rows whose label columns match
        (a value or a list), e.g. ``from_sweep("out/sweep", intervention="none", views=4)``.
        """
        from ..sweeps import SweepHandle, SweepResult, open_sweep

        if isinstance(sweep, SweepHandle):
            sweep = sweep.open()
        elif not isinstance(sweep, SweepResult):
            sweep = open_sweep(sweep)
        table = sweep.table({**(where or {}), **eq})
        if table.empty:
            raise CorrlabError(f"where: expected a filter that keeps some of the sweep's {len(sweep)} items, "
                               f"got {({**(where or {}), **eq})!r} (no rows)")
        return cls(table, explorer=explorer, threshold=threshold)

    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)

    def _best(self, threshold: float) -> tuple[str, int] | None:
        """The best native cell at ``threshold``, or None when no cell has a match."""
        try:
            return best_cell(self.table, threshold)
        except CorrlabError:
            if accuracy_grid(self.table, threshold, "n_matches").fillna(0).to_numpy().sum() > 0:
                raise
            return None

    @guarded
    def refresh(self, parts=("heatmap", "curves", "summary")) -> None:
        """Redraw ``parts``: the heat map (selected cell outlined), the curves (best and selected cell,
        baselines) and the summary table."""
        show_message(self.message, "")
        thr, value = float(self.threshold.value), self.value.value
        cell = (self.layer.value, self.step.value)
        if "heatmap" in parts:
            set_figure(self.heatmap, accuracy_heatmap_figure(self.table, thr, value, selected=cell))
        best = self._best(thr)
        if best is None:
            show_message(self.message, f"no native match was kept at {thr:g} px (e.g. an untrained model): "
                         "the heat map is empty; baselines are still shown", "info")
            best = (self.layer.value, self.step.value)
        if "curves" in parts:
            cells = (best,) if best == cell else (best, cell)
            if cells not in self._curves_cache:
                self._curves_cache[cells] = figure_to_png(precision_curves_figure(
                    self.table, native=cells, title="native correspondences vs baselines (same images)"), dpi=90)
            self.curves.value = self._curves_cache[cells]
        if "summary" in parts:
            self.summary.value = self._summary_html(thr, best)

    def _summary_html(self, thr: float, best: tuple[str, int]) -> str:
        t = self.table[np.isclose(self.table["threshold"].astype(float), thr)]
        nat = t[t["method"] == "native"]
        rows = [(f"native, best cell ({best[0]} @ step {best[1]})",
                 *_pooled(nat[(nat["layer"] == best[0]) & (nat["step"] == best[1])]))]
        if (self.layer.value, self.step.value) != best:
            rows.append((f"native, selected ({self.layer.value} @ step {self.step.value})",
                         *_pooled(nat[(nat["layer"] == self.layer.value) & (nat["step"] == self.step.value)])))
        for method, g in t[t["method"] != "native"].groupby("method"):
            rows.append((str(method), *_pooled(g)))
        body = "".join(
            f"<tr><td>{html.escape(name)}</td><td>{'n/a' if np.isnan(p) else f'{p:.3f}'}</td><td>{n:.0f}</td></tr>"
            for name, p, n in rows
        )
        return (f"<table><tr><th>method at {thr:g} px (pooled over pairs)</th><th>precision</th>"
                f"<th>correct matches</th></tr>{body}</table>")

    @guarded
    def show_in_explorer(self) -> None:
        """Send the selected (layer, step) to the explorer."""
        if self.explorer is None:
            raise CorrlabError("explorer: expected a CorrespondenceExplorer to jump to, got None")
        self.explorer.select(self.layer.value, int(self.step.value))
        show_message(self.message, f"explorer shows {self.layer.value} at step {self.step.value}", "ok")
