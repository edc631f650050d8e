"""Token grids over images: the one place the token-centre formula lives.

An image of ``(H, W)`` pixels is covered by a row-major grid of ``(h, w)`` tokens. Token ``(r, c)``
(index ``r * w + c``) covers the pixel box ``[c W/w, (c+1) W/w) x [r H/h, (r+1) H/h)``; in corrlab's
pixel convention (centre of the top-left pixel at (0, 0)) its centre is

    ((c + 0.5) W / w - 0.5,  (r + 0.5) H / h - 0.5)

which for a patch size ``p = W / w = H / h`` is ``(c p + (p - 1) / 2, r p + (p - 1) / 2)``. The inverse,
:func:`pixel_to_token`, maps a pixel to the token whose box contains it. Probe layouts
(:class:`corrlab.probing.layouts.TokenLayout`), the embedded model's ray embeddings, its tracking
evaluation and the widgets all call these two functions.
"""
from __future__ import annotations

import torch

from ..errors import ValueRangeError, check_positive_pair, check_shape, describe

__all__ = ["token_centres", "pixel_to_token"]


def token_centres(grid: tuple[int, int], image_size: tuple[int, int]) -> torch.Tensor:
    """``(h*w, 2)`` float64 pixel ``(x, y)`` centres of a row-major ``grid = (h, w)`` over ``image_size = (H, W)``."""
    h, w = check_positive_pair("grid", grid)
    H, W = check_positive_pair("image_size", image_size)
    y = (torch.arange(h, dtype=torch.float64) + 0.5) * (H / h) - 0.5
    x = (torch.arange(w, dtype=torch.float64) + 0.5) * (W / w) - 0.5
    yy, xx = torch.meshgrid(y, x, indexing="ij")
    return torch.stack([xx.reshape(-1), yy.reshape(-1)], dim=1)


def pixel_to_token(xy: torch.Tensor, grid: tuple[int, int], image_size: tuple[int, int]) -> torch.Tensor:
    """``xy (N, 2)`` pixel ``(x, y)`` -> ``(N,)`` long row-major index of the token of ``grid`` containing it.

    Pixels outside the image are clamped to the nearest border token; the inverse of :func:`token_centres`.
    """
    h, w = check_positive_pair("grid", grid)
    H, W = check_positive_pair("image_size", image_size)
    xy = torch.as_tensor(xy)
    check_shape("xy", xy, (None, 2), "(N, 2)")
    xy = xy.to(torch.float64)
    if not bool(torch.isfinite(xy).all()):
        raise ValueRangeError(f"xy: expected finite pixel coordinates, got non-finite values in {describe(xy)}")
    col = torch.floor((xy[:, 0] + 0.5) * w / W).long().clamp_(0, w - 1)
    row = torch.floor((xy[:, 1] + 0.5) * h / H).long().clamp_(0, h - 1)
    return row * w + col
