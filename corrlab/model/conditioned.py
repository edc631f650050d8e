"""The paper's image-conditioned setting on exact ground truth: view 0 given, the others generated.

Two measurements of the embedded model on held-out rendered scenes (seeds >= ``HELD_OUT_SEED_START``):

* :func:`native_hits` — native correspondences at time ``t``: view 0 enters clean (the reference, flagged
  as given), view 1 is the rendered truth noised to ``t``; one forward pass read by the taps
  (:func:`corrlab.model.native.layer_matches`: the matcher's ``heads="mean"``) gives, per multi-view attention layer, each token of the
  generated view 1 its match in the reference view 0. A query is a token of view 1 whose centre lies on
  the object with a visible ground-truth match in view 0; it is a hit when the match is within 1 token
  (Chebyshev) of the true token at that layer's grid. "far" queries move >= ``far_tokens`` tokens.
  Controls on the same queries: chance, same position, camera geometry only (the point on the query ray
  nearest the object centre, reprojected), appearance nearest neighbour on the noisy input and on clean
  pixels.
* :func:`reconstruction` — generate views 1..V-1 from view 0 under the true cameras and compare with the
  rendered truth of the same scene: PSNR, SSIM, object-mask IoU (a pixel is "object" when it differs
  from the background colour), beside the controls "copy the reference view" and "mean image" (the
  per-pixel mean of the other evaluated scenes' target views).

Both return tidy pandas tables (one row per scene x method [x layer x subset]).
"""
from __future__ import annotations

import math
import os

import pandas as pd
import torch
from tqdm.auto import tqdm

from ..errors import CorrlabError, ValueRangeError
from ..geometry.epipolar import relative_view_angle
from .native import (
    appearance_nn,
    chance_rate,
    epipolar_appearance_nn,
    geometry_guess,
    hits,
    layer_matches,
    pixel_to_index,
    token_queries,
)
from .rays import token_centres

__all__ = ["native_hits", "pool_hits", "at_grid", "reconstruction", "psnr", "ssim", "object_mask", "tracking_figures"]


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of images ``a, b (3, H, W)`` in [0, 1]."""
    mse = float((a.double() - b.double()).pow(2).mean())
    return float("inf") if mse == 0 else 10.0 * math.log10(1.0 / mse)


def ssim(a: torch.Tensor, b: torch.Tensor, window: int = 7) -> float:
    """Mean SSIM of ``a, b (3, H, W)`` in [0, 1] (uniform ``window`` x ``window`` box, constants of Wang et al.)."""
    x, y = a.double()[None], b.double()[None]
    pad = window // 2
    pool = lambda z: torch.nn.functional.avg_pool2d(z, window, 1, pad, count_include_pad=False)  # noqa: E731
    mx, my = pool(x), pool(y)
    vx, vy, cxy = pool(x * x) - mx * mx, pool(y * y) - my * my, pool(x * y) - mx * my
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return float(s.mean())


def object_mask(img: torch.Tensor, background: torch.Tensor, tol: float = 0.08) -> torch.Tensor:
    """``(H, W)`` bool: pixels of ``img (3, H, W)`` farther than ``tol`` (max over channels) from ``background (3,)``."""
    return (img - background[:, None, None]).abs().amax(dim=0) > tol


def _iou(a: torch.Tensor, b: torch.Tensor) -> float:
    union = float((a | b).sum())
    return float("nan") if union == 0 else float((a & b).sum()) / union


def at_grid(df: pd.DataFrame, grid: str | None = None) -> pd.DataFrame:
    """The rows of a tidy table with a ``grid`` column (``"16x16"``) at one token grid: ``grid``, or the finest
    grid present when None (the paper's protocol: the highest-resolution multi-image layers, since a coarse grid
    makes "within 1 token" a larger pixel radius). A grid not in the table is an error naming the ones that are."""
    grids = sorted(df.grid.unique(), key=lambda g: int(g.split("x")[0]) * int(g.split("x")[1]))
    if grid is None:
        if not grids:
            raise ValueRangeError("grid: the table has no rows")
        grid = grids[-1]
    elif grid not in grids:
        raise ValueRangeError(f"grid: expected one of the layers' grids {grids}, got {grid!r}")
    return df[df.grid == grid]


def native_hits(model, n_sets: int = 16, t: float = 0.5, far_tokens: float = 2.0, seed_start: int | None = None,
                layout: str = "train", progress: bool = False) -> pd.DataFrame:
    """Tidy rows ``(scene, t, method, layer, subset, hits, n)``: native matches view 1 -> reference view 0.

    ``model`` is a reference-conditioned :class:`MultiViewUNet` or :class:`MultiViewDiT`.
    """
    from ..scenes import render_scene
    from .pipeline import CorrlabPipeline
    from .train import HELD_OUT_SEED_START

    pipe = CorrlabPipeline(model)
    if not pipe.supports_reference:
        raise CorrlabError("model: expected a reference-conditioned model (given views), got one without")
    seed_start = HELD_OUT_SEED_START + 20_000 if seed_start is None else seed_start
    size = pipe.sample_size
    rows = []
    was_training = model.training
    model.eval()
    try:
        for i in tqdm(range(n_sets), desc="native hits", disable=not progress):
            seed = seed_start + i
            mvs = render_scene(seed, 2, size, layout)
            x0 = mvs.images * 2 - 1
            noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
            x = x0.clone()
            x[1] = (1 - t) * x0[1] + t * noise[1]
            given = torch.tensor([[True, False]])
            rays = pipe.ray_embeds(mvs.cameras, size)[None]
            pe = model.encode_prompt([mvs.prompt])
            matches = layer_matches(model, x, t, pe, rays, src=1, dst=0, given=given)
            centre = torch.tensor(mvs.meta["scene"]["position"], dtype=torch.float64)
            x_noisy = (x.clamp(-1, 1) + 1) / 2
            controls: dict[int, tuple] = {}  # per token size p: the queries and the controls (layers share grids)
            for layer, (index, (h, w)) in matches.items():
                p = size // h
                if p not in controls:
                    q = token_queries(mvs, 1, 0, p)
                    if len(q.src_idx) == 0:
                        controls[p] = (q, None)
                        continue
                    src_pix = token_centres(size, size, p)[q.src_idx]
                    controls[p] = (q, {
                        "chance": chance_rate(q.gt_pix, p, h, w),
                        "same position": hits(q.src_idx, q.gt_pix, p, h, w).double(),
                        "camera geometry only": hits(
                            pixel_to_index(geometry_guess(mvs.cameras[1], mvs.cameras[0], src_pix, centre), p, h, w),
                            q.gt_pix, p, h, w).double(),
                        "appearance NN (noisy input)":
                            hits(appearance_nn(x_noisy, 1, 0, p)[q.src_idx], q.gt_pix, p, h, w).double(),
                        "appearance NN (clean)":
                            hits(appearance_nn(mvs.images, 1, 0, p)[q.src_idx], q.gt_pix, p, h, w).double(),
                        "epipolar + appearance NN (noisy input)": hits(
                            epipolar_appearance_nn(x_noisy, mvs.cameras, 1, 0, p)[q.src_idx], q.gt_pix, p, h, w
                        ).double(),
                        "epipolar + appearance NN (clean)": hits(
                            epipolar_appearance_nn(mvs.images, mvs.cameras, 1, 0, p)[q.src_idx], q.gt_pix, p, h, w
                        ).double(),
                    })
                q, static = controls[p]
                if static is None:
                    continue
                far = q.moved >= far_tokens
                methods = {"native": hits(index[q.src_idx], q.gt_pix, p, h, w).double(), **static}
                for method, hit in methods.items():
                    for subset, m in (("all", torch.ones_like(far)), ("far", far)):
                        rows.append(dict(scene=seed, t=t, method=method, layer=layer, grid=f"{h}x{w}", subset=subset,
                                         hits=float(hit[m].sum()), n=int(m.sum())))
    finally:
        model.train(was_training)
    return pd.DataFrame(rows)


def pool_hits(df: pd.DataFrame) -> pd.DataFrame:
    """Pool :func:`native_hits` rows over scenes: ``share = hits / n`` per (method, layer, t, subset)."""
    out = df.groupby(["method", "layer", "grid", "t", "subset"], sort=False)[["hits", "n"]].sum().reset_index()
    out["share"] = out["hits"] / out["n"].clip(lower=1)
    return out


def reconstruction(pipe, n_sets: int = 16, views: int = 4, steps: int = 20, guidance: float = 1.0,
                   seed_start: int | None = None, layout: str = "train", given=(0,), progress: bool = False,
                   return_sets: bool = False, reference_guidance: float = 1.0):
    """Tidy rows ``(scene, view, view_angle, method, psnr, ssim, iou)`` for generated views vs the rendered truth
    (``view_angle``: degrees between the view's and the first given view's optical axes).

    Methods: ``generated`` (views not in ``given`` generated from the given ones under the true cameras),
    ``copy reference`` (the first given view, unchanged), ``mean image`` (the mean target view of the other
    scenes of the evaluation).
    With ``return_sets`` also returns ``[(truth, generated)]`` :class:`MultiViewSet` pairs.
    ``reference_guidance``: the pipeline's image guidance (1 = off).
    """
    from ..scenes import render_scene
    from .train import HELD_OUT_SEED_START

    seed_start = HELD_OUT_SEED_START + 30_000 if seed_start is None else seed_start
    if n_sets < 2:
        raise CorrlabError(f"n_sets: expected >= 2 (the mean-image control leaves the scene out), got {n_sets}")
    size = pipe.sample_size
    sets = []
    for i in tqdm(range(n_sets), desc="image-conditioned", disable=not progress):
        seed = seed_start + i
        truth = render_scene(seed, views, size, layout)
        ref = {int(v): truth.images[v] for v in given}
        gen = pipe(truth.prompt, cameras=truth.cameras, reference=ref, num_inference_steps=steps,
                   guidance_scale=guidance, seed=seed, progress=False, reference_guidance=reference_guidance)
        sets.append((truth, gen))
    targets = [v for v in range(views) if v not in given]
    total = torch.stack([tr.images[targets].double().mean(0) for tr, _ in sets]).sum(0)
    rows = []
    for i, (truth, gen) in enumerate(sets):
        # "mean image": the mean target view of the OTHER scenes (leave-one-scene-out)
        mean_img = ((total - truth.images[targets].double().mean(0)) / (n_sets - 1)).float()
        bg = truth.images[0][:, 0, 0]  # the renderer's background colour (corner pixel)
        for v in targets:
            gt = truth.images[v]
            gt_mask = truth.masks[v] if truth.masks is not None else object_mask(gt, bg)
            angle = float(relative_view_angle(truth.cameras[given[0]], truth.cameras[v]))
            for method, img in (("generated", gen.images[v]), ("copy reference", truth.images[given[0]]),
                                ("mean image", mean_img)):
                rows.append(dict(scene=truth.seed, view=v, view_angle=angle, method=method, psnr=psnr(img, gt),
                                 ssim=ssim(img, gt), iou=_iou(object_mask(img, bg), gt_mask)))
    df = pd.DataFrame(rows)
    return (df, sets) if return_sets else df


def tracking_figures(model, config=None, n_sets: int = 8, sheet: str | os.PathLike | None = None) -> dict:
    """The training-time tracking figures (JSON-able): native far hits per layer at t = 0.5, the best
    finest-grid layer vs the geometry-only guess at that grid, and image-conditioned PSNR vs the copy-reference
    control (8-step sampling). With ``sheet``, the sample sheet of those generations (reference | generated |
    truth, :func:`corrlab.model.sheets.conditioned_sheet`) is written there as PNG."""
    from .pipeline import CorrlabPipeline

    df = pool_hits(native_hits(model, n_sets=n_sets, t=0.5))
    far = df[df.subset == "far"]
    out = {"n_sets": n_sets}
    for r in far[far.method == "native"].itertuples():
        out[f"{r.layer}/far"] = round(float(r.share), 4)
    # the finest-grid layers (the paper's protocol), with the controls at that grid
    fine = at_grid(far)
    out["best_far"] = round(float(fine[fine.method == "native"].share.max()), 4)
    for method in ("chance", "camera geometry only", "appearance NN (noisy input)"):
        out[method] = round(float(fine[fine.method == method].share.iloc[0]), 4)
    rec, sets = reconstruction(CorrlabPipeline(model), n_sets=max(2, n_sets // 2), views=2, steps=8,
                               return_sets=True)  # restores train mode
    if sheet is not None:
        from .sheets import conditioned_sheet, save_png

        save_png(conditioned_sheet(sets), sheet)
    pooled = rec.groupby("method")[["psnr", "iou"]].mean()
    for method in pooled.index:
        out[f"psnr/{method}"] = round(float(pooled.loc[method, "psnr"]), 3)
        out[f"iou/{method}"] = round(float(pooled.loc[method, "iou"]), 3)
    return out
