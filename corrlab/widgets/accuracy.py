"""Accuracy dashboard: layer x step heat map of epipolar precision, curves vs threshold with baselines.

A thin ipywidgets 8 dashboard over :func:`corrlab.plotting.accuracy_heatmap_figure` and
:func:`corrlab.plotting.precision_curves_figure`. It takes a tidy score table (:mod:`corrlab.evaluation`;
at least ``method, layer, step, threshold, precision, n_correct, n_matches``; ``method == "native"`` for
the model's own correspondences, anything else is a baseline drawn beside them), and optionally a
:class:`~corrlab.widgets.explorer.CorrespondenceExplorer` that "Show in explorer" jumps to.

Honest by default: with a scene column (``set``, or a sweep's ``key``) holding two or more scenes, the
summary and the curves lead with the held-out native score (each scene scored at the best (layer, step)
of the other scenes, :func:`corrlab.evaluation.held_out_scores`); the best cell chosen and scored on all
scenes is shown labelled "optimistic (in-sample)". Every number is pooled by
:func:`corrlab.evaluation.pool_scores` and every best cell chosen by :func:`corrlab.evaluation.best_layer_step`.
"""
from __future__ import annotations

import html

import ipywidgets as widgets
import numpy as np
import pandas as pd

from ..errors import CorrlabError
from ..evaluation import KEY_COLUMNS, OPTIMISTIC_LABEL, best_layer_step, held_out_scores, pool_scores
from ..evaluation.schema import SET_COLUMN, check_table
from ..plotting import accuracy_grid, accuracy_heatmap_figure, figure_to_png, layer_sort_key, precision_curves_figure
from .common import figure_image, guarded, set_figure, show_message

__all__ = ["AccuracyDashboard"]


def _pooled(rows: pd.DataFrame) -> tuple[float, float]:
    """(pooled precision, correct matches) of rows at one threshold; (NaN, 0) without rows."""
    if rows.empty:
        return float("nan"), 0.0
    p = pool_scores(rows, ("threshold",)).iloc[0]
    return float(p["precision"]), float(p["n_correct"])


class AccuracyDashboard:
    """Layer x step heat map at a chosen threshold, precision curves, and a jump to the explorer.

    Args:
        table: tidy score table (at least :data:`corrlab.evaluation.KEY_COLUMNS`, per-pair rows).
        explorer: optional :class:`~corrlab.widgets.explorer.CorrespondenceExplorer` for "Show in explorer".
        threshold: initial threshold (px; must be one of the table's thresholds, else the nearest).
        set_column: the scene column held-out selection splits on (default ``"set"``, else ``"key"``, when present).

    Attributes: controls ``threshold, value, layer, step, show``; figures ``heatmap, curves``;
    ``summary`` (HTML: the held-out native score, the optimistic in-sample best cell and the selected cell
    beside every baseline); ``message``; ``widget``. The layer/step controls start at the in-sample best cell.
    """

    def __init__(self, table: pd.DataFrame, explorer=None, threshold: float | None = None,
                 set_column: str | None = None):
        check_table("table", table, KEY_COLUMNS)
        if set_column is None:
            set_column = next((c for c in (SET_COLUMN, "key") if c in table.columns), None)
        elif set_column not in table.columns:
            raise CorrlabError(f"set_column: expected one of the table's columns {list(table.columns)}, got {set_column!r}")
        self.set_column = set_column
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
        return cls(table, explorer=explorer, threshold=threshold, set_column="key")

    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)

    def _best(self, threshold: float) -> tuple[str, int] | None:
        """The in-sample best native cell at ``threshold``, or None when no cell has a match."""
        try:
            return best_layer_step(self.table, threshold)
        except CorrlabError:
            if accuracy_grid(self.table, threshold, "n_matches").fillna(0).to_numpy().sum() > 0:
                raise
            return None

    def _held_out(self, threshold: float) -> tuple[pd.DataFrame | None, str]:
        """Held-out native rows at ``threshold``'s selection (all thresholds), and a sentence saying how
        they were chosen, or None and why there are none."""
        if self.set_column is None:
            return None, "no scene column (set / key): the best cell can only be chosen in-sample"
        n = self.table.loc[self.table["method"] == "native", self.set_column].nunique()
        if n < 2:
            return None, f"{n} scene: held-out selection needs 2 or more (choose on some, score on the others)"
        try:
            rows, sel = held_out_scores(self.table, threshold, self.set_column)
        except CorrlabError as e:  # e.g. a half without any native match at this threshold
            return None, f"no held-out selection: {e}"
        cells = "; ".join(f"{s.layer} @ step {s.step} chosen on {s.selected_on}, scored on {s.scored_on}"
                          for s in sel.itertuples(index=False))
        return rows, f"held out over {n} scenes ({self.set_column}): {cells}"

    @guarded
    def refresh(self, parts=("heatmap", "curves", "summary")) -> None:
        """Redraw ``parts``: the heat map (selected cell outlined), the curves (held-out native, the
        optimistic in-sample best and the selected cell, baselines) and the summary table."""
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
        held, how = self._held_out(thr) if "curves" in parts or "summary" in parts else (None, "")
        if "curves" in parts:
            key = (thr, best, cell)
            if key not in self._curves_cache:
                nat = self.table[self.table["method"] == "native"]
                curves = {}
                if held is not None:
                    curves["native, held out (chosen on other scenes)"] = held
                curves[f"native best {best[0]} @ step {best[1]}, {OPTIMISTIC_LABEL}"] = \
                    nat[(nat["layer"] == best[0]) & (nat["step"] == best[1])]
                native = () if cell == best else (cell,)
                self._curves_cache[key] = figure_to_png(precision_curves_figure(
                    self.table, native=native, curves=curves,
                    title=f"native correspondences vs baselines (same images); selection at {thr:g} px"), dpi=90)
            self.curves.value = self._curves_cache[key]
        if "summary" in parts:
            self.summary.value = self._summary_html(thr, best, held, how)

    def _summary_html(self, thr: float, best: tuple[str, int], held: pd.DataFrame | None, how: str) -> str:
        t = self.table[np.isclose(self.table["threshold"].astype(float), thr)]
        nat = t[t["method"] == "native"]
        rows = []
        if held is not None:
            rows.append(("native, held out (best cell of the other scenes)",
                         *_pooled(held[np.isclose(held["threshold"].astype(float), thr)])))
        rows.append((f"native, best cell ({best[0]} @ step {best[1]}), {OPTIMISTIC_LABEL}",
                     *_pooled(nat[(nat["layer"] == best[0]) & (nat["step"] == best[1])])))
        if (self.layer.value, self.step.value) != best:
            rows.append((f"native, selected ({self.layer.value} @ step {self.step.value})",
                         *_pooled(nat[(nat["layer"] == self.layer.value) & (nat["step"] == self.step.value)])))
        others = t[t["method"] != "native"]
        if len(others):
            for r in pool_scores(others, ("method", "threshold")).itertuples(index=False):
                rows.append((str(r.method), float(r.precision), float(r.n_correct)))
        body = "".join(
            f"<tr><td>{html.escape(name)}</td><td>{'n/a' if np.isnan(p) else f'{p:.3f}'}</td><td>{n:.0f}</td></tr>"
            for name, p, n in rows
        )
        return (f"<table><tr><th>method at {thr:g} px (pooled over pairs)</th><th>precision</th>"
                f"<th>correct matches</th></tr>{body}</table><small>{html.escape(how)}</small>")

    @guarded
    def show_in_explorer(self) -> None:
        """Send the selected (layer, step) to the explorer."""
        if self.explorer is None:
            raise CorrlabError("explorer: expected a CorrespondenceExplorer to jump to, got None")
        self.explorer.select(self.layer.value, int(self.step.value))
        show_message(self.message, f"explorer shows {self.layer.value} at step {self.step.value}", "ok")
