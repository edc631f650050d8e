"""Epipolar scores of the trivial matchers (chance, identity, appearance) on a record's token grid.

The controls' matches come from :mod:`corrlab.probing.controls` (they live next to the native matcher);
here they are scored by the same per-pair scorer as everything else.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd
import torch

from ..errors import CorrlabError, check_choice
from ..probing.controls import CONTROLS, control_matches
from .epipolar import score_token_matches
from .native import record_geometry
from .schema import DEFAULT_THRESHOLDS, as_record

__all__ = ["control_layer", "score_controls"]


def control_layer(rec, layer: str | None = None) -> str:
    """``layer`` (checked against the record), or by default the record's finest token grid."""
    if layer is not None:
        if layer not in rec.layers:
            raise CorrlabError(f"layer: expected one of the recorded layers {rec.layers}, got {layer!r}")
        return layer
    if not rec.layers:
        raise CorrlabError("rec: the record holds no layers")
    return max(rec.layers, key=lambda name: np.prod(rec.grid(name)))


def score_controls(
    rec,
    images: torch.Tensor | None = None,
    cameras=None,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    kind: str = "symmetric",
    controls: Sequence[str] = CONTROLS,
    layer: str | None = None,
    seed: int = 0,
    features: str = "patch",
) -> pd.DataFrame:
    """Scores of the trivial matchers on a record's token grid (``layer``'s, default the finest).

    ``images (V, 3, H, W)`` (the generated images) are needed for ``"appearance"``; without them that
    control is skipped. ``cameras``: a list or a :class:`~corrlab.evaluation.PairGeometry` (default: the
    record's). Returns a score table, ``method`` = the control's name, layer and step None.
    """
    rec = as_record(rec)
    geo = record_geometry(rec, cameras)
    name = control_layer(rec, layer)
    grid, centres = rec.grid(name), rec.token_centres(name)
    frames = []
    for control in controls:
        check_choice("controls", control, CONTROLS)
        if control == "appearance" and images is None:
            continue
        index = control_matches(control, rec.num_images, grid, images=images, seed=seed, features=features)
        frames.append(score_token_matches(index, centres, geo, thresholds, kind, method=control))
    if not frames:
        raise CorrlabError(f"controls: expected at least one control to score, got {list(controls)} without images")
    return pd.concat(frames, ignore_index=True)
