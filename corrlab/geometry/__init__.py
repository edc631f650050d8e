"""Camera geometry: corrlab's conventions, stated once.

* Cameras follow OpenCV: x right, y down, z forward; ``x_cam = R @ x_world + t``.
* A perspective camera maps ``x_cam`` to pixels by ``(K @ x_cam)[:2] / z_cam``; an orthographic one by
  ``K[:2, :2] @ x_cam[:2] + K[:2, 2]``. Depth always means ``z_cam``.
* Pixel coordinates are (x, y) = (column, row), with the centre of the top-left pixel at (0, 0);
  an image of width W spans x in [-0.5, W - 0.5].
* A row-major ``(h, w)`` token grid over an ``(H, W)`` image: token ``(r, c)`` has its centre at
  ``((c + 0.5) W / w - 0.5, (r + 0.5) H / h - 0.5)`` (:func:`token_centres`, :func:`pixel_to_token`).
* Point sets are ``(N, 2)`` pixels or ``(N, 3)`` world points; geometry runs in float64.
* Epipolar distances are in pixels, never squared. "symmetric" is kornia's
  sqrt(d1^2 + d2^2) of the two point-to-line distances; "line" is the distance of the second point to
  the epipolar line of the first in the second image; "sampson" is the first-order geometric error.
"""
from .camera import Camera, as_points, look_at
from .correspondences import DEPTH_SAMPLING, ground_truth_correspondences, ground_truth_match_for, sample_depth
from .epipolar import (
    DISTANCE_KINDS,
    as_fundamental,
    epipolar_distance,
    epipolar_lines,
    fundamental_matrix,
    relative_view_angle,
)
from .tokens import pixel_to_token, token_centres

__all__ = [
    "Camera",
    "as_points",
    "look_at",
    "DISTANCE_KINDS",
    "as_fundamental",
    "fundamental_matrix",
    "epipolar_distance",
    "epipolar_lines",
    "relative_view_angle",
    "DEPTH_SAMPLING",
    "sample_depth",
    "ground_truth_match_for",
    "ground_truth_correspondences",
    "token_centres",
    "pixel_to_token",
]
