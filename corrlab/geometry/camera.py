"""Pinhole and orthographic cameras in corrlab's one convention (see :mod:`corrlab.geometry`)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from ..errors import CorrlabError, ShapeError, ValueRangeError, check_finite, check_shape, describe

__all__ = ["Camera", "look_at", "as_points"]

CameraModel = Literal["perspective", "orthographic"]
_DT = torch.float64


def as_points(name: str, pts, dim: int = 2) -> torch.Tensor:
    """Validate and convert ``(N, dim)`` points to a float64 tensor."""
    t = torch.as_tensor(pts)
    if not (t.is_floating_point() or t.dtype in (torch.int32, torch.int64)):
        raise ShapeError(f"{name}: expected a numeric array of shape (N, {dim}), got {describe(pts)}")
    check_shape(name, t, (None, dim), expected=f"(N, {dim})")
    t = t.to(_DT)
    check_finite(name, t)
    return t


@dataclass(frozen=True, eq=False)
class Camera:
    """One camera: intrinsics ``K`` (3, 3), rotation ``R`` (3, 3), translation ``t`` (3,).

    OpenCV convention: ``x_cam = R @ x_world + t``; camera x right, y down, z forward.
    Perspective: ``pixel = (K @ x_cam)[:2] / z``. Orthographic: ``pixel = K[:2, :2] @ x_cam[:2] + K[:2, 2]``
    (``K[0, 0]``, ``K[1, 1]`` are pixels per world unit). Depth is always ``z_cam``.
    Pixel (x, y) has the centre of the top-left pixel at (0, 0).
    Tensors are stored as float64 on the CPU.
    """

    K: torch.Tensor
    R: torch.Tensor
    t: torch.Tensor
    model: CameraModel = "perspective"

    def __post_init__(self):
        K = torch.as_tensor(self.K, dtype=_DT).detach().cpu()
        R = torch.as_tensor(self.R, dtype=_DT).detach().cpu()
        t = torch.as_tensor(self.t, dtype=_DT).detach().cpu()
        if t.shape == (3, 1):
            t = t[:, 0]
        check_shape("K", K, (3, 3))
        check_shape("R", R, (3, 3))
        check_shape("t", t, (3,), expected="(3,) or (3, 1)")
        for n, v in (("K", K), ("R", R), ("t", t)):
            check_finite(n, v)
        if self.model not in ("perspective", "orthographic"):
            raise CorrlabError(f"model: expected 'perspective' or 'orthographic', got {self.model!r}")
        if abs(float(K[0, 0]) * float(K[1, 1])) < 1e-12 or abs(float(torch.linalg.det(K))) < 1e-12:
            raise ValueRangeError(f"K: expected a non-singular intrinsics matrix, got {K.tolist()}")
        if not torch.allclose(K[2], torch.tensor([0.0, 0.0, 1.0], dtype=_DT), atol=1e-9):
            raise ValueRangeError(f"K: expected last row [0, 0, 1], got {K[2].tolist()}")
        err = float((R @ R.T - torch.eye(3, dtype=_DT)).abs().max())
        det = float(torch.linalg.det(R))
        if err > 1e-5 or abs(det - 1.0) > 1e-5:
            raise ValueRangeError(
                f"R: expected a rotation matrix (R R^T = I, det = +1), got |R R^T - I|max = {err:.2e}, det = {det:.4f}"
            )
        object.__setattr__(self, "K", K)
        object.__setattr__(self, "R", R)
        object.__setattr__(self, "t", t)

    # ------------------------------------------------------------------ basics
    @property
    def center(self) -> torch.Tensor:
        """Camera centre in world coordinates (3,) (for orthographic: a point on the optical axis)."""
        return -self.R.T @ self.t

    @property
    def projection_matrix(self) -> torch.Tensor:
        """(3, 4) matrix P with ``pixel ~ P @ [x_world, 1]`` (affine for orthographic cameras)."""
        Rt = torch.cat([self.R, self.t[:, None]], dim=1)
        if self.model == "perspective":
            return self.K @ Rt
        A = torch.zeros(3, 4, dtype=_DT)
        A[:2] = self.K[:2, :2] @ Rt[:2]
        A[:2, 3] += self.K[:2, 2]
        A[2, 3] = 1.0
        return A

    def to_dict(self) -> dict:
        return {"K": self.K.tolist(), "R": self.R.tolist(), "t": self.t.tolist(), "model": self.model}

    @classmethod
    def from_dict(cls, d: dict) -> "Camera":
        try:
            return cls(K=d["K"], R=d["R"], t=d["t"], model=d.get("model", "perspective"))
        except KeyError as e:
            raise CorrlabError(f"camera dict: missing key {e}; expected keys K, R, t, model") from None

    # ------------------------------------------------------------------ mapping
    def world_to_camera(self, X: torch.Tensor) -> torch.Tensor:
        """(N, 3) world points -> (N, 3) camera coordinates."""
        X = as_points("X", X, 3)
        return X @ self.R.T + self.t

    def project(self, X) -> tuple[torch.Tensor, torch.Tensor]:
        """Project (N, 3) world points. Returns pixels (N, 2) and depth (N,) (= z_cam)."""
        Xc = self.world_to_camera(X)
        z = Xc[:, 2]
        if self.model == "perspective":
            uvw = Xc @ self.K.T
            with torch.no_grad():
                safe = torch.where(z.abs() < 1e-12, torch.full_like(z, 1e-12), z)
            return uvw[:, :2] / safe[:, None], z
        return Xc[:, :2] @ self.K[:2, :2].T + self.K[:2, 2], z

    def unproject(self, pix, depth) -> torch.Tensor:
        """Lift (N, 2) pixels with depth (N,) (= z_cam) to (N, 3) world points."""
        pix = as_points("pix", pix, 2)
        depth = torch.as_tensor(depth, dtype=_DT)
        check_shape("depth", depth, (pix.shape[0],), expected=f"({pix.shape[0]},) matching pix")
        check_finite("depth", depth)
        if self.model == "perspective":
            rays = self.pixel_rays_camera(pix)
            Xc = rays * depth[:, None]
        else:
            xy = torch.linalg.solve(self.K[:2, :2], (pix - self.K[:2, 2]).T).T
            Xc = torch.cat([xy, depth[:, None]], dim=1)
        return (Xc - self.t) @ self.R

    def pixel_rays_camera(self, pix) -> torch.Tensor:
        """(N, 2) pixels -> (N, 3) camera-frame ray directions with z = 1 (perspective)."""
        pix = as_points("pix", pix, 2)
        h = torch.cat([pix, torch.ones(pix.shape[0], 1, dtype=_DT)], dim=1)
        return torch.linalg.solve(self.K, h.T).T

    def rays(self, pix) -> tuple[torch.Tensor, torch.Tensor]:
        """World-space rays through (N, 2) pixels: origins (N, 3) and unit directions (N, 3)."""
        pix = as_points("pix", pix, 2)
        if self.model == "perspective":
            d = self.pixel_rays_camera(pix) @ self.R
            d = d / d.norm(dim=1, keepdim=True)
            o = self.center.expand_as(d).clone()
        else:
            o = self.unproject(pix, torch.zeros(pix.shape[0], dtype=_DT))
            d = self.R[2].expand_as(o).clone()
        return o, d


def look_at(
    eye,
    target=(0.0, 0.0, 0.0),
    up=(0.0, -1.0, 0.0),
    roll_deg: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotation R and translation t of a camera at ``eye`` looking at ``target``.

    ``up`` is the world direction that should appear upwards in the image (image y points down,
    so the camera's y axis is aligned with ``-up``). ``roll_deg`` rotates the image plane
    clockwise about the optical axis. Returns (R (3, 3), t (3,)) with ``x_cam = R x_world + t``.
    """
    eye = torch.as_tensor(eye, dtype=_DT)
    target = torch.as_tensor(target, dtype=_DT)
    up = torch.as_tensor(up, dtype=_DT)
    z = target - eye
    n = z.norm()
    if n < 1e-12:
        raise ValueRangeError(f"eye: expected a position different from target, got eye={eye.tolist()} target={target.tolist()}")
    z = z / n
    x = torch.linalg.cross(-up, z)  # right-handed: x = y x z with y along -up
    if x.norm() < 1e-9:
        raise ValueRangeError(f"up: expected a direction not parallel to the viewing direction, got up={up.tolist()}")
    x = x / x.norm()
    y = torch.linalg.cross(z, x)
    R = torch.stack([x, y, z])  # rows: camera axes in world coordinates
    if roll_deg:
        a = math.radians(roll_deg)
        Rz = torch.tensor([[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0], [0.0, 0.0, 1.0]], dtype=_DT)
        R = Rz @ R
    t = -R @ eye
    return R, t
