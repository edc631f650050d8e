"""Prompt adherence: which palette colour dominates the object in an image.

Object pixels are those that are saturated (HSV saturation >= ``min_saturation``) and not dark
(value >= ``min_value``): the renderer's background is neutral grey and every pattern's secondary
colour is neutral, so saturated pixels carry the primary colour. Each such pixel votes for the palette
colour with the nearest hue (circular distance); the dominant colour is the most voted.
"""
from __future__ import annotations

from typing import Mapping

import torch

from ..errors import check_shape

__all__ = ["rgb_to_hsv", "dominant_colour_word"]


def rgb_to_hsv(rgb: torch.Tensor) -> torch.Tensor:
    """``(..., 3)`` RGB in [0, 1] -> ``(..., 3)`` HSV with hue in [0, 1)."""
    r, g, b = rgb.unbind(-1)
    mx, _ = rgb.max(dim=-1)
    mn, _ = rgb.min(dim=-1)
    delta = mx - mn
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    h = torch.where(
        mx == r, ((g - b) / safe) % 6, torch.where(mx == g, (b - r) / safe + 2, (r - g) / safe + 4)
    ) / 6.0
    h = torch.where(delta > 0, h, torch.zeros_like(h)) % 1.0
    s = torch.where(mx > 0, delta / torch.where(mx > 0, mx, torch.ones_like(mx)), torch.zeros_like(mx))
    return torch.stack([h, s, mx], dim=-1)


def dominant_colour_word(
    image: torch.Tensor,
    palette: Mapping[str, tuple[float, float, float]] | None = None,
    min_saturation: float = 0.35,
    min_value: float = 0.2,
) -> str | None:
    """The palette word whose hue most saturated pixels of ``image (3, H, W)`` are nearest to.

    Returns None when no pixel is saturated enough (no coloured object visible).
    """
    if palette is None:
        from ..scenes import PALETTE as palette
    check_shape("image", image, (3, None, None), expected="(3, H, W)")
    hsv = rgb_to_hsv(image.permute(1, 2, 0).reshape(-1, 3).double())
    keep = (hsv[:, 1] >= min_saturation) & (hsv[:, 2] >= min_value)
    if not bool(keep.any()):
        return None
    words = list(palette)
    ref = rgb_to_hsv(torch.tensor([palette[w] for w in words], dtype=torch.float64))[:, 0]
    d = (hsv[keep, 0][:, None] - ref[None]).abs()
    d = torch.minimum(d, 1 - d)
    votes = torch.bincount(d.argmin(dim=1), minlength=len(words))
    return words[int(votes.argmax())]
