"""Two-view epipolar geometry: fundamental matrices, epipolar lines and distances.

Conventions are those of :mod:`corrlab.geometry`: ``x2^T F x1 = 0`` with ``x = (x, y, 1)`` in corrlab
pixels (centre of the top-left pixel at (0, 0)); distances are in pixels, never squared.
"""
from __future__ import annotations

import math

import torch
from kornia.geometry.epipolar import (
    fundamental_from_projections,
    sampson_epipolar_distance,
    symmetrical_epipolar_distance,
)

from ..errors import CorrlabError, ShapeError, ValueRangeError, check_choice, check_finite, check_shape, describe
from .camera import Camera, as_points

__all__ = [
    "DISTANCE_KINDS",
    "as_fundamental",
    "fundamental_matrix",
    "epipolar_lines",
    "epipolar_distance",
    "relative_view_angle",
]

DISTANCE_KINDS = ("symmetric", "line", "sampson")
_DT = torch.float64


def _check_camera(name: str, cam) -> None:
    if not isinstance(cam, Camera):
        raise CorrlabError(f"{name}: expected a corrlab.geometry.Camera, got {describe(cam)}")


def as_fundamental(name: str, F) -> torch.Tensor:
    """Validate a fundamental matrix and return it as a (3, 3) float64 tensor."""
    t = torch.as_tensor(F)
    if not (t.is_floating_point() or t.dtype in (torch.int32, torch.int64)):
        raise ShapeError(f"{name}: expected a numeric (3, 3) fundamental matrix, got {describe(F)}")
    check_shape(name, t, (3, 3))
    t = t.to(_DT)
    check_finite(name, t)
    if float(t.abs().max()) == 0.0:
        raise ValueRangeError(f"{name}: expected a non-zero fundamental matrix, got all zeros")
    return t


def fundamental_matrix(cam1: Camera, cam2: Camera) -> torch.Tensor:
    """Fundamental matrix of a camera pair, with ``x2^T F x1 = 0`` in corrlab pixels.

    Works for perspective, orthographic (affine F) and mixed pairs: F is computed from the two
    (3, 4) projection matrices (kornia's ``fundamental_from_projections``). The result has unit
    Frobenius norm and a fixed sign (its largest-magnitude entry is positive).

    Args:
        cam1: camera of the first image (points ``x1``).
        cam2: camera of the second image (points ``x2``).

    Returns:
        F: (3, 3) float64 tensor.

    Raises:
        ValueRangeError: when the pair has no epipolar geometry (coincident perspective centres, or two
            orthographic cameras with parallel viewing directions): every point pair would then be "consistent".
    """
    _check_camera("cam1", cam1)
    _check_camera("cam2", cam2)
    P1, P2 = cam1.projection_matrix, cam2.projection_matrix
    # F is defined up to scale: scaling each P first keeps the 4x4 determinants well conditioned.
    P1 = P1 / P1.norm()
    P2 = P2 / P2.norm()
    F = fundamental_from_projections(P1[None], P2[None])[0].to(_DT)
    norm = float(F.norm())
    if not math.isfinite(norm) or norm < 1e-12 or float(torch.linalg.matrix_rank(F, rtol=1e-9)) < 2:
        raise ValueRangeError(
            "cam1, cam2: expected cameras with distinct centres (perspective) or non-parallel viewing "
            f"directions (orthographic), got a pair without epipolar geometry ({cam1.model}/{cam2.model}, "
            f"centres {cam1.center.tolist()} and {cam2.center.tolist()})"
        )
    F = F / norm
    flat = F.flatten()
    if float(flat[flat.abs().argmax()]) < 0:
        F = -F
    return F


def _homogeneous(pts: torch.Tensor) -> torch.Tensor:
    return torch.cat([pts, torch.ones(pts.shape[0], 1, dtype=_DT)], dim=1)


def epipolar_lines(pts1, F) -> torch.Tensor:
    """Epipolar lines ``F x1`` in the second image, normalised so that ``a^2 + b^2 = 1``.

    A pixel ``(x, y)`` of image 2 lies on line ``(a, b, c)`` when ``a x + b y + c = 0``; with the
    normalisation, ``|a x + b y + c|`` is its distance in pixels. For lines in the first image of
    points of the second, pass ``F.T``.

    Args:
        pts1: (N, 2) pixels in the first image (numpy or torch).
        F: (3, 3) fundamental matrix (``x2^T F x1 = 0``).

    Returns:
        lines: (N, 3) float64 tensor. A degenerate line (``a = b = 0``, only at an epipole) is NaN.
    """
    p1 = as_points("pts1", pts1)
    Fm = as_fundamental("F", F)
    lines = _homogeneous(p1) @ Fm.T
    ab = lines[:, :2].norm(dim=1, keepdim=True)
    return torch.where(ab > 0, lines / ab, torch.full_like(lines, float("nan")))


def _line_distance(p1: torch.Tensor, p2: torch.Tensor, Fm: torch.Tensor) -> torch.Tensor:
    lines = _homogeneous(p1) @ Fm.T  # (N, 3) lines in image 2
    num = (lines * _homogeneous(p2)).sum(dim=1).abs()
    den = lines[:, :2].norm(dim=1)
    inf = torch.full_like(num, float("inf"))
    return torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), inf)


def epipolar_distance(pts1, pts2, F, kind: str = "symmetric") -> torch.Tensor:
    """Epipolar distance in pixels (never squared) of each correspondence ``pts1[n] <-> pts2[n]``.

    Kinds:
        * ``"line"``: distance of ``pts2`` to the epipolar line ``F x1`` in image 2.
        * ``"symmetric"``: ``sqrt(d1^2 + d2^2)`` of the two point-to-line distances (kornia's
          ``symmetrical_epipolar_distance(..., squared=False)``). A 3 px error in one image gives
          line 3, Sampson 2.12, symmetric 4.24 for a pair with symmetric line geometry.
        * ``"sampson"``: the first-order geometric error (kornia's Sampson distance, not squared).

    A correspondence at an epipole (degenerate line) is at distance ``inf``.

    Args:
        pts1: (N, 2) pixels in the first image (numpy or torch).
        pts2: (N, 2) pixels in the second image.
        F: (3, 3) fundamental matrix with ``x2^T F x1 = 0``.
        kind: one of ``DISTANCE_KINDS``.

    Returns:
        (N,) float64 tensor of distances in pixels.
    """
    check_choice("kind", kind, DISTANCE_KINDS)
    p1 = as_points("pts1", pts1)
    p2 = as_points("pts2", pts2)
    if p1.shape[0] != p2.shape[0]:
        raise ShapeError(f"pts2: expected (N, 2) with N = {p1.shape[0]} matching pts1, got {describe(pts2)}")
    Fm = as_fundamental("F", F)
    if p1.shape[0] == 0:
        return torch.zeros(0, dtype=_DT)
    if kind == "line":
        return _line_distance(p1, p2, Fm)
    if kind == "symmetric":
        return symmetrical_epipolar_distance(p1, p2, Fm, squared=False)
    return sampson_epipolar_distance(p1, p2, Fm, squared=False)


def relative_view_angle(cam1: Camera, cam2: Camera) -> float:
    """Angle in degrees (in [0, 180]) between the optical axes (camera +z) of two cameras."""
    _check_camera("cam1", cam1)
    _check_camera("cam2", cam2)
    cos = float(torch.dot(cam1.R[2], cam2.R[2]).clamp(-1.0, 1.0))
    return math.degrees(math.acos(cos))
