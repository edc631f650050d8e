"""Validate and convert the images matchers take.

A matcher accepts a ``(3, H, W)`` float tensor in [0, 1] (corrlab's image contract) or an ``(H, W, 3)``
uint8 numpy array (OpenCV / PIL style); both become a ``(3, H, W)`` float32 tensor here.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from corrlab.errors import ShapeError, ValueRangeError, check_finite, describe

__all__ = ["as_image_tensor", "to_gray_uint8", "to_gray"]

_EXPECTED = "a (3, H, W) float torch.Tensor in [0, 1] or an (H, W, 3) uint8 numpy array"
_MIN_SIZE = 8


def as_image_tensor(name: str, image: Any) -> torch.Tensor:
    """Return ``image`` as a ``(3, H, W)`` float32 CPU tensor in [0, 1], or raise a CorrlabError naming ``name``."""
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ShapeError(f"{name}: expected {_EXPECTED}, got {describe(image)}")
        tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float() / 255.0
    elif isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] != 3 or not image.is_floating_point():
            raise ShapeError(f"{name}: expected {_EXPECTED}, got {describe(image)}")
        check_finite(name, image)
        lo, hi = float(image.min()), float(image.max())
        if lo < 0.0 or hi > 1.0:
            raise ValueRangeError(f"{name}: expected values in [0, 1], got range [{lo:.4g}, {hi:.4g}] in {describe(image)}")
        tensor = image.detach().to("cpu", torch.float32)
    else:
        raise ShapeError(f"{name}: expected {_EXPECTED}, got {describe(image)}")
    if min(tensor.shape[1:]) < _MIN_SIZE:
        raise ShapeError(f"{name}: expected an image at least {_MIN_SIZE}x{_MIN_SIZE} pixels, got {describe(image)}")
    return tensor


def to_gray(image: torch.Tensor) -> torch.Tensor:
    """``(3, H, W)`` RGB in [0, 1] -> ``(H, W)`` luma (ITU-R 601: 0.299 R + 0.587 G + 0.114 B)."""
    weights = torch.tensor([0.299, 0.587, 0.114], dtype=image.dtype)
    return torch.einsum("chw,c->hw", image, weights)


def to_gray_uint8(image: torch.Tensor) -> np.ndarray:
    """``(3, H, W)`` RGB in [0, 1] -> ``(H, W)`` uint8 grayscale for OpenCV."""
    gray = to_gray(image).mul(255.0).round().clamp(0, 255)
    return gray.to(torch.uint8).numpy()
