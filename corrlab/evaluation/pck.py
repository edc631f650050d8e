"""PCK: the fraction of predicted points within a threshold of ground truth (from depth, for rendered scenes)."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd
import torch

from ..errors import ShapeError, ValueRangeError, check_choice, describe
from ..geometry import as_points
from ..probing.controls import CONTROLS, control_matches
from .controls import control_layer
from .epipolar import pair_counts, score_rows
from .native import record_geometry
from .schema import DEFAULT_THRESHOLDS, as_record, check_thresholds

__all__ = ["pck", "pck_record"]


def pck(pred, gt, thresholds: Sequence[float] = DEFAULT_THRESHOLDS, valid=None) -> pd.DataFrame:
    """Percentage of correct keypoints: fraction of predictions within ``threshold`` px of the truth.

    Args:
        pred: (N, 2) predicted pixels.
        gt: (N, 2) ground-truth pixels (NaN allowed only where ``valid`` is False).
        thresholds: pixel thresholds; correct when ``||pred - gt|| <= threshold``.
        valid: optional (N,) bool mask of the entries that count (e.g. the ``valid`` output of
            :func:`corrlab.geometry.ground_truth_match_for`).

    Returns:
        DataFrame with one row per threshold: threshold, pck (in [0, 1], NaN when n = 0), n (entries counted).
    """
    th = check_thresholds(thresholds)
    p = as_points("pred", pred)
    g = torch.as_tensor(gt)
    if g.shape != p.shape:
        raise ShapeError(f"gt: expected shape {tuple(p.shape)} matching pred, got {describe(gt)}")
    g = g.to(torch.float64)
    if valid is None:
        mask = torch.ones(p.shape[0], dtype=torch.bool)
    else:
        mask = torch.as_tensor(valid)
        if mask.dtype != torch.bool or mask.shape != (p.shape[0],):
            raise ShapeError(f"valid: expected a bool array of shape ({p.shape[0]},), got {describe(valid)}")
    g_used = g[mask]
    if not bool(torch.isfinite(g_used).all()):
        raise ValueRangeError(f"gt: expected finite values where valid, got {int((~torch.isfinite(g_used)).sum())} non-finite")
    n, correct = pair_counts((p[mask] - g_used).norm(dim=1).numpy(), th)
    rows = score_rows({}, n, correct, th)
    return pd.DataFrame({"threshold": rows["threshold"], "pck": rows["precision"], "n": rows["n_matches"]})


def pck_record(
    rec,
    depth: torch.Tensor,
    cameras=None,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    unit: str = "px",
    images: torch.Tensor | None = None,
    controls: Sequence[str] = CONTROLS,
    displacement_bins: Sequence[float] = (2.0,),
    kept_only: bool = True,
    seed: int = 0,
    depth_tol: float = 0.01,
) -> pd.DataFrame:
    """PCK of native matches (and the trivial matchers) against ground truth from depth.

    A source token counts when its centre has a visible ground-truth location in the target image
    (:func:`corrlab.geometry.correspondences.ground_truth_match_for`); a match is correct when the matched
    token centre lies within ``threshold`` of it (``unit`` ``"px"`` or ``"tokens"``, one token = the
    layer's pixel pitch). Tokens are split by how far their true match moves from the token's own
    position (``displacement_bins`` in tokens: ``(2,)`` gives ``"<2"`` and ``">=2"``), and rows carry the
    relative view angle of the pair.

    Args:
        rec: the record (of a rendered scene, e.g. from :func:`corrlab.probing.probe_rendered`).
        depth: ``(V, H, W)`` z_cam depth (``+inf`` background) of the images the record saw.
        images: ``(V, 3, H, W)``; needed for the appearance control (skipped without).
        kept_only: count only kept native matches (the controls always match every token).

    Returns:
        Long DataFrame: method, layer, step, timestep, src, tgt, view_angle, displacement, threshold,
        unit, pck, n_correct, n_points. Controls have layer/step None and use the finest recorded grid.
    """
    from ..geometry.correspondences import ground_truth_match_for

    rec = as_record(rec)
    geo = record_geometry(rec, cameras)
    check_choice("unit", unit, ("px", "tokens"))
    th = check_thresholds(thresholds)
    depth = torch.as_tensor(depth)
    if depth.ndim != 3 or depth.shape[0] != rec.num_images or tuple(depth.shape[1:]) != rec.image_size:
        raise ShapeError(f"depth: expected ({rec.num_images}, {rec.image_size[0]}, {rec.image_size[1]}), got {describe(depth)}")
    edges = np.asarray(sorted(float(b) for b in displacement_bins))
    labels = [f"<{edges[0]:g}"] if len(edges) else ["all"]
    labels += [f"[{a:g},{b:g})" for a, b in zip(edges[:-1], edges[1:])]
    labels += [f">={edges[-1]:g}"] if len(edges) else []
    ds = rec.ds
    ctrl_layer = control_layer(rec, None)
    frames = []
    for layer in rec.layers:
        h, w = rec.grid(layer)
        centres = rec.token_centres(layer)
        pitch = float(np.mean([rec.image_size[0] / h, rec.image_size[1] / w]))
        scale = pitch if unit == "tokens" else 1.0
        sel = ds.sel(layer=layer)
        nh = int(sel["num_heads"])
        mx = sel["match_x"].values[..., :nh, :h, :w].reshape(len(rec.steps), rec.num_images, rec.num_images, nh, h * w)
        my = sel["match_y"].values[..., :nh, :h, :w].reshape(mx.shape)
        kp = sel["kept"].values[..., :nh, :h, :w].reshape(mx.shape)
        methods = [("native", None)]
        if layer == ctrl_layer:
            methods += [(c, control_matches(c, rec.num_images, (h, w), images=images, seed=seed).numpy())
                        for c in controls if not (c == "appearance" and images is None)]
        for i in range(rec.num_images):
            for j in range(rec.num_images):
                if i == j:
                    continue
                gt, valid = ground_truth_match_for(depth[i], geo[i], depth[j], geo[j], torch.from_numpy(centres),
                                                   depth_tol=depth_tol)
                gt, valid = gt.numpy(), valid.numpy()
                moved = np.linalg.norm(gt - centres, axis=1) / pitch
                bin_of = np.searchsorted(edges, moved, side="right")  # NaN (invalid) lands past the end: masked
                angle = geo.view_angle(i, j)
                for method, index in methods:
                    if method == "native":
                        pred = np.stack([mx[:, i, j], my[:, i, j]], axis=-1)  # (S, H', N, 2)
                        use = valid[None, None] & ~np.isnan(pred[..., 0])
                        if kept_only:
                            use &= kp[:, i, j]
                        s_idx, _, n_idx = np.nonzero(use)
                        err = np.linalg.norm(pred[use] - gt[n_idx], axis=1) / scale
                        n, correct = pair_counts(err, th, s_idx * len(labels) + bin_of[n_idx], len(rec.steps) * len(labels))
                        g_step = np.repeat(np.arange(len(rec.steps)), len(labels))
                        keys = {"method": np.full(len(g_step), "native", dtype=object),
                                "layer": np.full(len(g_step), layer, dtype=object),
                                "step": np.asarray(rec.steps)[g_step], "timestep": ds["timestep"].values[g_step]}
                    else:
                        ok = valid & (index[i, j] >= 0)
                        n_idx = np.nonzero(ok)[0]
                        err = np.linalg.norm(centres[index[i, j][n_idx]] - gt[n_idx], axis=1) / scale
                        n, correct = pair_counts(err, th, bin_of[n_idx], len(labels))
                        keys = {"method": np.full(len(labels), method, dtype=object), "layer": [None] * len(labels),
                                "step": [None] * len(labels), "timestep": np.full(len(labels), np.nan)}
                        g_step = np.zeros(len(labels), dtype=np.int64)
                    groups = len(g_step)
                    keys.update(src=np.full(groups, i), tgt=np.full(groups, j), view_angle=np.full(groups, angle),
                                displacement=np.asarray(labels * (groups // len(labels)), dtype=object))
                    frames.append(score_rows(keys, n, correct, th).rename(columns={"precision": "pck", "n_matches": "n_points"}))
    out = pd.concat(frames, ignore_index=True)
    out.insert(out.columns.get_loc("threshold") + 1, "unit", unit)
    return out
