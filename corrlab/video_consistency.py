"""Video consistency without cameras and without downloaded weights: optical flow, warp error, flow-scored matches.

>>> from corrlab.video_consistency import flow_consistency, score_record_flow
>>> flow_consistency(frames)               # tidy table, one row per frame pair            # doctest: +SKIP
>>> score_record_flow(rec, frames)         # probed frame-to-frame matches vs optical flow  # doctest: +SKIP

Flow: OpenCV's DIS optical flow (``cv2.DISOpticalFlow_create``, no weights) on grey-level frames.
``flow_ab[y, x] = (dx, dy)`` moves pixel ``(x, y)`` of frame a to ``(x + dx, y + dy)`` in frame b (pixel
centres at integers, corrlab's convention). A pixel is *consistent* when the backward flow brings it home:
``|flow_ab(p) + flow_ba(p + flow_ab(p))| <= fb_threshold`` pixels (forward-backward check; occlusions and
flow failures fail it). Warp error: frame b warped back onto frame a, ``warped(p) = b(p + flow_ab(p))``
(bilinear), compared with ``a`` on the consistent pixels (PSNR, SSIM with an 11 x 11 Gaussian window of
sigma 1.5). A static video gives infinite PSNR and SSIM 1; a flicker or an object that changes look
under a good flow lowers both.

How this relates to VBench's *subject consistency*: VBench embeds every frame with DINO (ViT-B/16) and
averages, over frames t > 0, ``(cos(f_t, f_0) + cos(f_t, f_{t-1})) / 2``. That needs DINO weights (a
download); this module's flow/warp measure needs none and looks at pixels, not semantics: it catches
flicker, texture swimming and broken motion that DINO features forgive, and misses identity drift
that a smooth warp can explain. :func:`subject_consistency` computes VBench's formula for any feature
function; register DINO there where its weights are installed (:data:`FRAME_FEATURES`,
:func:`register_frame_features`) and :func:`flow_consistency` adds the column.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
import torch

from .errors import CorrlabError, ShapeError, ValueRangeError, check_choice, describe
from .evaluation.schema import DEFAULT_THRESHOLDS

__all__ = [
    "FRAME_FEATURES",
    "register_frame_features",
    "as_frames",
    "optical_flow",
    "forward_backward_error",
    "warp_back",
    "masked_psnr",
    "masked_ssim",
    "frame_pairs",
    "flow_consistency",
    "subject_consistency",
    "latent_frame_indices",
    "score_record_flow",
]

#: name -> ``features(frames (F, 3, H, W) float32 in [0, 1]) -> (F, D)``; e.g. a DINO ViT where installed.
FRAME_FEATURES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}


def register_frame_features(name: str, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Register a per-frame feature extractor for :func:`subject_consistency` columns of :func:`flow_consistency`.

    ``fn(frames (F, 3, H, W) float32 in [0, 1]) -> (F, D)``. VBench subject consistency uses DINO ViT-B/16
    features: register it here when its weights are installed (corrlab downloads nothing).
    """
    if not isinstance(name, str) or not name or not callable(fn):
        raise CorrlabError(f"name, fn: expected a non-empty name and a callable, got {describe(name)} and {describe(fn)}")
    FRAME_FEATURES[name] = fn


def as_frames(frames: Any) -> torch.Tensor:
    """``(F, 3, H, W)`` float32 in [0, 1] from a tensor/array shaped that way or ``(F, H, W, 3)``."""
    x = torch.as_tensor(np.asarray(frames) if not isinstance(frames, torch.Tensor) else frames)
    if x.ndim == 4 and x.shape[-1] == 3 and x.shape[1] != 3:
        x = x.permute(0, 3, 1, 2)
    if x.ndim != 4 or x.shape[1] != 3 or x.shape[0] < 2:
        raise ShapeError(f"frames: expected at least 2 frames shaped (F, 3, H, W) or (F, H, W, 3), got {describe(frames)}")
    if not x.is_floating_point():
        x = x.float() / 255.0
    x = x.detach().to("cpu", torch.float32)
    if not bool(torch.isfinite(x).all()) or float(x.min()) < -1e-6 or float(x.max()) > 1 + 1e-6:
        raise ValueRangeError(f"frames: expected finite values in [0, 1], got range [{float(x.min()):.4g}, {float(x.max()):.4g}]")
    return x.clamp(0, 1)


def _grey_u8(frame: torch.Tensor) -> np.ndarray:
    rgb = frame.permute(1, 2, 0).numpy()
    grey = 0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]
    return np.ascontiguousarray(np.round(grey * 255.0).clip(0, 255).astype(np.uint8))


def optical_flow(frame_a: torch.Tensor, frame_b: torch.Tensor, preset: str = "medium") -> np.ndarray:
    """DIS optical flow from ``frame_a (3, H, W)`` to ``frame_b``: ``(H, W, 2)`` float32 ``(dx, dy)`` pixels.

    ``preset``: ``"ultrafast"``, ``"fast"`` or ``"medium"`` (OpenCV's DIS presets; default medium).
    """
    import cv2

    presets = {"ultrafast": cv2.DISOPTICAL_FLOW_PRESET_ULTRAFAST, "fast": cv2.DISOPTICAL_FLOW_PRESET_FAST,
               "medium": cv2.DISOPTICAL_FLOW_PRESET_MEDIUM}
    check_choice("preset", preset, list(presets))
    if frame_a.shape != frame_b.shape or frame_a.ndim != 3 or frame_a.shape[0] != 3:
        raise ShapeError(f"frame_a, frame_b: expected two (3, H, W) frames, got {describe(frame_a)} and {describe(frame_b)}")
    if min(frame_a.shape[1:]) < 16:
        raise ShapeError(f"frame_a: optical flow needs frames of at least 16 x 16 pixels, got {describe(frame_a)}")
    dis = cv2.DISOpticalFlow_create(presets[preset])
    dis.setFinestScale(0)  # the presets stop at half resolution; small generated frames need full resolution
    return dis.calc(_grey_u8(frame_a), _grey_u8(frame_b), None).astype(np.float32)


def _sample(field: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Bilinear sample of ``field (H, W, C)`` at float pixel positions (border replicated)."""
    import cv2

    return cv2.remap(field, x.astype(np.float32), y.astype(np.float32), cv2.INTER_LINEAR,
                     borderMode=cv2.BORDER_REPLICATE)


def _grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    return xx, yy


def forward_backward_error(flow_ab: np.ndarray, flow_ba: np.ndarray) -> np.ndarray:
    """``(H, W)`` pixels: ``|flow_ab(p) + flow_ba(p + flow_ab(p))|``, infinite where ``p + flow_ab(p)`` leaves the image."""
    h, w = flow_ab.shape[:2]
    xx, yy = _grid(h, w)
    tx, ty = xx + flow_ab[..., 0], yy + flow_ab[..., 1]
    back = _sample(flow_ba, tx, ty)
    err = np.linalg.norm(flow_ab + back, axis=-1)
    inside = (tx >= -0.5) & (tx <= w - 0.5) & (ty >= -0.5) & (ty <= h - 0.5)
    return np.where(inside, err, np.inf).astype(np.float32)


def warp_back(frame_b: torch.Tensor, flow_ab: np.ndarray) -> torch.Tensor:
    """Frame b brought onto frame a's pixels: ``warped(p) = b(p + flow_ab(p))`` (bilinear), ``(3, H, W)``."""
    h, w = flow_ab.shape[:2]
    xx, yy = _grid(h, w)
    img = np.ascontiguousarray(frame_b.permute(1, 2, 0).numpy())
    out = _sample(img, xx + flow_ab[..., 0], yy + flow_ab[..., 1])
    return torch.from_numpy(np.ascontiguousarray(out)).permute(2, 0, 1)


def masked_psnr(a: torch.Tensor, b: torch.Tensor, mask: np.ndarray) -> float:
    """PSNR (dB, peak 1) of ``a`` vs ``b (3, H, W)`` over the pixels where ``mask (H, W)``; NaN on an empty mask."""
    m = torch.from_numpy(np.asarray(mask, dtype=bool))
    if not bool(m.any()):
        return float("nan")
    mse = float(((a - b) ** 2)[:, m].mean())
    return float("inf") if mse == 0 else 10.0 * math.log10(1.0 / mse)


def masked_ssim(a: torch.Tensor, b: torch.Tensor, mask: np.ndarray) -> float:
    """Mean SSIM (11 x 11 Gaussian window, sigma 1.5, channels averaged) over ``mask``; NaN on an empty mask."""
    import cv2

    m = np.asarray(mask, dtype=bool)
    if not m.any():
        return float("nan")
    c1, c2 = 0.01**2, 0.03**2
    blur = lambda z: cv2.GaussianBlur(z, (11, 11), 1.5, borderType=cv2.BORDER_REFLECT)  # noqa: E731
    x = np.ascontiguousarray(a.permute(1, 2, 0).numpy().astype(np.float64))
    y = np.ascontiguousarray(b.permute(1, 2, 0).numpy().astype(np.float64))
    mx, my = blur(x), blur(y)
    sxx, syy, sxy = blur(x * x) - mx * mx, blur(y * y) - my * my, blur(x * y) - mx * my
    ssim = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
    return float(ssim.mean(axis=-1)[m].mean())


def frame_pairs(num_frames: int, pairs: str | Sequence[tuple[int, int]] = "consecutive") -> list[tuple[int, int]]:
    """``"consecutive"`` ((0, 1), (1, 2), ...), ``"first"`` ((0, 1), (0, 2), ...), ``"all"`` ordered pairs, or a list."""
    if isinstance(pairs, str):
        check_choice("pairs", pairs, ["consecutive", "first", "all"])
        if pairs == "consecutive":
            return [(i, i + 1) for i in range(num_frames - 1)]
        if pairs == "first":
            return [(0, j) for j in range(1, num_frames)]
        return [(i, j) for i in range(num_frames) for j in range(num_frames) if i != j]
    out = []
    for p in pairs:
        i, j = (int(v) for v in p)
        if not (0 <= i < num_frames and 0 <= j < num_frames) or i == j:
            raise ValueRangeError(f"pairs: expected pairs of distinct frame indices in [0, {num_frames}), got {p!r}")
        out.append((i, j))
    return out


def _check_threshold(fb_threshold: float) -> float:
    if isinstance(fb_threshold, bool) or not isinstance(fb_threshold, (int, float)) or not fb_threshold > 0:
        raise ValueRangeError(f"fb_threshold: expected a positive number of pixels, got {fb_threshold!r}")
    return float(fb_threshold)


class _FlowCache:
    def __init__(self, frames: torch.Tensor, preset: str):
        self.frames, self.preset, self.flows = frames, preset, {}

    def flow(self, i: int, j: int) -> np.ndarray:
        if (i, j) not in self.flows:
            self.flows[(i, j)] = optical_flow(self.frames[i], self.frames[j], self.preset)
        return self.flows[(i, j)]

    def consistent(self, i: int, j: int, fb_threshold: float) -> tuple[np.ndarray, np.ndarray]:
        f = self.flow(i, j)
        return f, forward_backward_error(f, self.flow(j, i)) <= fb_threshold


def flow_consistency(
    frames: Any,
    pairs: str | Sequence[tuple[int, int]] = "consecutive",
    fb_threshold: float = 1.0,
    preset: str = "medium",
    features: str | Callable | None = None,
    masks: Any = None,
) -> pd.DataFrame:
    """Per frame pair: flow, forward-backward consistency and warp error (see the module docstring).

    Args:
        frames: ``(F, 3, H, W)`` or ``(F, H, W, 3)`` in [0, 1] (uint8 is divided by 255).
        pairs: which ordered pairs (see :func:`frame_pairs`; default consecutive).
        fb_threshold: forward-backward error (pixels) up to which a pixel counts as consistent (default 1).
        preset: DIS preset.
        features: optional name in :data:`FRAME_FEATURES` or a feature callable: adds the video-level
            ``subject_consistency`` (VBench's formula) as a column (the same value on every row).
        masks: optional ``(F, H, W)`` bool subject masks (e.g. a rendered set's ``masks``): every statistic
            is then taken over the consistent pixels inside the source frame's mask.

    Returns:
        DataFrame, one row per pair: ``src``, ``tgt``, ``consistent_fraction`` (of all pixels, or of the mask),
        ``n_consistent``, ``flow_dx``, ``flow_dy`` (mean flow over consistent pixels), ``flow_magnitude``
        (mean length), ``fb_error_median`` (pixels, over pixels whose target stays inside), ``psnr`` (dB) and
        ``ssim`` of the warp on the consistent pixels, ``fb_threshold``; plus ``subject_consistency``.
    """
    x = as_frames(frames)
    th = _check_threshold(fb_threshold)
    cache = _FlowCache(x, preset)
    if masks is not None:
        masks = np.asarray(torch.as_tensor(masks).cpu(), dtype=bool)
        if masks.shape != (x.shape[0], *x.shape[2:]):
            raise ShapeError(f"masks: expected shape {(x.shape[0], *x.shape[2:])} (F, H, W), got {describe(masks)}")
    rows = []
    for i, j in frame_pairs(x.shape[0], pairs):
        f = cache.flow(i, j)
        fb = forward_backward_error(f, cache.flow(j, i))
        ok = fb <= th
        if masks is not None:
            ok &= masks[i]
        warped = warp_back(x[j], f)
        n = int(ok.sum())
        finite = np.isfinite(fb)
        rows.append({
            "src": i, "tgt": j,
            "consistent_fraction": n / (ok.size if masks is None else max(int(masks[i].sum()), 1)),
            "n_consistent": n,
            "flow_dx": float(f[..., 0][ok].mean()) if n else float("nan"),
            "flow_dy": float(f[..., 1][ok].mean()) if n else float("nan"),
            "flow_magnitude": float(np.linalg.norm(f, axis=-1)[ok].mean()) if n else float("nan"),
            "fb_error_median": float(np.median(fb[finite])) if finite.any() else float("nan"),
            "psnr": masked_psnr(x[i], warped, ok),
            "ssim": masked_ssim(x[i], warped, ok),
            "fb_threshold": th,
        })
    df = pd.DataFrame(rows)
    if features is not None:
        df["subject_consistency"] = subject_consistency(x, features)
    return df


def subject_consistency(frames: Any, features: str | Callable) -> float:
    """VBench's subject-consistency formula for any per-frame feature function.

    ``mean over t >= 1 of (cos(f_t, f_0) + cos(f_t, f_{t-1})) / 2`` with ``f = features(frames) (F, D)``
    (VBench: DINO ViT-B/16 features, cosine clipped at 0). ``features``: a callable or a name registered in
    :data:`FRAME_FEATURES`. corrlab ships no DINO weights: register them where installed.
    """
    x = as_frames(frames)
    if isinstance(features, str):
        if features not in FRAME_FEATURES:
            raise CorrlabError(
                f"features: no frame feature extractor named {features!r}; registered: {sorted(FRAME_FEATURES)}. "
                f"Register one with corrlab.video_consistency.register_frame_features(name, fn) (e.g. DINO where "
                f"its weights are installed; corrlab downloads nothing)"
            )
        features = FRAME_FEATURES[features]
    if not callable(features):
        raise CorrlabError(f"features: expected a callable or a registered name, got {describe(features)}")
    f = torch.as_tensor(features(x)).float().reshape(x.shape[0], -1)
    f = torch.nn.functional.normalize(f, dim=1)
    first = (f[1:] * f[0]).sum(1).clamp(min=0)
    prev = (f[1:] * f[:-1]).sum(1).clamp(min=0)
    return float(((first + prev) / 2).mean())


def latent_frame_indices(num_latent_frames: int, num_frames: int, temporal_scale: int = 4) -> list[int]:
    """Video frame shown for each latent frame of a causal video VAE (Wan: frame 0 alone, then groups of
    ``temporal_scale``): latent 0 -> frame 0, latent k -> frame ``temporal_scale * k`` (the last of its group)."""
    return [min(temporal_scale * k, num_frames - 1) for k in range(num_latent_frames)]


def score_record_flow(
    rec,
    frames: Any,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    fb_threshold: float = 1.0,
    kept_only: bool = True,
    preset: str = "medium",
) -> pd.DataFrame:
    """Frame-to-frame native matches of a probe record scored against optical flow.

    ``frames``: the record's images, one per recorded image (``(V, 3, H, W)``; for a video VAE pick them with
    :func:`latent_frame_indices`), resized bilinearly to the record's image size if needed. For every
    (layer, step, src, tgt) the source token centre ``p`` is expected at ``p + flow_src->tgt(p)``; tokens whose
    centre fails the forward-backward check (``fb_threshold`` px) are left out. A match is correct when it
    lies within ``threshold`` pixels (Euclidean) of the expected point.

    Returns:
        Long DataFrame, one row per (layer, step, src, tgt, threshold): method ("native"), layer, step,
        timestep, src, tgt, threshold, precision (NaN when no match was scored), n_correct, n_matches,
        n_flow_valid (source tokens with a consistent flow), kind ("flow").
    """
    from .probing.record import ProbeRecord

    if isinstance(rec, (str, bytes)) or hasattr(rec, "__fspath__"):
        rec = ProbeRecord.load(rec)
    if not isinstance(rec, ProbeRecord):
        raise CorrlabError(f"rec: expected a ProbeRecord or the path of a saved one, got {describe(rec)}")
    x = as_frames(frames)
    V = rec.num_images
    if x.shape[0] != V:
        raise ShapeError(f"frames: expected {V} frames (one per recorded image), got {describe(x)}")
    H, W = rec.image_size
    if tuple(x.shape[2:]) != (H, W):
        x = torch.nn.functional.interpolate(x, size=(H, W), mode="bilinear", align_corners=False).clamp(0, 1)
    th = np.asarray(sorted(float(t) for t in thresholds), dtype=np.float64)
    if th.size == 0 or not np.all(th > 0):
        raise ValueRangeError(f"thresholds: expected positive pixel thresholds, got {list(thresholds)!r}")
    fbt = _check_threshold(fb_threshold)
    cache = _FlowCache(x, preset)
    ds = rec.ds
    mx, my, kept, mrow = ds["match_x"].values, ds["match_y"].values, ds["kept"].values, ds["match_row"].values
    sx, sy = ds["src_x"].values, ds["src_y"].values
    timesteps = ds["timestep"].values
    rows = []
    for i in range(V):
        for j in range(V):
            if i == j:
                continue
            flow, ok = cache.consistent(i, j, fbt)
            for li, layer in enumerate(rec.layers):
                gh, gw = rec.grid(layer)
                px, py = sx[li, :gh, :gw], sy[li, :gh, :gw]
                f = _sample(flow, px, py)  # (gh, gw, 2)
                ex, ey = px + f[..., 0], py + f[..., 1]
                valid_src = ok[np.clip(np.round(py).astype(int), 0, H - 1), np.clip(np.round(px).astype(int), 0, W - 1)]
                hp = int(ds["num_heads"].values[li])
                for si, step in enumerate(rec.steps):
                    sel = (mrow[li, si, i, j, :hp, :gh, :gw] >= 0) & valid_src[None]
                    if kept_only:
                        sel &= kept[li, si, i, j, :hp, :gh, :gw]
                    d = np.hypot(mx[li, si, i, j, :hp, :gh, :gw] - ex[None], my[li, si, i, j, :hp, :gh, :gw] - ey[None])[sel]
                    n = int(d.size)
                    for t in th:
                        c = int((d <= t).sum())
                        rows.append({
                            "method": "native", "layer": layer, "step": int(step), "timestep": float(timesteps[si]),
                            "src": i, "tgt": j, "threshold": float(t), "precision": c / n if n else float("nan"),
                            "n_correct": c, "n_matches": n, "n_flow_valid": int(valid_src.sum()), "kind": "flow",
                        })
    return pd.DataFrame(rows)
