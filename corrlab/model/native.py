"""Native correspondences of the embedded models on rendered sets, and the controls they are judged against.

For a rendered set noised to time ``t``, every multi-view attention layer ``blocks.{i}.attn`` gives, for
each token of view ``src`` (a query), the token of view ``dst`` the matcher picks with ``heads="mean"``
(softmax over view ``dst``'s keys only of the head-averaged logits, argmax), read by the taps through
:func:`corrlab.probe` (:func:`layer_matches`). A query is scored when
its token-centre pixel lies on the object and has a visible ground-truth match in view ``dst``
(:func:`corrlab.geometry.correspondences.ground_truth_match_for`); it is a hit when the predicted
token is within 1 token (Chebyshev, i.e. the 3 x 3 cells around the true token) of the true token.
"far" queries are those whose true match moves >= ``far_tokens`` tokens from the query's own position.

Controls on the same queries: chance (expected hit rate of a uniformly random token), same position,
camera geometry only (the point on the query ray nearest the object centre, reprojected), appearance
nearest neighbour (patch pixels, L2) on the same noisy input and on the clean images, and a matcher that
knows both: appearance nearest neighbour among the destination tokens within one token of the query's true
epipolar line (:func:`epipolar_appearance_nn`, on the noisy input and on the clean images), a rough guide to
what cameras plus appearance can find on these scenes at this grid.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..errors import CorrlabError
from ..geometry.correspondences import ground_truth_match_for
from ..geometry.epipolar import epipolar_lines, fundamental_matrix
from ..geometry.tokens import pixel_to_token
from .rays import plucker_ray_embeds, token_centres

__all__ = [
    "TokenQueries",
    "token_queries",
    "layer_matches",
    "model_argmax",
    "quick_native_eval",
    "hits",
    "chance_rate",
    "geometry_guess",
    "patch_costs",
    "appearance_nn",
    "epipolar_appearance_nn",
]


@dataclass
class TokenQueries:
    """Scored queries of one view pair: ``src_idx (N,)`` token indices in the source view,
    ``gt_pix (N, 2)`` true pixels in the destination view, ``moved (N,)`` displacement in tokens."""

    src_idx: torch.Tensor
    gt_pix: torch.Tensor
    moved: torch.Tensor


def token_queries(mvs, src: int, dst: int, patch_size: int) -> TokenQueries:
    """Object tokens of view ``src`` with a visible ground-truth match in view ``dst`` (needs depth)."""
    if mvs.depth is None:
        raise CorrlabError("mvs: expected a rendered set with depth maps, got depth=None")
    H, W = mvs.images.shape[-2:]
    centres = token_centres(H, W, patch_size)
    target, valid = ground_truth_match_for(mvs.depth[src], mvs.cameras[src], mvs.depth[dst], mvs.cameras[dst], centres)
    idx = torch.nonzero(valid, as_tuple=True)[0]
    moved = (target[idx] - centres[idx]).norm(dim=1) / patch_size
    return TokenQueries(idx, target[idx], moved)


def token_cell(pix: torch.Tensor, patch_size: int, h: int, w: int) -> torch.Tensor:
    """``(N, 2)`` pixels -> ``(N, 2)`` long (row, col) of the token containing them (clamped;
    :func:`corrlab.geometry.pixel_to_token` on the ``(h, w)`` grid of ``patch_size`` pixels)."""
    idx = pixel_to_index(pix, patch_size, h, w)
    return torch.stack([idx // w, idx % w], dim=1)


def hits(pred_idx: torch.Tensor, gt_pix: torch.Tensor, patch_size: int, h: int, w: int, radius: int = 1) -> torch.Tensor:
    """``(N,)`` predicted token indices (row-major) vs ``(N, 2)`` true pixels -> ``(N,)`` bool within ``radius`` tokens."""
    gt = token_cell(gt_pix, patch_size, h, w)
    pr = torch.stack([pred_idx // w, pred_idx % w], dim=1)
    return (pr - gt).abs().max(dim=1).values <= radius


def chance_rate(gt_pix: torch.Tensor, patch_size: int, h: int, w: int, radius: int = 1) -> torch.Tensor:
    """``(N,)`` probability that a uniformly random token is a hit (window clipped at the border)."""
    gt = token_cell(gt_pix, patch_size, h, w)
    rows = (gt[:, 0] + radius).clamp(max=h - 1) - (gt[:, 0] - radius).clamp(min=0) + 1
    cols = (gt[:, 1] + radius).clamp(max=w - 1) - (gt[:, 1] - radius).clamp(min=0) + 1
    return (rows * cols).double() / (h * w)


def geometry_guess(cam_src, cam_dst, src_pix: torch.Tensor, centre: torch.Tensor) -> torch.Tensor:
    """Camera-geometry-only guess: the point on each query ray nearest ``centre`` (3,), reprojected.

    ``src_pix (N, 2)`` -> ``(N, 2)`` pixels in the destination view.
    """
    o, d = cam_src.rays(src_pix)
    s = ((centre[None] - o) * d).sum(dim=1, keepdim=True)
    pix, _ = cam_dst.project(o + s * d)
    return pix


def pixel_to_index(pix: torch.Tensor, patch_size: int, h: int, w: int) -> torch.Tensor:
    """``(N, 2)`` pixels -> ``(N,)`` row-major index of the token of the ``(h, w)`` grid containing them (clamped)."""
    return pixel_to_token(pix, (h, w), (h * patch_size, w * patch_size))


def patch_costs(images: torch.Tensor, src: int, dst: int, patch_size: int) -> torch.Tensor:
    """L2 distance between every source token's pixel patch and every destination token's.

    ``images (V, 3, H, W)`` -> ``(h*w, h*w)`` float64, rows the source tokens, columns the destination's
    (row-major).
    """
    p = patch_size

    def patches(img):
        c, H, W = img.shape
        return img.reshape(c, H // p, p, W // p, p).permute(1, 3, 0, 2, 4).reshape((H // p) * (W // p), -1)

    return torch.cdist(patches(images[src].double()), patches(images[dst].double()))


def appearance_nn(images: torch.Tensor, src: int, dst: int, patch_size: int) -> torch.Tensor:
    """Nearest neighbour of each source token's patch among the destination's patches (L2 on pixels).

    ``images (V, 3, H, W)`` -> ``(h*w,)`` destination token indices for every source token.
    """
    return patch_costs(images, src, dst, patch_size).argmin(dim=1)


def epipolar_appearance_nn(images: torch.Tensor, cameras, src: int, dst: int, patch_size: int) -> torch.Tensor:
    """:func:`appearance_nn` restricted to the destination tokens whose centre lies within one token
    (``patch_size`` pixels) of each source token's epipolar line under the true cameras.

    ``images (V, 3, H, W)``, ``cameras`` the ``V`` cameras -> ``(h*w,)`` destination token indices for every
    source token (the unrestricted nearest neighbour where no token is that close to the line).
    """
    p = patch_size
    H, W = images.shape[-2:]
    centres = token_centres(H, W, p)
    lines = epipolar_lines(centres, fundamental_matrix(cameras[src], cameras[dst]))  # (h*w, 3) in dst
    dist = (lines[:, None, :2] * centres[None]).sum(-1).add(lines[:, None, 2]).abs()  # (src tokens, dst tokens)
    band = torch.nan_to_num(dist, nan=float("inf")) <= p
    cost = patch_costs(images, src, dst, p)
    restricted = torch.where(band, cost, torch.full_like(cost, float("inf")))
    return torch.where(band.any(dim=1), restricted.argmin(dim=1), cost.argmin(dim=1))


@torch.no_grad()
def layer_matches(model, x: torch.Tensor, t: float, prompt_embeds: torch.Tensor, ray_embeds: torch.Tensor,
                  src: int = 0, dst: int = 1, given: torch.Tensor | None = None) -> dict:
    """Native matches of every multi-view attention layer in one forward pass, read by the taps.

    Runs ``model`` (a :class:`MultiViewDiT` or :class:`~corrlab.model.unet.MultiViewUNet`) once on
    ``x (V, 3, H, W)`` at time ``t`` under :func:`corrlab.probe` with the matcher's head-averaged softmax
    (``heads="mean"``: softmax over view ``dst``'s keys of the head-averaged logits, argmax). ``ray_embeds``
    ``(1, V, 6, h, w)``, ``prompt_embeds (1, D)``, ``given (1, V)`` bool (reference views) or None.

    Returns ``{layer: (index (h*w,) long, (h, w))}``: for each token of view ``src`` (row-major) the matched
    token of view ``dst`` on that layer's grid.
    """
    from ..probing import probe

    kwargs = {} if given is None else {"given": given.to(model.device)}
    with probe(model, heads="mean") as rec:
        model(x[None].to(model.device), torch.tensor([float(t)]), prompt_embeds, ray_embeds.to(model.device), **kwargs)
    out = {}
    for layer in rec.layers:
        h, w = rec.grid(layer)
        sel = rec.ds.sel(layer=layer, src=src, tgt=dst).isel(step=0, head=0)
        rows = torch.from_numpy(np.asarray(sel["match_row"].values)[:h, :w].reshape(-1).astype(np.int64))
        cols = torch.from_numpy(np.asarray(sel["match_col"].values)[:h, :w].reshape(-1).astype(np.int64))
        out[layer] = (rows * w + cols, (h, w))
    return out


def _ray_embeds(model, cameras, size: int) -> torch.Tensor:
    cfg = model.config
    return plucker_ray_embeds(cameras, size, int(getattr(cfg, "patch_size", 1) or 1), cfg.scene_scale)


@torch.no_grad()
def model_argmax(model, mvs, t: float, noise: torch.Tensor, src: int = 0, dst: int = 1):
    """Noise a rendered set to ``t`` with ``noise (V, 3, H, W)``; return ``({layer: (h*w,)}, x_t (V, 3, H, W))``,
    the matched tokens of :func:`layer_matches` (view ``src`` -> view ``dst``, each layer on its own grid)."""
    H, W = mvs.images.shape[-2:]
    x0 = mvs.images * 2 - 1
    x_t = (1 - t) * x0 + t * noise
    rays = _ray_embeds(model, mvs.cameras, H)
    pe = model.encode_prompt([mvs.prompt])
    matches = layer_matches(model, x_t, t, pe, rays[None], src, dst)
    return {layer: index for layer, (index, _) in matches.items()}, x_t


def quick_native_eval(model, config=None, n_sets: int = 8, t: float = 0.5, far_tokens: float = 2.0,
                      seed_start: int = 1_000_000) -> dict:
    """The training-time tracking figure: per-layer hit rate on far-moving tokens (and all tokens) at ``t``,
    on ``n_sets`` held-out 2-view sets (seeds from ``seed_start``), view 0 -> view 1, both noised to ``t``,
    matches from :func:`layer_matches` (the matcher's ``heads="mean"``).

    Each layer is scored on its own token grid (``p = image size / grid``); ``best_far`` and ``chance_far``
    are those of the finest grid (the DiT has one grid). Returns a flat JSON-able dict.
    """
    from ..scenes import render_scene

    size = int(model.config.sample_size)
    per_layer_all: dict[str, list] = {}
    per_layer_far: dict[str, list] = {}
    layer_grid: dict[str, tuple[int, int]] = {}
    chance_far: dict[tuple[int, int], list] = {}
    was_training = model.training
    model.eval()
    try:
        for i in range(n_sets):
            mvs = render_scene(seed_start + i, 2, size, "train")
            noise = torch.randn(mvs.images.shape, generator=torch.Generator().manual_seed(seed_start + i))
            x_t = (1 - t) * (mvs.images * 2 - 1) + t * noise
            rays = _ray_embeds(model, mvs.cameras, size)
            matches = layer_matches(model, x_t, t, model.encode_prompt([mvs.prompt]), rays[None], 0, 1)
            queries: dict[tuple[int, int], TokenQueries] = {}
            for name, (index, (h, w)) in matches.items():
                p = size // h
                if (h, w) not in queries:  # layers share grids: queries and chance once per grid
                    queries[(h, w)] = q = token_queries(mvs, 0, 1, p)
                    if len(q.src_idx):
                        chance_far.setdefault((h, w), []).append(chance_rate(q.gt_pix[q.moved >= far_tokens], p, h, w))
                q = queries[(h, w)]
                if len(q.src_idx) == 0:
                    continue
                hit = hits(index[q.src_idx], q.gt_pix, p, h, w)
                layer_grid[name] = (h, w)
                per_layer_all.setdefault(name, []).append(hit)
                per_layer_far.setdefault(name, []).append(hit[q.moved >= far_tokens])
    finally:
        model.train(was_training)
    out = {"t": t, "n_sets": n_sets}
    for name in per_layer_all:
        out[f"{name}/all"] = round(float(torch.cat(per_layer_all[name]).double().mean()), 4)
        out[f"{name}/far"] = round(float(torch.cat(per_layer_far[name]).double().mean()), 4)
    finest = max(chance_far, key=lambda g: g[0] * g[1], default=None)
    out["best_far"] = max((out[f"{n}/far"] for n, g in layer_grid.items() if g == finest), default=float("nan"))
    out["chance_far"] = round(float(torch.cat(chance_far[finest]).mean()), 4) if finest else float("nan")
    return out
