"""The vectorised torch ray-caster: one textured object, Lambert shading, plain background.

Colour is the average of ``supersample**2`` rays per pixel (anti-aliasing); depth and mask come from
the ray through the pixel centre, so ``camera.unproject(pixel, depth)`` lies exactly on the surface.
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..errors import CorrlabError, describe
from ..geometry import Camera
from ..sets import MultiViewSet
from .shapes import intersect, surface_normal
from .spec import SceneSpec
from .textures import hash_tables, solid_texture

__all__ = ["BACKGROUND_RGB", "AMBIENT", "camera_rays", "pixel_grid", "toned_albedo", "render"]

BACKGROUND_RGB = (0.82, 0.82, 0.82)
PRIMARY_TONE = (0.75, 1.0)  # lightness multipliers of the primary colour across cells
SECONDARY_TONE = 0.15  # how far a secondary cell's grey level moves from the spec's level
AMBIENT = 0.6  # shade = AMBIENT + (1 - AMBIENT) * max(0, n . light)


def pixel_grid(height: int, width: int, supersample: int = 1, dtype=torch.float64) -> torch.Tensor:
    """Sample positions (H * W * s * s, 2) in pixels (x, y), pixel-major then sub-sample.

    With ``supersample = 1`` these are the pixel centres (integers in corrlab's convention).
    """
    offs = (torch.arange(supersample, dtype=dtype) + 0.5) / supersample - 0.5
    ys = torch.arange(height, dtype=dtype)[:, None] + offs[None, :]  # (H, s)
    xs = torch.arange(width, dtype=dtype)[:, None] + offs[None, :]  # (W, s)
    y = ys[:, None, :, None].expand(height, width, supersample, supersample)
    x = xs[None, :, None, :].expand(height, width, supersample, supersample)
    return torch.stack([x, y], dim=-1).reshape(-1, 2)


def camera_rays(camera: Camera, pix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """World rays through pixels ``pix`` (N, 2): origins (N, 3), directions (N, 3) with unit camera z.

    Because the directions have ``z_cam = 1``, a hit at ``origins + t * directions`` has depth ``t``
    (perspective and orthographic alike). Computed in float64; cast by the caller.
    """
    pix = pix.to(torch.float64)
    R, t, K = camera.R, camera.t, camera.K
    if camera.model == "perspective":
        h = torch.cat([pix, torch.ones(pix.shape[0], 1, dtype=torch.float64)], dim=1)
        d_cam = torch.linalg.solve(K, h.T).T
        dirs = d_cam @ R  # R^T d_cam for each row
        origins = camera.center.expand_as(dirs)
    else:
        xy = torch.linalg.solve(K[:2, :2], (pix - K[:2, 2]).T).T
        x_cam = torch.cat([xy, torch.zeros(pix.shape[0], 1, dtype=torch.float64)], dim=1)
        origins = (x_cam - t) @ R
        dirs = R[2].expand_as(origins)
    return origins, dirs


def _world_to_object(spec: SceneSpec, origins: torch.Tensor, dirs: torch.Tensor):
    Ro = spec.rotation_matrix.to(origins.dtype)
    c = torch.tensor(spec.position, dtype=origins.dtype)
    return (origins - c) @ Ro / spec.size, dirs @ Ro / spec.size


def _cast(spec: SceneSpec, cameras: Sequence[Camera], pix: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Hit parameter t = depth (V, N) and object-space hit points (V, N, 3) for every camera."""
    o, d = zip(*(camera_rays(c, pix) for c in cameras))
    o = torch.stack(o).to(dtype).reshape(-1, 3)
    d = torch.stack(d).to(dtype).reshape(-1, 3)
    o_obj, d_obj = _world_to_object(spec, o, d)
    t, p = intersect(spec.shape, o_obj, d_obj, spec.proportions)
    V = len(cameras)
    return t.reshape(V, -1), p.reshape(V, -1, 3)


def toned_albedo(spec: SceneSpec, secondary: torch.Tensor, tone: torch.Tensor) -> torch.Tensor:
    """Albedo RGB (N, 3) from the texture's ``secondary`` (N,) bool and ``tone`` (N,) in [0, 1).

    Primary cells keep their hue and scale their lightness within ``PRIMARY_TONE``; secondary cells
    shift their grey level by up to ``SECONDARY_TONE`` towards mid-grey (white gets greyer, black lighter).
    """
    dtype = tone.dtype
    lightness = PRIMARY_TONE[0] + (PRIMARY_TONE[1] - PRIMARY_TONE[0]) * tone
    primary = torch.tensor(spec.primary_rgb, dtype=dtype) * lightness[:, None]
    towards_grey = -1.0 if sum(spec.secondary_rgb) / 3 > 0.5 else 1.0
    neutral = torch.tensor(spec.secondary_rgb, dtype=dtype) + (towards_grey * SECONDARY_TONE * tone)[:, None]
    return torch.where(secondary[:, None], neutral.clamp(0.0, 1.0), primary)


def _shade(spec: SceneSpec, p_obj: torch.Tensor, hit: torch.Tensor) -> torch.Tensor:
    """RGB (N, 3) of object-space points (N, 3); background where ``hit`` (N,) is False."""
    dtype = p_obj.dtype
    rgb = torch.tensor(BACKGROUND_RGB, dtype=dtype).expand(p_obj.shape[0], 3).clone()
    if not bool(hit.any()):
        return rgb
    p = p_obj[hit]
    tables = hash_tables(spec.texture_seed)
    second, tone = solid_texture(spec.pattern, p, tables, spec.texture_scale, spec.texture_phase, spec.texture_axis)
    albedo = toned_albedo(spec, second, tone)
    n_world = surface_normal(spec.shape, p, torch.tensor(spec.proportions, dtype=dtype)) @ spec.rotation_matrix.to(dtype).T
    lambert = (n_world @ torch.tensor(spec.light_dir, dtype=dtype)).clamp_min(0.0)
    rgb[hit] = albedo * (AMBIENT + (1.0 - AMBIENT) * lambert)[:, None]
    return rgb


def render(spec: SceneSpec, cameras: Sequence[Camera], size: int, supersample: int = 2) -> MultiViewSet:
    """Render ``spec`` from every camera into a :class:`MultiViewSet` of ``size`` x ``size`` views.

    The cameras' K must be made for this image size (see :func:`corrlab.scenes.sample_cameras`).
    Returns images (V, 3, size, size) float32 in [0, 1], depth (V, size, size) float32 (z_cam, +inf on
    the background) and masks (V, size, size) bool; meta holds the scene parameters.
    """
    from .cameras import check_views_size

    if not isinstance(spec, SceneSpec):
        raise CorrlabError(f"spec: expected a SceneSpec, got {describe(spec)}")
    cameras = list(cameras)
    check_views_size(len(cameras), size)
    for i, c in enumerate(cameras):
        if not isinstance(c, Camera):
            raise CorrlabError(f"cameras[{i}]: expected a corrlab.geometry.Camera, got {describe(c)}")
    if isinstance(supersample, bool) or not isinstance(supersample, int) or supersample < 1:
        raise CorrlabError(f"supersample: expected an int >= 1, got {supersample!r}")
    V, s = len(cameras), supersample

    # depth and masks: one float64 ray through each pixel centre
    depth, _ = _cast(spec, cameras, pixel_grid(size, size, 1), torch.float64)
    depth = depth.reshape(V, size, size)

    # colour: s*s float32 rays per pixel, averaged
    t, p = _cast(spec, cameras, pixel_grid(size, size, s), torch.float32)
    hit = torch.isfinite(t).reshape(-1)
    rgb = _shade(spec, p.reshape(-1, 3), hit).reshape(V, size, size, s * s, 3).mean(dim=3)
    images = rgb.permute(0, 3, 1, 2).clamp(0.0, 1.0).contiguous()

    return MultiViewSet(
        images=images,
        cameras=cameras,
        prompt=spec.prompt,
        seed=spec.seed if spec.seed is not None else -1,
        depth=depth.to(torch.float32),
        masks=torch.isfinite(depth),
        meta={"scene": spec.to_dict(), "renderer": {"supersample": s, "background_rgb": list(BACKGROUND_RGB), "ambient": AMBIENT}},
    )
