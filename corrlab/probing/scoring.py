"""Scores of native correspondences, next to trivial matchers and classical baselines, as tidy tables.

Conventions (shared with :mod:`corrlab.metrics`):

* A native match is the pair (centre of the source token in image ``src``, centre of the matched token
  in image ``tgt``). Epipolar distances come from the cameras of the generation
  (:func:`corrlab.geometry.fundamental_matrix`), in pixels, never squared; ``kind`` is ``"symmetric"``
  (default), ``"line"`` or ``"sampson"``. A match is correct when its distance is ``<= threshold``.
* Every ordered image pair ``(src, tgt)``, ``src != tgt``, is scored (native matches are directional);
  baselines are matched once per unordered pair and scored in both directions.
* Heads are pooled: with per-head matching each (head, token) is one match (pass ``by_head=True`` for a
  ``head`` column). For a count comparable to a keypoint matcher, match with ``heads="mean"``.
* ``precision = n_correct / n_matches``, NaN when there are no matches.
* Row-wise layers (a record's ``row_wise_layers``: MV-Adapter's row-wise multi-view attention) can only
  match within the source row. The row is the epipolar line only for orthographic views at elevation 0;
  for any other cameras their precision measures the model's built-in row assumption as much as its
  correspondences. :func:`score_record` warns (``RowConstraintWarning``) when it scores such a layer
  under cameras that are not orthographic-like at elevation 0, and ``df.attrs["row_wise_layers"]``
  lists them.

Tables are long (one row per group x threshold) and plot with seaborn in one line, e.g.
``sns.lineplot(df, x="threshold", y="precision", hue="method")``.
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from ..errors import CorrlabError, ShapeError, ValueRangeError, check_choice, describe
from .controls import CONTROLS, control_matches
from .record import ProbeRecord

__all__ = [
    "DEFAULT_THRESHOLDS",
    "RowConstraintWarning",
    "score_record",
    "score_token_matches",
    "score_controls",
    "score_baselines_on_set",
    "pck_record",
    "probe_rendered",
    "comparison_table",
    "pool_scores",
    "best_layer_step",
]

DEFAULT_THRESHOLDS = (1.0, 2.0, 5.0, 10.0)
DEFAULT_BASELINES = ("sift", "disk+lightglue", "superpoint")
KINDS = ("symmetric", "line", "sampson")


# ------------------------------------------------------------------------------------------ helpers
def _thresholds(thresholds) -> np.ndarray:
    try:
        th = np.asarray(list(thresholds) if not np.isscalar(thresholds) else [thresholds], dtype=np.float64)
    except (TypeError, ValueError):
        raise CorrlabError(f"thresholds: expected a sequence of pixel values, got {describe(thresholds)}") from None
    if th.ndim != 1 or th.size == 0 or not np.all(np.isfinite(th)) or np.any(th < 0):
        raise ValueRangeError(f"thresholds: expected a non-empty list of finite values >= 0, got {th.tolist()}")
    return th


def _as_record(rec) -> ProbeRecord:
    if isinstance(rec, ProbeRecord):
        return rec
    if isinstance(rec, (str, os.PathLike)):
        return ProbeRecord.load(rec)
    raise CorrlabError(f"rec: expected a ProbeRecord or the path of a saved one, got {describe(rec)}")


def _as_set(mvset):
    from ..sets import MultiViewSet, load_set

    if isinstance(mvset, MultiViewSet):
        return mvset
    if isinstance(mvset, (str, os.PathLike)):
        return load_set(mvset)
    raise CorrlabError(f"mvset: expected a MultiViewSet or a set directory, got {describe(mvset)}")


def _cameras(rec: ProbeRecord, cameras) -> list:
    cams = list(cameras) if cameras is not None else rec.cameras
    if cams is None:
        raise CorrlabError("cameras: the record holds no cameras; pass the generation's cameras (list of Camera)")
    if len(cams) != rec.num_images:
        raise ShapeError(f"cameras: expected {rec.num_images} cameras (one per image), got {describe(cams)}")
    return cams


def _pairs(v: int) -> list[tuple[int, int]]:
    return [(i, j) for i in range(v) for j in range(v) if i != j]


def _distances(cameras, i: int, j: int, pts_i: np.ndarray, pts_j: np.ndarray, kind: str) -> np.ndarray:
    from ..geometry.epipolar import epipolar_distance, fundamental_matrix

    if len(pts_i) == 0:
        return np.zeros(0)
    F = fundamental_matrix(cameras[i], cameras[j])
    return epipolar_distance(torch.from_numpy(pts_i), torch.from_numpy(pts_j), F, kind=kind).numpy()


def _view_angle(cameras, i: int, j: int) -> float:
    from ..geometry.epipolar import relative_view_angle

    return float(relative_view_angle(cameras[i], cameras[j]))


def _counts(err: np.ndarray, group: np.ndarray, n_groups: int, th: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(G,)`` matches and ``(G, T)`` correct counts (``err <= threshold``) per group id."""
    n = np.bincount(group, minlength=n_groups).astype(np.int64)
    correct = np.stack(
        [np.bincount(group, weights=(err <= t).astype(np.float64), minlength=n_groups) for t in th], axis=1
    ).round().astype(np.int64)
    return n, correct


def _rows(keys: dict[str, np.ndarray], n: np.ndarray, correct: np.ndarray, th: np.ndarray) -> pd.DataFrame:
    """Long table: the ``(G,)`` key columns repeated per threshold, then threshold/precision/counts."""
    g, t = correct.shape
    out = {k: np.repeat(np.asarray(v, dtype=object if np.asarray(v).dtype.kind in "OU" else None), t) for k, v in keys.items()}
    n_rep = np.repeat(n, t)
    c_flat = correct.reshape(-1)
    out["threshold"] = np.tile(th, g)
    with np.errstate(invalid="ignore", divide="ignore"):
        out["precision"] = np.where(n_rep > 0, c_flat / np.maximum(n_rep, 1), np.nan)
    out["n_correct"] = c_flat
    out["n_matches"] = n_rep
    return pd.DataFrame(out)


# ------------------------------------------------------------------------------------------ native
def score_record(
    rec,
    cameras=None,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    kind: str = "symmetric",
    kept_only: bool = True,
    by_head: bool = False,
) -> pd.DataFrame:
    """Epipolar precision and correct-match counts of a record's native matches.

    Args:
        rec: a :class:`ProbeRecord` (or the path of a saved one).
        cameras: the generation's V cameras; default: the cameras stored in the record.
        thresholds: pixel thresholds (default 1, 2, 5, 10).
        kind: epipolar distance kind, ``"symmetric"`` (default), ``"line"`` or ``"sampson"``.
        kept_only: score only matches that passed the confidence threshold (default True).
        by_head: one group per head (adds a ``head`` column) instead of pooling the heads.

    Returns:
        Long DataFrame, one row per (layer, step, [head,] src, tgt, threshold): method ("native"), layer,
        step, timestep, [head,] src, tgt, view_angle, threshold, precision, n_correct, n_matches, kind.
    """
    rec = _as_record(rec)
    check_choice("kind", kind, KINDS)
    th = _thresholds(thresholds)
    cams = _cameras(rec, cameras)
    ds = rec.ds
    match_row = ds["match_row"].values
    mx, my, kept = ds["match_x"].values, ds["match_y"].values, ds["kept"].values
    sx, sy = ds["src_x"].values, ds["src_y"].values
    n_layers, n_steps, v, _, n_heads, _, _ = match_row.shape
    layers, steps = np.array(rec.layers, dtype=object), np.asarray(rec.steps)
    timesteps = ds["timestep"].values
    heads_of_layer = ds["num_heads"].values
    per = n_heads if by_head else 1
    n_groups = n_layers * n_steps * per
    g_layer = np.repeat(np.arange(n_layers), n_steps * per)
    g_step = np.tile(np.repeat(np.arange(n_steps), per), n_layers)
    g_head = np.tile(np.arange(per), n_layers * n_steps)
    real = g_head < heads_of_layer[g_layer] if by_head else np.ones(n_groups, dtype=bool)
    frames = []
    for i, j in _pairs(v):
        valid = match_row[:, :, i, j] >= 0
        if kept_only:
            valid &= kept[:, :, i, j]
        li, si, hi, ri, ci = np.nonzero(valid)
        pts_i = np.stack([sx[li, ri, ci], sy[li, ri, ci]], axis=1)
        pts_j = np.stack([mx[:, :, i, j][valid], my[:, :, i, j][valid]], axis=1).astype(np.float64)
        dist = _distances(cams, i, j, pts_i, pts_j, kind)
        group = (li * n_steps + si) * per + (hi if by_head else 0)
        n, correct = _counts(dist, group, n_groups, th)
        keys = {
            "method": np.full(n_groups, "native", dtype=object),
            "layer": layers[g_layer],
            "step": steps[g_step],
            "timestep": timesteps[g_step],
        }
        if by_head:
            keys["head"] = g_head
        keys.update(src=np.full(n_groups, i), tgt=np.full(n_groups, j), view_angle=np.full(n_groups, _view_angle(cams, i, j)))
        keep = np.repeat(real, len(th))
        frames.append(_rows(keys, n, correct, th)[keep])
    df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    df["kind"] = kind
    row_wise = json.loads(ds.attrs.get("row_wise_layers", "[]"))
    if row_wise:
        df.attrs["row_wise_layers"] = row_wise
        if not _rows_are_epipolar(cams):
            warnings.warn(
                f"layers {row_wise} attend row by row, so their matches lie on the source row; the row is the "
                f"epipolar line only for orthographic views at elevation 0, which these cameras are not",
                RowConstraintWarning, stacklevel=2,
            )
    return df


class RowConstraintWarning(UserWarning):
    """A row-wise layer was scored under cameras whose epipolar lines are not the image rows."""


def _rows_are_epipolar(cameras, tol_deg: float = 1.0) -> bool:
    """Whether image rows are epipolar lines: orthographic cameras sharing one "down" axis (the first
    camera's) with optical axes perpendicular to it (an orbit at elevation 0), within ``tol_deg``.
    Perspective views at elevation 0 fail: there only the horizon row is an epipolar line."""
    try:
        Rs = [np.asarray(c.R, dtype=np.float64) for c in cameras]
        rows = [(float(c.K[1, 1]), float(c.K[1, 2]), float(c.t[1])) for c in cameras]  # y = fy (R[1].X + t_y) + cy
    except (AttributeError, TypeError, IndexError):
        return False
    up = Rs[0][1]  # the first camera's image "down" axis in world coordinates
    for R, row in zip(Rs, rows):
        if abs(float(np.dot(R[2], up))) > np.sin(np.radians(tol_deg)) or float(np.dot(R[1], up)) < 1 - 1e-3:
            return False
        if not np.allclose(row, rows[0], rtol=1e-6, atol=1e-6):
            return False
    return all(getattr(c, "model", "perspective") == "orthographic" for c in cameras)


def score_token_matches(
    index: torch.Tensor,
    centres: torch.Tensor | np.ndarray,
    cameras,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    kind: str = "symmetric",
    method: str = "matcher",
) -> pd.DataFrame:
    """Epipolar scores of token-level matches ``(V, V, N)`` (``-1`` = no match) on one token grid.

    ``centres (N, 2)`` are the pixel centres of the grid's tokens. Returns one row per ordered pair x
    threshold: method, layer (None), step (None), src, tgt, view_angle, threshold, precision, n_correct,
    n_matches, kind.
    """
    check_choice("kind", kind, KINDS)
    th = _thresholds(thresholds)
    idx = torch.as_tensor(index).long().numpy()
    c = np.asarray(torch.as_tensor(centres, dtype=torch.float64))
    if idx.ndim != 3 or idx.shape[0] != idx.shape[1] or idx.shape[2] != c.shape[0]:
        raise ShapeError(f"index: expected (V, V, N) with N = {c.shape[0]} tokens, got {describe(index)}")
    if len(cameras) != idx.shape[0]:
        raise ShapeError(f"cameras: expected {idx.shape[0]} cameras, got {describe(cameras)}")
    frames = []
    for i, j in _pairs(idx.shape[0]):
        ok = idx[i, j] >= 0
        dist = _distances(cameras, i, j, c[ok], c[idx[i, j][ok]], kind)
        n, correct = _counts(dist, np.zeros(len(dist), dtype=np.int64), 1, th)
        keys = {"method": [method], "layer": [None], "step": [None], "src": [i], "tgt": [j],
                "view_angle": [_view_angle(cameras, i, j)]}
        frames.append(_rows(keys, n, correct, th))
    df = pd.concat(frames, ignore_index=True)
    df["kind"] = kind
    return df


def _control_layer(rec: ProbeRecord, layer: str | None) -> str:
    if layer is not None:
        if layer not in rec.layers:
            raise CorrlabError(f"layer: expected one of the recorded layers {rec.layers}, got {layer!r}")
        return layer
    if not rec.layers:
        raise CorrlabError("rec: the record holds no layers")
    return max(rec.layers, key=lambda name: np.prod(rec.grid(name)))  # the finest grid


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
    """Scores of the trivial matchers (chance, identity, appearance) on a record's token grid.

    The grid is ``layer``'s (default: the finest recorded grid). ``images (V, 3, H, W)`` (the generated
    images) are needed for ``"appearance"``; without them that control is skipped. Same columns as
    :func:`score_token_matches`, ``method`` = the control's name.
    """
    rec = _as_record(rec)
    cams = _cameras(rec, cameras)
    name = _control_layer(rec, layer)
    grid, centres = rec.grid(name), rec.token_centres(name)
    frames = []
    for control in controls:
        check_choice("controls", control, CONTROLS)
        if control == "appearance" and images is None:
            continue
        index = control_matches(control, rec.num_images, grid, images=images, seed=seed, features=features)
        frames.append(score_token_matches(index, centres, cams, thresholds, kind, method=control))
    if not frames:
        raise CorrlabError(f"controls: expected at least one control to score, got {list(controls)} without images")
    return pd.concat(frames, ignore_index=True)


# ------------------------------------------------------------------------------------------ baselines
def score_baselines_on_set(
    mvset,
    matchers: Sequence[str] = DEFAULT_BASELINES,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    kind: str = "symmetric",
) -> pd.DataFrame:
    """Epipolar scores of classical / learned matchers on a set's images, under its cameras.

    A matcher whose weights are missing (or that fails to load) gives one row per threshold with
    ``precision`` NaN, zero counts and ``note`` = ``"unavailable: <reason>"`` instead of an error.
    Unknown matcher names raise. Columns: method, layer (None), step (None), src, tgt, view_angle,
    threshold, precision, n_correct, n_matches, kind, note.
    """
    from ..baselines import MATCHERS, available_matchers, get_matcher

    mvset = _as_set(mvset)
    check_choice("kind", kind, KINDS)
    th = _thresholds(thresholds)
    status = available_matchers()
    frames = []
    for name in matchers:
        check_choice("matchers", name, list(MATCHERS))
        reason = None if status.get(name) is True else str(status.get(name))
        results = {}
        if reason is None:
            matcher = get_matcher(name)
            try:
                for i in range(mvset.num_views):
                    for j in range(i + 1, mvset.num_views):
                        m = matcher(mvset.images[i], mvset.images[j])
                        results[(i, j)], results[(j, i)] = m, m.swapped()
            except (CorrlabError, ImportError, OSError, RuntimeError) as e:
                reason = f"{type(e).__name__}: {e}"
        if reason is not None:
            frames.append(pd.DataFrame({
                "method": name, "layer": None, "step": None, "src": None, "tgt": None, "view_angle": np.nan,
                "threshold": th, "precision": np.nan, "n_correct": 0, "n_matches": 0, "kind": kind,
                "note": f"unavailable: {reason}",
            }))
            continue
        for (i, j), m in sorted(results.items()):
            dist = _distances(mvset.cameras, i, j, m.pts0, m.pts1, kind)
            n, correct = _counts(dist, np.zeros(len(dist), dtype=np.int64), 1, th)
            keys = {"method": [name], "layer": [None], "step": [None], "src": [i], "tgt": [j],
                    "view_angle": [_view_angle(mvset.cameras, i, j)]}
            df = _rows(keys, n, correct, th)
            df["kind"], df["note"] = kind, ""
            frames.append(df)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


# ------------------------------------------------------------------------------------------ ground truth
def pck_record(
    rec,
    depth: torch.Tensor,
    cameras=None,
    thresholds: Sequence[float] = (1.0, 2.0, 5.0, 10.0),
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
        rec: the record (of a rendered scene, e.g. from :func:`probe_rendered`).
        depth: ``(V, H, W)`` z_cam depth (``+inf`` background) of the images the record saw.
        images: ``(V, 3, H, W)``; needed for the appearance control (skipped without).
        kept_only: count only kept native matches (the controls always match every token).

    Returns:
        Long DataFrame: method, layer, step, timestep, src, tgt, view_angle, displacement, threshold,
        unit, pck, n_correct, n_points. Controls have layer/step None and use the finest recorded grid.
    """
    from ..geometry.correspondences import ground_truth_match_for

    rec = _as_record(rec)
    cams = _cameras(rec, cameras)
    check_choice("unit", unit, ("px", "tokens"))
    th = _thresholds(thresholds)
    depth = torch.as_tensor(depth)
    if depth.ndim != 3 or depth.shape[0] != rec.num_images or tuple(depth.shape[1:]) != rec.image_size:
        raise ShapeError(f"depth: expected ({rec.num_images}, {rec.image_size[0]}, {rec.image_size[1]}), got {describe(depth)}")
    edges = np.asarray(sorted(float(b) for b in displacement_bins))
    labels = [f"<{edges[0]:g}"] if len(edges) else ["all"]
    labels += [f"[{a:g},{b:g})" for a, b in zip(edges[:-1], edges[1:])]
    labels += [f">={edges[-1]:g}"] if len(edges) else []
    ds = rec.ds
    control_layer = _control_layer(rec, None)
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
        if layer == control_layer:
            methods += [(c, control_matches(c, rec.num_images, (h, w), images=images, seed=seed).numpy())
                        for c in controls if not (c == "appearance" and images is None)]
        for i, j in _pairs(rec.num_images):
            gt, valid = ground_truth_match_for(depth[i], cams[i], depth[j], cams[j], torch.from_numpy(centres),
                                               depth_tol=depth_tol)
            gt, valid = gt.numpy(), valid.numpy()
            moved = np.linalg.norm(gt - centres, axis=1) / pitch
            bin_of = np.searchsorted(edges, moved, side="right")  # NaN (invalid) lands past the end: masked
            angle = _view_angle(cams, i, j)
            for method, index in methods:
                if method == "native":
                    pred = np.stack([mx[:, i, j], my[:, i, j]], axis=-1)  # (S, H', N, 2)
                    use = valid[None, None] & ~np.isnan(pred[..., 0])
                    if kept_only:
                        use &= kp[:, i, j]
                    s_idx, _, n_idx = np.nonzero(use)
                    err = np.linalg.norm(pred[use] - gt[n_idx], axis=1) / scale
                    group = s_idx * len(labels) + bin_of[n_idx]
                    n, correct = _counts(err, group, len(rec.steps) * len(labels), th)
                    g_step = np.repeat(np.arange(len(rec.steps)), len(labels))
                    keys = {"method": np.full(len(g_step), "native", dtype=object),
                            "layer": np.full(len(g_step), layer, dtype=object),
                            "step": np.asarray(rec.steps)[g_step], "timestep": ds["timestep"].values[g_step]}
                else:
                    ok = valid & (index[i, j] >= 0)
                    n_idx = np.nonzero(ok)[0]
                    err = np.linalg.norm(centres[index[i, j][n_idx]] - gt[n_idx], axis=1) / scale
                    n, correct = _counts(err, bin_of[n_idx], len(labels), th)
                    keys = {"method": np.full(len(labels), method, dtype=object), "layer": [None] * len(labels),
                            "step": [None] * len(labels), "timestep": np.full(len(labels), np.nan)}
                    g_step = np.zeros(len(labels), dtype=np.int64)
                groups = len(g_step)
                keys.update(src=np.full(groups, i), tgt=np.full(groups, j), view_angle=np.full(groups, angle),
                            displacement=np.asarray(labels * (groups // len(labels)), dtype=object))
                df = _rows(keys, n, correct, th).rename(columns={"precision": "pck", "n_matches": "n_points"})
                frames.append(df)
    out = pd.concat(frames, ignore_index=True)
    out.insert(out.columns.get_loc("threshold") + 1, "unit", unit)
    return out


def probe_rendered(
    pipe,
    mvset,
    t: float,
    layers: Sequence[str] | None = None,
    seed: int = 0,
    guidance_scale: float = 1.0,
    batch_index: int | None = None,
    **matching,
):
    """DIFT-style probe of a rendered scene: noise its views to time ``t`` and run one model forward.

    ``x_t = (1 - t) x_0 + t eps`` (rectified flow; ``x_0`` the images in the model's [-1, 1] range,
    ``eps`` from ``torch.Generator().manual_seed(seed)``), conditioned on the set's cameras and prompt;
    one call of ``pipe.velocity`` (guidance 1 by default: the conditional branch alone). Returns the
    :class:`ProbeRecord` (one step, ``timestep`` = t) with the set's prompt, seed and cameras attached.
    Needs a :class:`corrlab.model.CorrlabPipeline` (or anything with its ``velocity``, ``encode_prompt``
    and ``ray_embeds``).
    """
    from .recording import probe

    mvset = _as_set(mvset)
    if not all(hasattr(pipe, a) for a in ("velocity", "encode_prompt", "ray_embeds")):
        raise CorrlabError(f"pipe: expected a CorrlabPipeline (velocity, encode_prompt, ray_embeds), got {describe(pipe)}")
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0.0 <= float(t) <= 1.0:
        raise ValueRangeError(f"t: expected a time in [0, 1] (1 = pure noise), got {t!r}")
    if mvset.height != mvset.width:
        raise ShapeError(f"mvset: expected square views, got {mvset.height}x{mvset.width}")
    g = torch.Generator().manual_seed(int(seed))
    x0 = mvset.images[None] * 2.0 - 1.0
    eps = torch.randn(x0.shape, generator=g, dtype=x0.dtype)
    x_t = ((1.0 - t) * x0 + t * eps).to(pipe.device)
    with torch.no_grad(), probe(pipe, layers=layers, batch_index=batch_index, **matching) as rec:
        pipe.velocity(x_t, float(t), pipe.encode_prompt([mvset.prompt]), pipe.ray_embeds(mvset.cameras, mvset.height)[None],
                      guidance_scale=guidance_scale)
    rec.set_meta(prompt=mvset.prompt, seed=int(seed), cameras=mvset.cameras)
    return rec


# ------------------------------------------------------------------------------------------ comparison
def pool_scores(df: pd.DataFrame, by: Sequence[str] = ("method", "layer", "step", "threshold")) -> pd.DataFrame:
    """Pool per-pair rows into one row per group: ``precision = sum n_correct / sum n_matches``."""
    by = list(by)
    missing = sorted({"n_correct", "n_matches", *by} - set(df.columns))
    if missing:
        raise CorrlabError(f"df: expected columns {by + ['n_correct', 'n_matches']}, missing {missing}")
    out = df.groupby(by, dropna=False, sort=False).agg(
        n_correct=("n_correct", "sum"), n_matches=("n_matches", "sum"), n_pairs=("n_matches", "size")
    ).reset_index()
    out.insert(len(by), "precision", out["n_correct"] / out["n_matches"].where(out["n_matches"] > 0))
    out = out.astype({c: object for c in ("layer", "step") if c in out.columns})
    for c in ("layer", "step"):
        if c in out.columns:
            out[c] = out[c].where(out[c].notna(), None)
    return out


def best_layer_step(native: pd.DataFrame, select_threshold: float = 5.0) -> tuple[str, int]:
    """The (layer, step) with the highest pooled precision at ``select_threshold`` (ties: more correct)."""
    pooled = pool_scores(native[native["threshold"] == float(select_threshold)])
    pooled = pooled[pooled["n_matches"] > 0]
    if pooled.empty:
        raise CorrlabError(f"select_threshold: no native matches scored at {select_threshold} px (check thresholds)")
    best = pooled.sort_values(["precision", "n_correct"], ascending=False, kind="stable").iloc[0]
    return str(best["layer"]), int(best["step"])


def comparison_table(
    sets: Iterable,
    records: Iterable | None = None,
    thresholds: Sequence[float] = tuple(range(1, 11)),
    kind: str = "symmetric",
    layer: str | None = None,
    step: int | None = None,
    baselines: Sequence[str] = ("sift", "superpoint", "disk+lightglue"),
    controls: Sequence[str] = ("identity", "chance"),
    kept_only: bool = True,
    select_threshold: float = 5.0,
    progress: bool = True,
) -> pd.DataFrame:
    """The headline comparison: native correspondences vs baselines on the same generated images.

    Args:
        sets: generated sets (``MultiViewSet`` or set directories).
        records: their probe records (``ProbeRecord`` or paths); default: ``DIR/record.nc`` of each directory.
        thresholds: pixel thresholds (default 1..10).
        layer, step: an extra chosen native (layer, step) to report next to the best one.
        baselines: matcher names (unavailable ones are rows with a ``note``).
        controls: trivial matchers on the native grid; the identity matcher's epipolar precision belongs
            next to every native number (shared-elevation cameras make it high).
        select_threshold: the best (layer, step) maximises pooled precision at this threshold (5 px).

    Returns:
        Long DataFrame pooled over sets and ordered pairs: method (``native-best``, ``native-chosen``,
        control and baseline names), layer, step, threshold, precision, n_correct, n_matches, n_sets, note.
    """
    sets = list(sets)
    if records is None:
        if not all(isinstance(s, (str, os.PathLike)) for s in sets):
            raise CorrlabError("records: expected records for in-memory sets (only set directories imply DIR/record.nc)")
        records = [Path(s) / "record.nc" for s in sets]
    records = list(records)
    if len(records) != len(sets) or not sets:
        raise CorrlabError(f"records: expected one record per set ({len(sets)} sets), got {len(records)}")
    th = _thresholds(thresholds)
    if float(select_threshold) not in th.tolist():
        raise ValueRangeError(f"select_threshold: expected one of the thresholds {th.tolist()}, got {select_threshold!r}")
    native, others = [], []
    for s, r in tqdm(list(zip(sets, records)), desc="scoring sets", disable=not progress, leave=False):
        mvset, rec = _as_set(s), _as_record(r)
        native.append(score_record(rec, mvset.cameras, th, kind, kept_only))
        if controls:
            others.append(score_controls(rec, mvset.images, mvset.cameras, th, kind, controls=controls).assign(note=""))
        if baselines:
            others.append(score_baselines_on_set(mvset, baselines, th, kind))
    native_df = pd.concat(native, ignore_index=True)
    best = best_layer_step(native_df, select_threshold)
    picks = [("native-best", best)]
    if layer is not None or step is not None:
        if layer is None or step is None:
            raise CorrlabError(f"layer, step: expected both for a chosen native (layer, step), got {layer!r}, {step!r}")
        if not ((native_df["layer"] == layer) & (native_df["step"] == step)).any():
            raise CorrlabError(f"layer, step: ({layer!r}, {step!r}) is not in the records")
        picks.append(("native-chosen", (layer, int(step))))
    n_sets = len(sets)
    frames = []
    for name, (lay, stp) in picks:
        sub = native_df[(native_df["layer"] == lay) & (native_df["step"] == stp)]
        pooled = pool_scores(sub, ("layer", "step", "threshold"))
        pooled.insert(0, "method", name)
        frames.append(pooled.assign(note=""))
    if others:
        rest = pd.concat(others, ignore_index=True)
        pooled = pool_scores(rest, ("method", "threshold", "note"))
        pooled.insert(1, "layer", None)
        pooled.insert(2, "step", None)
        frames.append(pooled)
    out = pd.concat(frames, ignore_index=True)
    out["n_sets"] = n_sets
    return out[["method", "layer", "step", "threshold", "precision", "n_correct", "n_matches", "n_sets", "note"]]
