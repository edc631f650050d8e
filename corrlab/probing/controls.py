"""Trivial matchers on the same token grid as a probed layer: the controls every native score needs.

Each returns ``(V, V, N)`` long target-token indices (row-major, ``N = h*w``) for every ordered image
pair, ``-1`` on the diagonal (``src == tgt``), so they score exactly like a probe record:

* ``chance``: a uniformly random target token (seeded ``torch.Generator``).
* ``identity``: the same (row, col) in the target image. With cameras at one elevation the epipolar
  lines run almost along rows, so this "copy the position" shortcut scores a high epipolar precision
  (methods.md section 5): print it next to every native score.
* ``appearance``: nearest neighbour (L2) in pixel space between token patches of the images
  (``features="patch"``: the raw ``3 x p x p`` patch; ``"mean"``: the patch's average colour).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import CorrlabError, ShapeError, ValueRangeError, check_choice, describe

__all__ = ["CONTROLS", "chance_matches", "identity_matches", "appearance_matches", "control_matches"]

#: Names of the trivial matchers.
CONTROLS = ("chance", "identity", "appearance")


def _grid(grid) -> tuple[int, int]:
    try:
        h, w = int(grid[0]), int(grid[1])
    except (TypeError, ValueError, IndexError):
        raise ShapeError(f"grid: expected a (rows, cols) pair, got {grid!r}") from None
    if h < 1 or w < 1:
        raise ValueRangeError(f"grid: expected positive rows and cols, got {grid!r}")
    return h, w


def _mask_diagonal(index: torch.Tensor) -> torch.Tensor:
    v = index.shape[0]
    index[torch.arange(v), torch.arange(v)] = -1
    return index


def chance_matches(num_images: int, grid: tuple[int, int], seed: int = 0) -> torch.Tensor:
    """``(V, V, h*w)`` uniformly random target tokens, reproducible from ``seed``."""
    h, w = _grid(grid)
    g = torch.Generator().manual_seed(int(seed))
    return _mask_diagonal(torch.randint(0, h * w, (num_images, num_images, h * w), generator=g))


def identity_matches(num_images: int, grid: tuple[int, int]) -> torch.Tensor:
    """``(V, V, h*w)``: every token matched to the same (row, col) in the other image."""
    h, w = _grid(grid)
    return _mask_diagonal(torch.arange(h * w).expand(num_images, num_images, h * w).clone())


def token_features(images: torch.Tensor, grid: tuple[int, int], features: str = "patch") -> torch.Tensor:
    """``(V, 3, H, W)`` images -> ``(V, h*w, D)`` per-token appearance features (row-major tokens).

    ``"patch"``: the ``3 x (H/h) x (W/w)`` pixels of the token (needs H, W divisible by h, w);
    ``"mean"``: the token's average colour (adaptive average pooling, any size).
    """
    check_choice("features", features, ("patch", "mean"))
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
        raise ShapeError(f"images: expected a (V, 3, H, W) tensor, got {describe(images)}")
    h, w = _grid(grid)
    x = images.to(torch.float32)
    if features == "mean":
        return F.adaptive_avg_pool2d(x, (h, w)).flatten(2).transpose(1, 2)
    H, W = x.shape[-2:]
    if H % h or W % w:
        raise ShapeError(f"images: expected H, W divisible by the grid {(h, w)} for patch features, got {describe(images)}")
    ph, pw = H // h, W // w
    return F.unfold(x, kernel_size=(ph, pw), stride=(ph, pw)).transpose(1, 2)


def appearance_matches(images: torch.Tensor, grid: tuple[int, int], features: str = "patch") -> torch.Tensor:
    """``(V, V, h*w)`` nearest neighbours in appearance (L2 between token features, first index on ties)."""
    feats = token_features(images, grid, features)  # (V, N, D)
    v = feats.shape[0]
    index = torch.full((v, v, feats.shape[1]), -1, dtype=torch.long)
    for i in range(v):
        for j in range(v):
            if i != j:
                index[i, j] = torch.cdist(feats[i], feats[j]).argmin(dim=1)
    return index


def control_matches(name: str, num_images: int, grid: tuple[int, int], images: torch.Tensor | None = None,
                    seed: int = 0, features: str = "patch") -> torch.Tensor:
    """The ``(V, V, h*w)`` matches of the trivial matcher called ``name`` (one of :data:`CONTROLS`)."""
    check_choice("name", name, CONTROLS)
    if name == "chance":
        return chance_matches(num_images, grid, seed)
    if name == "identity":
        return identity_matches(num_images, grid)
    if images is None:
        raise CorrlabError("images: the appearance control needs the (V, 3, H, W) images, got None")
    if images.shape[0] != num_images:
        raise ShapeError(f"images: expected {num_images} images, got {describe(images)}")
    return appearance_matches(images, grid, features)
