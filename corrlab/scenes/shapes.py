"""Analytic ray/shape intersection and surface residuals, in object coordinates, batched.

Shapes live in object coordinates with half-extents ``e = proportions`` (max 1):
sphere ``|p| = 1``; box ``|p_i| <= e_i``; cylinder of radius ``e_x`` and half-height ``e_y`` around the
y axis; cone with its base (radius ``e_x``) at ``y = +e_y`` and its apex at ``y = -e_y`` (world up is
``-y``, so the apex points up for an upright object).

Rays ``o + t d`` need not have unit ``d``: ``t`` is returned in the ray's own parameter, so a caller
that scales ``d`` to unit camera-z gets depth directly. Misses have ``t = +inf``.
"""
from __future__ import annotations

import torch

from ..errors import check_choice

__all__ = ["SHAPES", "intersect", "surface_normal", "surface_residual"]

SHAPES = ("sphere", "box", "cylinder", "cone")
_EPS = 1e-9


def _quadratic_roots(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both roots of ``a t^2 + 2 b t + c = 0`` (N,) each, ``+inf`` where there is no real root."""
    disc = b * b - a * c
    ok = (disc >= 0) & (a.abs() > _EPS)
    sq = disc.clamp_min(0).sqrt()
    a_safe = torch.where(a.abs() > _EPS, a, torch.ones_like(a))
    t0 = (-b - sq) / a_safe
    t1 = (-b + sq) / a_safe
    lo, hi = torch.minimum(t0, t1), torch.maximum(t0, t1)
    inf = torch.full_like(a, float("inf"))
    return torch.where(ok, lo, inf), torch.where(ok, hi, inf)


def _nearest(candidates: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Per ray, the smallest valid positive ``t`` (N,) among (t (N,), valid (N,)) candidates; +inf if none."""
    ts = torch.stack([torch.where(valid & (t > _EPS), t, torch.full_like(t, float("inf"))) for t, valid in candidates])
    return ts.amin(dim=0)


def _sphere(o, d, e):
    a = (d * d).sum(-1)
    b = (o * d).sum(-1)
    c = (o * o).sum(-1) - 1.0
    t0, t1 = _quadratic_roots(a, b, c)
    return torch.where(t0 > _EPS, t0, torch.where(t1 > _EPS, t1, torch.full_like(t0, float("inf"))))


def _box(o, d, e):
    d_safe = torch.where(d.abs() > _EPS, d, torch.full_like(d, _EPS))
    t_a = (-e - o) / d_safe
    t_b = (e - o) / d_safe
    t_near = torch.minimum(t_a, t_b).amax(-1)
    t_far = torch.maximum(t_a, t_b).amin(-1)
    hit = (t_far >= t_near) & (t_far > _EPS)
    t = torch.where(t_near > _EPS, t_near, t_far)
    return torch.where(hit, t, torch.full_like(t, float("inf")))


def _cylinder(o, d, e):
    r, h = e[0], e[1]
    ox, oy, oz = o.unbind(-1)
    dx, dy, dz = d.unbind(-1)
    a = dx * dx + dz * dz
    b = ox * dx + oz * dz
    c = ox * ox + oz * oz - r * r
    s0, s1 = _quadratic_roots(a, b, c)
    dy_safe = torch.where(dy.abs() > _EPS, dy, torch.full_like(dy, _EPS))
    cands = []
    for s in (s0, s1):
        y = oy + s.nan_to_num(posinf=0.0) * dy
        cands.append((s, torch.isfinite(s) & (y.abs() <= h)))
    for yc in (-h, h):
        s = (yc - oy) / dy_safe
        x, z = ox + s * dx, oz + s * dz
        cands.append((s, (dy.abs() > _EPS) & (x * x + z * z <= r * r)))
    return _nearest(cands)


def _cone(o, d, e):
    r, h = e[0], e[1]
    k = r / (2 * h)  # radius grows by k per unit of y from the apex at y = -h
    ox, oy, oz = o.unbind(-1)
    dx, dy, dz = d.unbind(-1)
    oy_a = oy + h
    a = dx * dx + dz * dz - k * k * dy * dy
    b = ox * dx + oz * dz - k * k * oy_a * dy
    c = ox * ox + oz * oz - k * k * oy_a * oy_a
    s0, s1 = _quadratic_roots(a, b, c)
    dy_safe = torch.where(dy.abs() > _EPS, dy, torch.full_like(dy, _EPS))
    cands = []
    for s in (s0, s1):
        y = oy + s.nan_to_num(posinf=0.0) * dy
        cands.append((s, torch.isfinite(s) & (y >= -h) & (y <= h)))
    s = (h - oy) / dy_safe
    x, z = ox + s * dx, oz + s * dz
    cands.append((s, (dy.abs() > _EPS) & (x * x + z * z <= r * r)))
    return _nearest(cands)


_INTERSECT = {"sphere": _sphere, "box": _box, "cylinder": _cylinder, "cone": _cone}


def surface_normal(shape: str, p: torch.Tensor, proportions: torch.Tensor) -> torch.Tensor:
    """Outward unit normals (N, 3) at surface points ``p`` (N, 3), object coordinates.

    For shapes with edges, the normal of the face whose residual is largest (the face the point is on).
    """
    check_choice("shape", shape, SHAPES)
    e = proportions.to(p)
    if shape == "sphere":
        n = p
    elif shape == "box":
        q = p.abs() - e
        axis = q.argmax(-1)
        n = torch.nn.functional.one_hot(axis, 3).to(p) * torch.sign(p).gather(-1, axis[:, None])
    else:
        x, y, z = p.unbind(-1)
        rad = torch.sqrt(x * x + z * z).clamp_min(1e-12)
        r, h = e[0], e[1]
        if shape == "cylinder":
            side = torch.stack([x / rad, torch.zeros_like(y), z / rad], -1)
            on_side = (rad - r) >= (y.abs() - h)
            cap = torch.stack([torch.zeros_like(y), torch.sign(y), torch.zeros_like(y)], -1)
        else:
            k = r / (2 * h)
            # gradient of rad - k (y + h), normalised
            side = torch.stack([x / rad, torch.full_like(y, -k), z / rad], -1)
            on_side = (rad - k * (y + h)) >= (y - h)
            cap = torch.stack([torch.zeros_like(y), torch.ones_like(y), torch.zeros_like(y)], -1)
        n = torch.where(on_side[:, None], side, cap)
    return n / n.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def intersect(shape: str, origins: torch.Tensor, directions: torch.Tensor, proportions) -> tuple[torch.Tensor, torch.Tensor]:
    """First hit of rays ``origins + t * directions`` (N, 3) each with a shape, object coordinates.

    Returns ``t`` (N,) (``+inf`` on a miss) and the hit points (N, 3) (origins where missed).
    """
    check_choice("shape", shape, SHAPES)
    e = torch.as_tensor(proportions, dtype=origins.dtype)
    t = _INTERSECT[shape](origins, directions, e)
    hit = torch.isfinite(t)
    p = origins + torch.where(hit, t, torch.zeros_like(t))[:, None] * directions
    return t, p


def surface_residual(shape: str, p: torch.Tensor, proportions) -> torch.Tensor:
    """Implicit function (N,) of object-space points ``p`` (N, 3): 0 on the surface, < 0 inside.

    Exact distance for the sphere and box faces; a distance-like value for cylinder and cone.
    """
    check_choice("shape", shape, SHAPES)
    e = torch.as_tensor(proportions, dtype=p.dtype)
    if shape == "sphere":
        return p.norm(dim=-1) - 1.0
    if shape == "box":
        return (p.abs() - e).amax(-1)
    x, y, z = p.unbind(-1)
    rad = torch.sqrt(x * x + z * z)
    r, h = e[0], e[1]
    if shape == "cylinder":
        return torch.maximum(rad - r, y.abs() - h)
    k = r / (2 * h)
    side = (rad - k * (y + h)) / (1 + k * k) ** 0.5
    return torch.maximum(side, torch.maximum(y - h, -h - y))
