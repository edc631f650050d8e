"""Native correspondences of :class:`MultiViewDiT` on rendered sets, and the controls they are judged against.

For a rendered set noised to time ``t``, every attention layer ``blocks.{i}.attn`` gives, for each
token of view ``src`` (a query), the token of view ``dst`` with the highest attention probability
(softmax over view ``dst``'s keys only, per head, then averaged over heads). A query is scored when
its token-centre pixel lies on the object and has a visible ground-truth match in view ``dst``
(:func:`corrlab.geometry.correspondences.ground_truth_match_for`); it is a hit when the predicted
token is within 1 token (Chebyshev, i.e. the 3 x 3 cells around the true token) of the true token.
"far" queries are those whose true match moves >= ``far_tokens`` tokens from the query's own position.

Controls on the same queries: chance (expected hit rate of a uniformly random token), same position,
camera geometry only (the point on the query ray nearest the object centre, reprojected), appearance
nearest neighbour (patch pixels, L2) on the same noisy input and on the clean images.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from ..errors import CorrlabError
from ..geometry.correspondences import ground_truth_match_for
from .dit import MultiViewDiT
from .rays import plucker_ray_embeds, token_centres

__all__ = [
    "TokenQueries",
    "token_queries",
    "capture_attention_argmax",
    "hits",
    "chance_rate",
    "geometry_guess",
    "appearance_nn",
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
    """``(N, 2)`` pixels -> ``(N, 2)`` long (row, col) of the token containing them (clamped)."""
    col = torch.floor((pix[:, 0] + 0.5) / patch_size).long().clamp(0, w - 1)
    row = torch.floor((pix[:, 1] + 0.5) / patch_size).long().clamp(0, h - 1)
    return torch.stack([row, col], dim=1)


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
    cell = token_cell(pix, patch_size, h, w)
    return cell[:, 0] * w + cell[:, 1]


def appearance_nn(images: torch.Tensor, src: int, dst: int, patch_size: int) -> torch.Tensor:
    """Nearest neighbour of each source token's patch among the destination's patches (L2 on pixels).

    ``images (V, 3, H, W)`` -> ``(h*w,)`` destination token indices for every source token.
    """
    p = patch_size

    def patches(img):
        c, H, W = img.shape
        return img.reshape(c, H // p, p, W // p, p).permute(1, 3, 0, 2, 4).reshape((H // p) * (W // p), -1)

    return torch.cdist(patches(images[src].double()), patches(images[dst].double())).argmin(dim=1)


class ArgmaxCaptureProcessor:
    """Attention processor that records, per call, the head-averaged attention argmax src -> dst,
    then runs the ordinary ``AttnProcessor2_0`` (output unchanged)."""

    def __init__(self, tokens_per_view: int, src: int, dst: int, store: list):
        self.n, self.src, self.dst, self.store = tokens_per_view, src, dst, store
        self.inner = AttnProcessor2_0()

    def __call__(self, attn: Attention, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
        with torch.no_grad():
            B, N, _ = hidden_states.shape
            heads = attn.heads
            q = attn.to_q(hidden_states).view(B, N, heads, -1).transpose(1, 2)
            k = attn.to_k(hidden_states).view(B, N, heads, -1).transpose(1, 2)
            qs = q[:, :, self.src * self.n : (self.src + 1) * self.n]
            kd = k[:, :, self.dst * self.n : (self.dst + 1) * self.n]
            prob = torch.softmax((qs @ kd.transpose(-1, -2)).float() * attn.scale, dim=-1).mean(dim=1)
            self.store.append(prob.argmax(dim=-1))  # (B, n)
        return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


@contextmanager
def capture_attention_argmax(model: MultiViewDiT, tokens_per_view: int, src: int = 0, dst: int = 1):
    """Within the block, every ``blocks.{i}.attn`` records its argmax; yields ``{layer name: list}``.

    The original processors are restored on exit (also on exceptions).
    """
    originals = {}
    stores: dict[str, list] = {}
    try:
        for i, block in enumerate(model.blocks):
            name = f"blocks.{i}.attn"
            originals[name] = block.attn.processor
            stores[name] = []
            block.attn.set_processor(ArgmaxCaptureProcessor(tokens_per_view, src, dst, stores[name]))
        yield stores
    finally:
        for i, block in enumerate(model.blocks):
            name = f"blocks.{i}.attn"
            if name in originals:
                block.attn.set_processor(originals[name])


@torch.no_grad()
def model_argmax(model: MultiViewDiT, mvs, t: float, noise: torch.Tensor, src: int = 0, dst: int = 1):
    """Noise a rendered set to ``t`` with ``noise (V, 3, H, W)`` and return ``({layer: (h*w,)}, x_t (V, 3, H, W))``."""
    cfg = model.config
    H, W = mvs.images.shape[-2:]
    x0 = mvs.images * 2 - 1
    x_t = (1 - t) * x0 + t * noise
    rays = plucker_ray_embeds(mvs.cameras, (H, W), cfg.patch_size, cfg.scene_scale)
    pe = model.encode_prompt([mvs.prompt])
    n = (H // cfg.patch_size) * (W // cfg.patch_size)
    with capture_attention_argmax(model, n, src, dst) as stores:
        model(x_t[None].to(model.device), torch.tensor([t]), pe, rays[None].to(model.device))
    return {k: v[0][0].cpu() for k, v in stores.items()}, x_t


def quick_native_eval(model: MultiViewDiT, config=None, n_sets: int = 8, t: float = 0.5, far_tokens: float = 2.0,
                      seed_start: int = 1_000_000) -> dict:
    """The training-time tracking figure: per-layer hit rate on far-moving tokens (and all tokens) at ``t``,
    on ``n_sets`` held-out 2-view sets (seeds from ``seed_start``). Returns a flat JSON-able dict."""
    from ..scenes import render_scene

    size = int(model.config.sample_size)
    p = int(model.config.patch_size)
    h = w = size // p
    per_layer_all: dict[str, list] = {}
    per_layer_far: dict[str, list] = {}
    chance_far = []
    was_training = model.training
    model.eval()
    try:
        for i in range(n_sets):
            mvs = render_scene(seed_start + i, 2, size, "train")
            q = token_queries(mvs, 0, 1, p)
            if len(q.src_idx) == 0:
                continue
            noise = torch.randn(mvs.images.shape, generator=torch.Generator().manual_seed(seed_start + i))
            argmax, _ = model_argmax(model, mvs, t, noise)
            far = q.moved >= far_tokens
            chance_far.append(chance_rate(q.gt_pix[far], p, h, w))
            for name, am in argmax.items():
                hit = hits(am[q.src_idx], q.gt_pix, p, h, w)
                per_layer_all.setdefault(name, []).append(hit)
                per_layer_far.setdefault(name, []).append(hit[far])
    finally:
        model.train(was_training)
    out = {"t": t, "n_sets": n_sets}
    for name in per_layer_all:
        out[f"{name}/all"] = round(float(torch.cat(per_layer_all[name]).double().mean()), 4)
        out[f"{name}/far"] = round(float(torch.cat(per_layer_far[name]).double().mean()), 4)
    out["best_far"] = max((v for k, v in out.items() if k.endswith("/far")), default=float("nan"))
    out["chance_far"] = round(float(torch.cat(chance_far).mean()), 4) if chance_far else float("nan")
    return out
