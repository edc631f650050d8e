"""Camera layouts around the object: evenly spaced, random, near (small baselines), and the embedded model's
training layout.

Azimuth 0 looks along +z; elevation > 0 puts the camera above the object (world up is ``-y``);
roll rotates the image clockwise. The principal point is the image centre ((W - 1) / 2, (H - 1) / 2).
"""
from __future__ import annotations

import math

import torch

from ..errors import CorrlabError, ValueRangeError, check_choice
from ..geometry import Camera, look_at
from .spec import scene_generator

__all__ = ["LAYOUTS", "intrinsics", "orbit_camera", "sample_cameras"]

LAYOUTS = ("even", "random", "near", "train")
MIN_SIZE = 8
WORLD_UP = (0.0, -1.0, 0.0)


def check_views_size(views, size) -> None:
    """Raise :class:`CorrlabError` unless ``views >= 1`` and ``size >= MIN_SIZE`` are ints."""
    if isinstance(views, bool) or not isinstance(views, int) or views < 1:
        raise CorrlabError(f"views: expected an int >= 1, got {views!r}")
    if isinstance(size, bool) or not isinstance(size, int) or size < MIN_SIZE:
        raise CorrlabError(f"size: expected an int >= {MIN_SIZE} (image side in pixels), got {size!r}")


def intrinsics(size: int, fov_deg: float = 40.0, model: str = "perspective", distance: float = 1.0) -> torch.Tensor:
    """K (3, 3) float64 for a square ``size`` image.

    Perspective: horizontal field of view ``fov_deg``. Orthographic: the view spans the same width as a
    perspective camera with that field of view does at ``distance``.
    """
    check_choice("model", model, ("perspective", "orthographic"))
    if not 0.0 < fov_deg < 180.0:
        raise ValueRangeError(f"fov_deg: expected a field of view in (0, 180) degrees, got {fov_deg!r}")
    half = math.tan(math.radians(fov_deg) / 2)
    f = (size / 2) / half if model == "perspective" else (size / 2) / (half * distance)
    c = (size - 1) / 2
    return torch.tensor([[f, 0.0, c], [0.0, f, c], [0.0, 0.0, 1.0]], dtype=torch.float64)


def orbit_camera(
    azimuth_deg: float,
    elevation_deg: float,
    distance: float,
    size: int,
    fov_deg: float = 40.0,
    roll_deg: float = 0.0,
    target=(0.0, 0.0, 0.0),
    model: str = "perspective",
) -> Camera:
    """A camera on a sphere of radius ``distance`` around ``target``, looking at it."""
    if not distance > 0:
        raise ValueRangeError(f"distance: expected a positive camera distance, got {distance!r}")
    if not -89.0 <= elevation_deg <= 89.0:
        raise ValueRangeError(f"elevation_deg: expected a value in [-89, 89], got {elevation_deg!r}")
    az, el = math.radians(azimuth_deg), math.radians(elevation_deg)
    tx, ty, tz = (float(v) for v in target)
    eye = (tx + distance * math.cos(el) * math.sin(az), ty - distance * math.sin(el), tz + distance * math.cos(el) * math.cos(az))
    R, t = look_at(eye, (tx, ty, tz), up=WORLD_UP, roll_deg=roll_deg)
    return Camera(K=intrinsics(size, fov_deg, model, distance), R=R, t=t, model=model)


def _u(g: torch.Generator, lo: float, hi: float, n: int | None = None):
    x = lo + (hi - lo) * torch.rand(() if n is None else (n,), generator=g, dtype=torch.float64)
    return float(x) if n is None else x.tolist()


def _spread_azimuths(g: torch.Generator, views: int, gap_deg: tuple[float, float], tries: int = 64) -> list[float]:
    """Azimuths whose consecutive gaps are in ``gap_deg`` and, where possible, all pairs >= gap_deg[0] apart."""
    start = _u(g, 0.0, 360.0)
    best, best_sep = None, -1.0
    for _ in range(tries):
        gaps = _u(g, gap_deg[0], gap_deg[1], views - 1) if views > 1 else []
        az = [start]
        for d in gaps:
            az.append(az[-1] + d)
        sep = min(
            (min(abs(a - b) % 360, 360 - abs(a - b) % 360) for i, a in enumerate(az) for b in az[i + 1 :]),
            default=360.0,
        )
        if sep > best_sep:
            best, best_sep = az, sep
        if sep >= gap_deg[0]:
            break
    return [a % 360.0 for a in best]


def sample_cameras(
    seed: int,
    views: int = 4,
    size: int = 128,
    layout: str = "even",
    *,
    radius: float = 4.2,
    elevation_deg: float = 20.0,
    fov_deg: float = 40.0,
    roll_deg: float = 0.0,
    model: str = "perspective",
    target=(0.0, 0.0, 0.0),
    distance_range: tuple[float, float] = (3.8, 5.0),
    elevation_range_deg: tuple[float, float] = (-10.0, 45.0),
    roll_max_deg: float = 25.0,
    target_jitter: float = 0.2,
    azimuth_gap_deg: tuple[float, float] = (30.0, 120.0),
    near_gap_deg: tuple[float, float] = (5.0, 30.0),
) -> list[Camera]:
    """Cameras for one scene, deterministic in ``seed``: a list of ``views`` :class:`Camera`.

    layout "even": azimuths ``offset + 360 i / views`` (offset from the seed), at ``radius``,
    ``elevation_deg``, ``roll_deg``, looking at ``target``.
    layout "random": the same but every azimuth uniform in [0, 360).
    layout "near" (small baselines, as in a short camera move): the same orbit, first azimuth uniform in
    [0, 360), each next one a gap uniform in ``near_gap_deg`` further on.
    layout "train" (the embedded model's training/evaluation layout): distance uniform in
    ``distance_range``, look-at point uniform within ``target_jitter`` of ``target`` per axis, elevation
    uniform in ``elevation_range_deg``, roll uniform in +-``roll_max_deg``, consecutive azimuths
    ``azimuth_gap_deg`` apart (and all pairs at least its lower bound apart where that is possible).
    ``fov_deg`` and ``model`` ("perspective" or "orthographic") apply to every layout.
    """
    check_views_size(views, size)
    check_choice("layout", layout, LAYOUTS)
    check_choice("model", model, ("perspective", "orthographic"))
    g = scene_generator(seed, "cameras")
    if layout in ("even", "random", "near"):
        if layout == "even":
            offset = _u(g, 0.0, 360.0)
            azimuths = [offset + 360.0 * i / views for i in range(views)]
        elif layout == "near":
            if not 0 <= near_gap_deg[0] <= near_gap_deg[1]:
                raise ValueRangeError(f"near_gap_deg: expected 0 <= low <= high, got {near_gap_deg!r}")
            azimuths = [_u(g, 0.0, 360.0)]
            for _ in range(views - 1):
                azimuths.append((azimuths[-1] + _u(g, *near_gap_deg)) % 360.0)
        else:
            azimuths = _u(g, 0.0, 360.0, views)
        return [
            orbit_camera(a, elevation_deg, radius, size, fov_deg, roll_deg, target, model) for a in azimuths
        ]
    lo, hi = distance_range
    if not 0 < lo <= hi:
        raise ValueRangeError(f"distance_range: expected 0 < low <= high, got {distance_range!r}")
    if not 0 < azimuth_gap_deg[0] <= azimuth_gap_deg[1]:
        raise ValueRangeError(f"azimuth_gap_deg: expected 0 < low <= high, got {azimuth_gap_deg!r}")
    azimuths = _spread_azimuths(g, views, azimuth_gap_deg)
    cams = []
    for a in azimuths:
        dist = _u(g, lo, hi)
        el = _u(g, *elevation_range_deg)
        roll = _u(g, -roll_max_deg, roll_max_deg)
        jitter = _u(g, -target_jitter, target_jitter, 3)
        tgt = [float(c) + j for c, j in zip(target, jitter)]
        cams.append(orbit_camera(a, el, dist, size, fov_deg, roll, tgt, model))
    return cams
