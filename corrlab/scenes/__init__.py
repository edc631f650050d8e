"""Procedural multi-view scenes: one textured object, camera layouts around it, a torch ray-caster.

>>> from corrlab.scenes import render_scene
>>> mv = render_scene(seed=3, views=4, size=64)          # doctest: +SKIP
>>> mv.prompt, mv.images.shape                            # doctest: +SKIP
('red striped box', torch.Size([4, 3, 64, 64]))

Everything is deterministic in the seed: :func:`sample_scene` and :func:`sample_cameras` draw from
independent random streams of the same seed.
"""
from __future__ import annotations

from dataclasses import replace

from ..sets import MultiViewSet
from .cameras import LAYOUTS, check_views_size, intrinsics, orbit_camera, sample_cameras
from .raycast import BACKGROUND_RGB, camera_rays, render
from .shapes import intersect, surface_residual
from .spec import PALETTE, VOCABULARY, SceneSpec, sample_scene

__all__ = [
    "VOCABULARY",
    "PALETTE",
    "LAYOUTS",
    "BACKGROUND_RGB",
    "SceneSpec",
    "sample_scene",
    "sample_cameras",
    "orbit_camera",
    "intrinsics",
    "render",
    "render_scene",
    "camera_rays",
    "intersect",
    "surface_residual",
]


def render_scene(seed: int, views: int = 4, size: int = 128, layout: str = "even", **camera_kw) -> MultiViewSet:
    """:func:`sample_scene` + :func:`sample_cameras` + :func:`render`, all from ``seed``.

    ``camera_kw`` go to :func:`sample_cameras` (radius, elevation_deg, fov_deg, model, ...).
    meta holds the scene parameters, the layout and the camera keywords.
    """
    check_views_size(views, size)
    spec = sample_scene(seed)
    cams = sample_cameras(seed, views=views, size=size, layout=layout, **camera_kw)
    mv = render(spec, cams, size)
    camera_meta = {k: (list(v) if isinstance(v, tuple) else v) for k, v in camera_kw.items()}
    return replace(mv, meta={**mv.meta, "layout": layout, "camera_kw": camera_meta})
