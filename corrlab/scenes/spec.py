"""The scene vocabulary and :class:`SceneSpec`: one textured object, fully determined by a seed.

A prompt ("red striped box": colour, pattern, shape) names only three discrete words; a scene also
has continuous parameters the prompt does not fix (position offset, size, rotation, proportions,
texture scale/phase/axis, the neutral secondary colour, the light direction).

Object coordinates: ``p_obj = rotation^T (x_world - position) / size``; in them the object's largest
half-extent is 1. The world's up direction is ``-y`` (as :func:`corrlab.geometry.look_at` assumes).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from ..errors import CorrlabError, ValueRangeError, check_choice

__all__ = ["VOCABULARY", "PALETTE", "SceneSpec", "sample_scene", "scene_generator"]

#: Named primary colours (sRGB in [0, 1]); the colour word is the object's dominant hue.
PALETTE: dict[str, tuple[float, float, float]] = {
    "red": (0.86, 0.11, 0.10),
    "orange": (0.96, 0.50, 0.06),
    "yellow": (0.95, 0.85, 0.10),
    "green": (0.13, 0.64, 0.18),
    "cyan": (0.08, 0.74, 0.80),
    "blue": (0.12, 0.27, 0.86),
    "purple": (0.50, 0.17, 0.70),
    "pink": (0.96, 0.44, 0.70),
}

VOCABULARY: dict[str, list[str]] = {
    "colour": list(PALETTE),
    "pattern": ["striped", "checkered", "dotted"],
    "shape": ["sphere", "box", "cylinder", "cone"],
}

_SEED_MAX = 2**63 - 1


def _luma(rgb) -> float:
    r, g, b = rgb
    return 0.299 * r + 0.587 * g + 0.114 * b


def _check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= _SEED_MAX:
        raise CorrlabError(f"seed: expected an int in [0, 2**63 - 1], got {seed!r}")
    return seed


def scene_generator(seed: int, stream: str) -> torch.Generator:
    """A CPU ``torch.Generator`` for one named random stream of ``seed`` (scene, cameras, ...).

    Different streams of one seed are independent; the same (seed, stream) always gives the same numbers.
    """
    seed = _check_seed(seed)
    salt = sum((i + 1) * 131 * ord(c) for i, c in enumerate(stream))
    mixed = (seed * 6364136223846793005 + 1442695040888963407 + salt * 2654435761) % (2**63)
    return torch.Generator().manual_seed(mixed)


def _vec3(name: str, v) -> tuple[float, float, float]:
    try:
        t = tuple(float(x) for x in v)
    except TypeError:
        raise CorrlabError(f"{name}: expected 3 numbers, got {v!r}") from None
    if len(t) != 3 or not all(math.isfinite(x) for x in t):
        raise CorrlabError(f"{name}: expected 3 finite numbers, got {v!r}")
    return t


@dataclass(frozen=True)
class SceneSpec:
    """One procedural object. All fields are plain Python values (JSON-able via :meth:`to_dict`).

    shape, colour, pattern: words from :data:`VOCABULARY`.
    primary_rgb: the named colour; secondary_rgb: a neutral grey level (white, grey or near-black).
    position (3,): object centre in world units. size: world half-extent of the largest dimension.
    rotation: (3, 3) object-to-world rotation, rows as tuples. proportions (3,): half-extents in object
    coordinates along x, y, z (max 1; for cylinder/cone (radius, half-height, radius), y is the axis).
    texture_scale: multiplies the pattern's cell sizes; texture_phase (3,): offset of the pattern in
    object coordinates; texture_axis (3,): unit stripe direction; texture_seed: the pattern's hash tables.
    light_dir (3,): unit direction towards the light, world coordinates.
    """

    shape: str
    colour: str
    pattern: str
    primary_rgb: tuple[float, float, float]
    secondary_rgb: tuple[float, float, float]
    position: tuple[float, float, float]
    size: float
    rotation: tuple[tuple[float, float, float], ...]
    proportions: tuple[float, float, float]
    texture_scale: float
    texture_phase: tuple[float, float, float]
    texture_axis: tuple[float, float, float]
    texture_seed: int
    light_dir: tuple[float, float, float]
    seed: int | None = None

    def __post_init__(self):
        check_choice("shape", self.shape, VOCABULARY["shape"])
        check_choice("colour", self.colour, VOCABULARY["colour"])
        check_choice("pattern", self.pattern, VOCABULARY["pattern"])
        for name in ("primary_rgb", "secondary_rgb", "position", "proportions", "texture_phase", "texture_axis", "light_dir"):
            object.__setattr__(self, name, _vec3(name, getattr(self, name)))
        for name in ("primary_rgb", "secondary_rgb"):
            if not all(0.0 <= c <= 1.0 for c in getattr(self, name)):
                raise ValueRangeError(f"{name}: expected RGB values in [0, 1], got {getattr(self, name)}")
        if not (math.isfinite(self.size) and self.size > 0):
            raise ValueRangeError(f"size: expected a positive number, got {self.size!r}")
        if not (math.isfinite(self.texture_scale) and self.texture_scale > 0):
            raise ValueRangeError(f"texture_scale: expected a positive number, got {self.texture_scale!r}")
        if not all(0.0 < p <= 1.0 + 1e-9 for p in self.proportions):
            raise ValueRangeError(f"proportions: expected half-extents in (0, 1], got {self.proportions}")
        rot = tuple(_vec3(f"rotation[{i}]", r) for i, r in enumerate(self.rotation))
        if len(rot) != 3:
            raise CorrlabError(f"rotation: expected a 3x3 matrix, got {len(rot)} rows")
        R = torch.tensor(rot, dtype=torch.float64)
        err = float((R @ R.T - torch.eye(3, dtype=torch.float64)).abs().max())
        if err > 1e-6 or float(torch.linalg.det(R)) < 0:
            raise ValueRangeError(f"rotation: expected a rotation matrix, got |R R^T - I|max = {err:.2e}")
        object.__setattr__(self, "rotation", rot)
        for name in ("texture_axis", "light_dir"):
            n = math.sqrt(sum(c * c for c in getattr(self, name)))
            if n < 1e-9:
                raise ValueRangeError(f"{name}: expected a non-zero direction, got {getattr(self, name)}")
            object.__setattr__(self, name, tuple(c / n for c in getattr(self, name)))
        object.__setattr__(self, "size", float(self.size))
        object.__setattr__(self, "texture_scale", float(self.texture_scale))
        object.__setattr__(self, "texture_seed", int(self.texture_seed))

    @property
    def prompt(self) -> str:
        """The caption: ``"<colour> <pattern> <shape>"``, e.g. ``"red striped box"``."""
        return f"{self.colour} {self.pattern} {self.shape}"

    @property
    def rotation_matrix(self) -> torch.Tensor:
        """Object-to-world rotation (3, 3) float64."""
        return torch.tensor(self.rotation, dtype=torch.float64)

    def world_to_object(self, points) -> torch.Tensor:
        """World points (N, 3) -> object coordinates (N, 3) float64 (largest half-extent 1)."""
        from ..geometry import as_points

        X = as_points("points", points, 3)
        return (X - torch.tensor(self.position, dtype=torch.float64)) @ self.rotation_matrix / self.size

    def surface_residual(self, points) -> torch.Tensor:
        """How far world points (N, 3) are from the surface, in world units (N,): 0 on it, < 0 inside.

        Exact for sphere and box; distance-like (exact near the side faces) for cylinder and cone.
        """
        from .shapes import surface_residual

        return surface_residual(self.shape, self.world_to_object(points), self.proportions) * self.size

    def to_dict(self) -> dict:
        """JSON-able dict of every field (tuples become lists), plus the prompt."""
        d = asdict(self)
        d = {k: ([list(r) for r in v] if k == "rotation" else list(v) if isinstance(v, tuple) else v) for k, v in d.items()}
        d["prompt"] = self.prompt
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "SceneSpec":
        """Inverse of :meth:`to_dict` (the derived ``prompt`` key is ignored)."""
        fields = {k: v for k, v in d.items() if k != "prompt"}
        try:
            return cls(**fields)
        except TypeError as e:
            raise CorrlabError(f"scene dict: {e}; expected the keys of SceneSpec.to_dict()") from None


def _uniform(g: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=g, dtype=torch.float64))


def _choice(g: torch.Generator, items: list):
    return items[int(torch.randint(len(items), (), generator=g))]


def _axis_angle(axis: torch.Tensor, angle: float) -> torch.Tensor:
    """Rotation (3, 3) by ``angle`` radians about the unit ``axis`` (3,) (Rodrigues)."""
    x, y, z = axis.tolist()
    Kx = torch.tensor([[0.0, -z, y], [z, 0.0, -x], [-y, x, 0.0]], dtype=torch.float64)
    return torch.eye(3, dtype=torch.float64) + math.sin(angle) * Kx + (1 - math.cos(angle)) * Kx @ Kx


def _unit(g: torch.Generator) -> torch.Tensor:
    v = torch.randn(3, generator=g, dtype=torch.float64)
    return v / v.norm().clamp_min(1e-12)


def sample_scene(seed: int) -> SceneSpec:
    """Draw one object from the seed: words uniformly from :data:`VOCABULARY`, continuous params too.

    The object stands roughly upright (random yaw about the world's vertical, tilt up to 30 degrees),
    sits within 0.12 of the origin, and its largest half-extent is 0.6-0.8 world units (0.7-0.9 for
    spheres and cones).
    """
    g = scene_generator(seed, "scene")
    shape = _choice(g, VOCABULARY["shape"])
    colour = _choice(g, VOCABULARY["colour"])
    pattern = _choice(g, VOCABULARY["pattern"])
    primary = PALETTE[colour]
    # neutral secondary colour with strong luminance contrast to the primary (SIFT sees grey levels)
    luma = _luma(primary)
    use_white = luma < 0.4 or (luma <= 0.62 and _uniform(g, 0, 1) < 0.5)
    level = _uniform(g, 0.86, 1.0) if use_white else _uniform(g, 0.04, 0.16)
    secondary = (level, level, level)

    if shape == "sphere":
        props = (1.0, 1.0, 1.0)
    elif shape == "box":
        p = [_uniform(g, 0.55, 1.0) for _ in range(3)]
        m = max(p)
        props = tuple(v / m for v in p)
    else:  # cylinder, cone: (radius, half-height, radius)
        r = _uniform(g, 0.55, 1.0) if shape == "cylinder" else _uniform(g, 0.7, 1.0)
        h = _uniform(g, 0.6, 1.0)
        m = max(r, h)
        props = (r / m, h / m, r / m)

    # round shapes fill less of their bounding box: give them a larger half-extent
    size = _uniform(g, 0.7, 0.9) if shape in ("sphere", "cone") else _uniform(g, 0.6, 0.8)
    position = tuple(_uniform(g, -0.12, 0.12) for _ in range(3))
    yaw = _uniform(g, 0.0, 2 * math.pi)
    tilt = _uniform(g, 0.0, math.radians(30.0))
    tilt_dir = _uniform(g, 0.0, 2 * math.pi)
    R_yaw = _axis_angle(torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64), yaw)
    tilt_axis = torch.tensor([math.cos(tilt_dir), 0.0, math.sin(tilt_dir)], dtype=torch.float64)
    R = _axis_angle(tilt_axis, tilt) @ R_yaw
    rotation = tuple(tuple(r) for r in R.tolist())

    texture_scale = _uniform(g, 0.85, 1.2)
    texture_phase = tuple(_uniform(g, 0.0, 4.0) for _ in range(3))
    texture_axis = tuple(_unit(g).tolist())
    texture_seed = int(torch.randint(2**31 - 1, (), generator=g))
    # light from above (world up is -y), from a random side
    az = _uniform(g, 0.0, 2 * math.pi)
    el = _uniform(g, math.radians(35.0), math.radians(70.0))
    light = (math.cos(el) * math.sin(az), -math.sin(el), math.cos(el) * math.cos(az))
    return SceneSpec(
        shape=shape, colour=colour, pattern=pattern, primary_rgb=primary, secondary_rgb=secondary,
        position=position, size=size, rotation=rotation, proportions=props, texture_scale=texture_scale,
        texture_phase=texture_phase, texture_axis=texture_axis, texture_seed=texture_seed,
        light_dir=light, seed=seed,
    )
