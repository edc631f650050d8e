"""Ground-truth correspondences between two views from their depth maps and cameras.

A pixel of image i is lifted with its depth (``z_cam``) to a world point, projected into image j,
and kept when it lands inside image j and is visible there: ``|z_j - depth_j(x_j)| <= depth_tol * |z_j|``.

Depth maps are (H, W) with ``z_cam`` on surfaces and ``+inf`` on the background. Sampling a depth map
at a sub-pixel location (``"bilinear"``) interpolates the four neighbouring pixels when all four are
finite and otherwise uses the nearest pixel, so a location next to the background never gets a mixed,
meaningless depth; a location whose nearest pixel is background has depth ``inf`` (no surface).
Near depth discontinuities between two surfaces the interpolated depth matches neither surface and
the point is dropped: ground truth errs on the side of fewer, correct pairs.
"""
from __future__ import annotations

import numbers

import torch

from ..errors import CorrlabError, ShapeError, ValueRangeError, check_choice, describe
from .camera import Camera, as_points

__all__ = [
    "DEPTH_SAMPLING",
    "sample_depth",
    "ground_truth_match_for",
    "ground_truth_correspondences",
]

DEPTH_SAMPLING = ("bilinear", "nearest")
_DT = torch.float64


def _as_depth(name: str, depth, model: str) -> torch.Tensor:
    """Validate an (H, W) depth map: finite values or +inf, positive for perspective cameras."""
    t = torch.as_tensor(depth)
    if not t.is_floating_point():
        raise ShapeError(f"{name}: expected a float (H, W) depth map, got {describe(depth)}")
    if t.ndim != 2 or t.shape[0] < 1 or t.shape[1] < 1:
        raise ShapeError(f"{name}: expected shape (H, W), got {describe(depth)}")
    t = t.to(_DT)
    bad = torch.isnan(t) | (t == float("-inf"))
    if bool(bad.any()):
        raise ValueRangeError(
            f"{name}: expected z_cam depths or +inf (background), got {int(bad.sum())} NaN/-inf entries in {describe(depth)}"
        )
    if model == "perspective":
        nonpos = torch.isfinite(t) & (t <= 0)
        if bool(nonpos.any()):
            raise ValueRangeError(
                f"{name}: expected positive depths for a perspective camera, got {int(nonpos.sum())} entries <= 0 "
                f"(min {float(t[nonpos].min()):.4g})"
            )
    return t


def _check_camera(name: str, cam) -> None:
    if not isinstance(cam, Camera):
        raise CorrlabError(f"{name}: expected a corrlab.geometry.Camera, got {describe(cam)}")


def _inside(pix: torch.Tensor, height: int, width: int) -> torch.Tensor:
    x, y = pix[:, 0], pix[:, 1]
    return (x >= -0.5) & (x <= width - 0.5) & (y >= -0.5) & (y <= height - 0.5)


def _sample(depth: torch.Tensor, pix: torch.Tensor, mode: str) -> torch.Tensor:
    height, width = depth.shape
    out = torch.full((pix.shape[0],), float("inf"), dtype=_DT)
    inside = _inside(pix, height, width) & torch.isfinite(pix).all(dim=1)
    if not bool(inside.any()):
        return out
    x = pix[inside, 0].clamp(0, width - 1)
    y = pix[inside, 1].clamp(0, height - 1)
    nearest = depth[torch.round(y).long(), torch.round(x).long()]
    if mode == "nearest":
        out[inside] = nearest
        return out
    x0 = torch.floor(x).long().clamp(max=width - 1)
    y0 = torch.floor(y).long().clamp(max=height - 1)
    x1 = (x0 + 1).clamp(max=width - 1)
    y1 = (y0 + 1).clamp(max=height - 1)
    fx, fy = x - x0, y - y0
    d00, d01, d10, d11 = depth[y0, x0], depth[y0, x1], depth[y1, x0], depth[y1, x1]
    all_finite = torch.isfinite(d00) & torch.isfinite(d01) & torch.isfinite(d10) & torch.isfinite(d11)
    zero = torch.zeros_like(d00)
    d00, d01, d10, d11 = (torch.where(all_finite, d, zero) for d in (d00, d01, d10, d11))
    bilinear = (1 - fy) * ((1 - fx) * d00 + fx * d01) + fy * ((1 - fx) * d10 + fx * d11)
    out[inside] = torch.where(all_finite, bilinear, nearest)
    return out


def sample_depth(depth, pix, mode: str = "bilinear") -> torch.Tensor:
    """Sample an (H, W) depth map at (N, 2) pixel locations.

    ``"bilinear"`` interpolates when the four neighbours are finite, else takes the nearest pixel;
    ``"nearest"`` takes the nearest pixel. Locations outside the image get ``+inf``.

    Args:
        depth: (H, W) float depth map, ``+inf`` on the background.
        pix: (N, 2) pixels (x, y), centre of the top-left pixel at (0, 0).
        mode: one of ``DEPTH_SAMPLING``.

    Returns:
        (N,) float64 tensor.
    """
    check_choice("mode", mode, DEPTH_SAMPLING)
    d = _as_depth("depth", depth, "orthographic")
    p = as_points("pix", pix)
    return _sample(d, p, mode)


def ground_truth_match_for(
    depth_i,
    cam_i: Camera,
    depth_j,
    cam_j: Camera,
    pixels,
    depth_tol: float = 0.01,
    depth_sampling: str = "bilinear",
) -> tuple[torch.Tensor, torch.Tensor]:
    """True location in image j of each given pixel of image i, and whether it exists.

    A source pixel is valid when its sampled depth in image i is finite, its reprojection lies in
    front of camera j (perspective) and inside image j (x in [-0.5, W_j - 0.5], y likewise), and it is
    visible there: ``|z_j - depth_j(x_j)| <= depth_tol * |z_j|``.

    Args:
        depth_i: (H_i, W_i) depth map of image i (``z_cam``, ``+inf`` background).
        cam_i: camera of image i.
        depth_j: (H_j, W_j) depth map of image j.
        cam_j: camera of image j.
        pixels: (N, 2) source pixels in image i (e.g. token centres).
        depth_tol: relative depth tolerance of the visibility test (>= 0).
        depth_sampling: how ``depth_i`` is sampled at ``pixels`` (``"bilinear"`` or ``"nearest"``);
            ``depth_j`` is always sampled bilinearly (with the background rule above).

    Returns:
        target: (N, 2) float64 pixels in image j, NaN where invalid.
        valid: (N,) bool.
    """
    _check_camera("cam_i", cam_i)
    _check_camera("cam_j", cam_j)
    check_choice("depth_sampling", depth_sampling, DEPTH_SAMPLING)
    if isinstance(depth_tol, bool) or not (isinstance(depth_tol, numbers.Real) and depth_tol >= 0):
        raise ValueRangeError(f"depth_tol: expected a number >= 0, got {depth_tol!r}")
    di = _as_depth("depth_i", depth_i, cam_i.model)
    dj = _as_depth("depth_j", depth_j, cam_j.model)
    src = as_points("pixels", pixels)
    z_i = _sample(di, src, depth_sampling)
    has_depth = torch.isfinite(z_i)
    target = torch.full_like(src, float("nan"))
    valid = torch.zeros(src.shape[0], dtype=torch.bool)
    if not bool(has_depth.any()):
        return target, valid
    world = cam_i.unproject(src[has_depth], z_i[has_depth])
    pix_j, z_j = cam_j.project(world)
    ok = _inside(pix_j, *dj.shape)
    if cam_j.model == "perspective":
        ok &= z_j > 0
    seen = _sample(dj, pix_j, "bilinear")
    ok &= torch.isfinite(seen) & ((z_j - seen).abs() <= depth_tol * z_j.abs())
    idx = torch.nonzero(has_depth, as_tuple=True)[0][ok]
    target[idx] = pix_j[ok]
    valid[idx] = True
    return target, valid


def ground_truth_correspondences(
    depth_i,
    cam_i: Camera,
    depth_j,
    cam_j: Camera,
    pixels=None,
    stride: int = 1,
    depth_tol: float = 0.01,
    depth_sampling: str = "bilinear",
) -> tuple[torch.Tensor, torch.Tensor]:
    """All ground-truth correspondences from image i to image j.

    Source pixels are ``pixels`` when given, else the grid ``x, y = 0, stride, 2 stride, ...`` of
    image i restricted to finite depth. See :func:`ground_truth_match_for` for the validity rules.

    Args:
        depth_i: (H_i, W_i) depth map of image i.
        cam_i: camera of image i.
        depth_j: (H_j, W_j) depth map of image j.
        cam_j: camera of image j.
        pixels: optional (N, 2) source pixels in image i.
        stride: grid step in pixels when ``pixels`` is None (int >= 1).
        depth_tol: relative depth tolerance of the visibility test.
        depth_sampling: sampling of ``depth_i`` at ``pixels``.

    Returns:
        pts_i: (M, 2) float64 pixels in image i, pts_j: (M, 2) float64 pixels in image j.
    """
    if pixels is None:
        if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
            raise ValueRangeError(f"stride: expected an int >= 1, got {stride!r}")
        di = _as_depth("depth_i", depth_i, cam_i.model if isinstance(cam_i, Camera) else "orthographic")
        rows = torch.arange(0, di.shape[0], stride)
        cols = torch.arange(0, di.shape[1], stride)
        yy, xx = torch.meshgrid(rows, cols, indexing="ij")
        finite = torch.isfinite(di[yy, xx])
        pixels = torch.stack([xx[finite], yy[finite]], dim=1).to(_DT)
    target, valid = ground_truth_match_for(
        depth_i, cam_i, depth_j, cam_j, pixels, depth_tol=depth_tol, depth_sampling=depth_sampling
    )
    src = as_points("pixels", pixels)
    return src[valid], target[valid]
