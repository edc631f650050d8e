"""Per-token Plücker ray embeddings: the only way position reaches a token of :class:`MultiViewDiT`.

Each token (row, col) of a patch-``p`` grid covers pixels ``[row*p, (row+1)*p)``; its centre is pixel
``(col*p + (p-1)/2, row*p + (p-1)/2)`` (corrlab's pixel convention). The embedding of a token is the
Plücker vector ``(d, m)`` of the world-space ray through that centre: ``d`` the unit direction and
``m = o x d`` the moment, divided by ``scene_scale`` so it is O(1) for the renderer's scenes.
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..errors import CorrlabError, ValueRangeError, describe
from ..geometry import Camera
from ..geometry.tokens import token_centres as grid_token_centres

__all__ = ["token_centres", "plucker_ray_embeds"]


def token_centres(height: int, width: int, patch_size: int) -> torch.Tensor:
    """Pixel centres of the tokens of an image, row-major (:func:`corrlab.geometry.token_centres` on the
    patch grid).

    Returns ``(h*w, 2)`` float64 pixels ``(x, y)`` with ``h = height // p``, ``w = width // p``.
    """
    if height % patch_size or width % patch_size:
        raise ValueRangeError(
            f"size: expected height and width divisible by the patch size {patch_size}, got {height}x{width}"
        )
    return grid_token_centres((height // patch_size, width // patch_size), (height, width))


def plucker_ray_embeds(
    cameras: Sequence[Camera], size: int | tuple[int, int], patch_size: int = 4, scene_scale: float = 1.0
) -> torch.Tensor:
    """Plücker coordinates of every token's centre ray, for each camera.

    Args:
        cameras: ``V`` cameras.
        size: image size ``S`` (square) or ``(height, width)`` in pixels.
        patch_size: pixels per token side ``p``.
        scene_scale: world length that maps to 1 in the moment (the renderer's typical camera distance).

    Returns:
        ``(V, 6, h, w)`` float32: channels ``(dx, dy, dz, mx, my, mz)``, ``h = height / p``, ``w = width / p``.
    """
    if not isinstance(cameras, (list, tuple)) or not cameras or not all(isinstance(c, Camera) for c in cameras):
        raise CorrlabError(f"cameras: expected a non-empty list of corrlab.geometry.Camera, got {describe(cameras)}")
    if scene_scale <= 0:
        raise ValueRangeError(f"scene_scale: expected a positive length, got {scene_scale!r}")
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    pix = token_centres(height, width, patch_size)
    h, w = height // patch_size, width // patch_size
    out = []
    for cam in cameras:
        o, d = cam.rays(pix)
        m = torch.linalg.cross(o, d) / scene_scale
        out.append(torch.cat([d, m], dim=1).T.reshape(6, h, w))
    return torch.stack(out).to(torch.float32)
