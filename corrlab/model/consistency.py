"""CorrAdapter*'s training signals at EXACT correspondences, and a consistency metric at them.

The paper's optional training scheme (methods.md section 2; CorrAdapter Eq. 14-15) fine-tunes the
multi-view attention with a LoRA under ``L = L_flow + lambda * L_consistency`` where

    L_consistency = sum_{(i, j), i != j} || f_in^i[k] - f_in^j[c_ij[k]] ||^2          (Eq. 14)

at reference correspondences ``c_ij`` (the paper: LoFTR pseudo-labels; corrlab: the truth, from the
renderer's depth and cameras). corrlab averages instead of summing (mean over kept pairs ``(i, j, k)``
and channels), so ``lambda`` does not depend on the token count or width.

* :func:`token_correspondences`: per ordered view pair, the tokens of view ``i`` whose centre pixel has a
  visible true match in view ``j``, and where that match lies on view ``j``'s token grid.
* :func:`feature_consistency_loss` (Eq. 14): ``f (B, V, C, h, w)`` compared at the true matches, the target
  side sampled bilinearly at the exact sub-token location.
* :func:`attention_ce_loss` (the alternative): cross-entropy of the attention of query token ``k`` of view
  ``i`` over view ``j``'s keys, ``softmax_l(scale * q_i[k] . k_j[l])``, towards the token holding the true
  match (per head, averaged).
* :func:`correspondence_psnr` (a metric): PSNR between the colours of two views at the true pixel
  correspondences, pooled over view pairs: how consistent a generated set is with the TRUE geometry of its
  scene (the rendered truth scores high; Lambertian shading is view-independent).

Token grids follow :mod:`corrlab.model.rays`: token (row, col) of a ``p``-pixel grid has its centre at
pixel ``(col*p + (p-1)/2, row*p + (p-1)/2)``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import CorrlabError, ShapeError, check_shape, describe
from ..geometry.correspondences import ground_truth_correspondences, ground_truth_match_for
from .rays import token_centres

__all__ = [
    "PairCorrespondences",
    "token_correspondences",
    "feature_consistency_loss",
    "attention_ce_loss",
    "correspondence_psnr",
]


@dataclass
class PairCorrespondences:
    """True token correspondences of one ordered view pair ``(i, j)`` on an ``h x w`` token grid.

    ``src (N,)`` long: token indices (row-major) in view ``i``; ``tgt_xy (N, 2)`` float: the true match in
    view ``j`` in TOKEN coordinates ``(col, row)`` (token centres at integers); ``tgt (N,)`` long: the index
    of the token of view ``j`` containing the true match.
    """

    i: int
    j: int
    src: torch.Tensor
    tgt_xy: torch.Tensor
    tgt: torch.Tensor


def token_correspondences(mvs, grid: tuple[int, int], pairs=None, depth_tol: float = 0.01) -> list[PairCorrespondences]:
    """True correspondences of a rendered set ``mvs`` (with depth) on a token grid ``(h, w)``.

    ``pairs``: ordered view pairs (default: every ``(i, j)``, ``i != j``). Views are ``H x W`` pixels with
    ``H / h = W / w = p`` pixels per token.
    """
    if getattr(mvs, "depth", None) is None:
        raise CorrlabError("mvs: expected a rendered set with depth maps (render_scene), got depth=None")
    V, _, H, W = mvs.images.shape
    h, w = int(grid[0]), int(grid[1])
    if h < 1 or w < 1 or H % h or W % w or H // h != W // w:
        raise ShapeError(f"grid: expected (h, w) dividing the {H}x{W} views by one token size, got {grid}")
    p = H // h
    centres = token_centres(H, W, p)
    off = (p - 1) / 2.0
    if pairs is None:
        pairs = [(i, j) for i in range(V) for j in range(V) if i != j]
    out = []
    for i, j in pairs:
        target, valid = ground_truth_match_for(mvs.depth[i], mvs.cameras[i], mvs.depth[j], mvs.cameras[j], centres,
                                               depth_tol=depth_tol)
        src = torch.nonzero(valid, as_tuple=True)[0]
        xy = (target[src] - off) / p  # token coordinates (col, row)
        col = torch.floor((target[src, 0] + 0.5) / p).long().clamp(0, w - 1)
        row = torch.floor((target[src, 1] + 0.5) / p).long().clamp(0, h - 1)
        out.append(PairCorrespondences(int(i), int(j), src, xy.float(), row * w + col))
    return out


def _sample_tokens(f: torch.Tensor, xy: torch.Tensor) -> torch.Tensor:
    """Bilinear samples of ``f (C, h, w)`` at token coordinates ``xy (N, 2)`` (col, row) -> ``(N, C)``."""
    C, h, w = f.shape
    gx = xy[:, 0] / max(w - 1, 1) * 2 - 1
    gy = xy[:, 1] / max(h - 1, 1) * 2 - 1
    g = torch.stack([gx, gy], dim=1).to(f.dtype)[None, :, None, :]  # (1, N, 1, 2)
    return F.grid_sample(f[None], g, mode="bilinear", padding_mode="border", align_corners=True)[0, :, :, 0].T


def feature_consistency_loss(features: torch.Tensor, correspondences: list[list[PairCorrespondences]]) -> torch.Tensor:
    """Eq. 14 averaged: mean over every true match ``(b, i, j, k)`` and channel of ``(f_i[k] - f_j[c_ij[k]])^2``.

    ``features (B, V, C, h, w)``; ``correspondences[b]``: the pairs of batch entry ``b``
    (:func:`token_correspondences` on the same grid). The target side is sampled bilinearly at the exact
    match. Zero (with a graph) when no pair has a match.
    """
    if features.ndim != 5:
        raise ShapeError(f"features: expected shape (B, V, C, h, w), got {describe(features)}")
    if len(correspondences) != features.shape[0]:
        raise ShapeError(f"correspondences: expected one list of pairs per batch entry ({features.shape[0]}), "
                         f"got {len(correspondences)}")
    B, V, C, h, w = features.shape
    total = features.new_zeros(())
    count = 0
    for b, pairs in enumerate(correspondences):
        flat = features[b].reshape(V, C, h * w)
        for pc in pairs:
            if len(pc.src) == 0:
                continue
            a = flat[pc.i][:, pc.src].T  # (N, C)
            t = _sample_tokens(features[b, pc.j], pc.tgt_xy.to(features.device))
            total = total + (a - t).pow(2).sum()
            count += a.shape[0] * C
    return total / count if count else total + 0.0 * features.sum()


def attention_ce_loss(q: torch.Tensor, k: torch.Tensor, correspondences: list[list[PairCorrespondences]],
                      scale: float) -> torch.Tensor:
    """Cross-entropy of the attention of view ``i``'s query tokens over view ``j``'s keys towards the true token.

    ``q, k (B, V, heads, h*w, d)``; per true match ``(b, i, j, k)`` and head:
    ``-log softmax_l(scale * q_i[k] . k_j[l])[c_ij[k]]``, averaged over matches and heads. Minimal when the
    attention puts all its mass on the true token.
    """
    if q.ndim != 5 or k.shape != q.shape:
        raise ShapeError(f"q, k: expected equal shapes (B, V, heads, N, d), got {describe(q)} and {describe(k)}")
    if len(correspondences) != q.shape[0]:
        raise ShapeError(f"correspondences: expected one list of pairs per batch entry ({q.shape[0]}), got {len(correspondences)}")
    total = q.new_zeros(())
    count = 0
    for b, pairs in enumerate(correspondences):
        for pc in pairs:
            if len(pc.src) == 0:
                continue
            logits = scale * q[b, pc.i][:, pc.src] @ k[b, pc.j].transpose(-1, -2)  # (heads, N, h*w)
            heads, n, _ = logits.shape
            tgt = pc.tgt.to(q.device)[None].expand(heads, n)
            total = total + F.cross_entropy(logits.reshape(heads * n, -1).float(), tgt.reshape(-1), reduction="sum")
            count += heads * n
    return total / count if count else total + 0.0 * (q.sum() + k.sum())


def correspondence_psnr(images: torch.Tensor, truth, stride: int = 2, pairs=None) -> tuple[float, int]:
    """Colour consistency of ``images (V, 3, H, W)`` in [0, 1] at the TRUE correspondences of ``truth``.

    For every view pair ``i < j`` (or ``pairs``), the pixels of view ``i`` on a ``stride`` grid with a
    visible true match in view ``j`` (:func:`corrlab.geometry.ground_truth_correspondences` on
    ``truth.depth``/``truth.cameras``), and the colour of view ``j`` sampled bilinearly at the match.
    Returns ``(PSNR in dB of the pooled squared colour differences, number of matched pixels)``;
    ``(nan, 0)`` when no pixel matches.
    """
    V = images.shape[0]
    check_shape("images", images, (len(truth.cameras), 3, None, None))
    H, W = images.shape[-2:]
    if pairs is None:
        pairs = [(i, j) for i in range(V) for j in range(i + 1, V)]
    se, n = 0.0, 0
    for i, j in pairs:
        pi, pj = ground_truth_correspondences(truth.depth[i], truth.cameras[i], truth.depth[j], truth.cameras[j],
                                              stride=stride)
        if len(pi) == 0:
            continue
        a = images[i].double()[:, pi[:, 1].round().long().clamp(0, H - 1), pi[:, 0].round().long().clamp(0, W - 1)]
        gx = pj[:, 0] / (W - 1) * 2 - 1
        gy = pj[:, 1] / (H - 1) * 2 - 1
        grid = torch.stack([gx, gy], dim=1)[None, :, None, :].double()
        b = F.grid_sample(images[j].double()[None], grid, mode="bilinear", align_corners=True)[0, :, :, 0]
        se += float((a - b).pow(2).sum())
        n += a.shape[1]
    if n == 0:
        return float("nan"), 0
    mse = se / (3 * n)
    return (float("inf") if mse == 0 else 10 * math.log10(1.0 / mse)), n
