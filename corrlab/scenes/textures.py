"""Solid (3D) textures: which surface points take the secondary colour, as a function of the object point.

Every pattern mixes features at two scales and breaks its own periodicity with per-cell random values
(hash tables drawn from ``texture_seed``), so that local patches are distinctive enough for SIFT:
"checkered" is a checkerboard whose randomly chosen cells hold a three-times finer checkerboard,
"dotted" is a jittered lattice of balls of random radius at two scales, "striped" is parallel bands
with a sparse overlay of random dots in the opposite colour. Lengths are in object coordinates
(the object's largest half-extent is 1).
"""
from __future__ import annotations

import torch

from ..errors import check_choice, check_shape

__all__ = ["PATTERNS", "HashTables", "hash_tables", "solid_texture"]

PATTERNS = ("striped", "checkered", "dotted")

# base cell sizes, multiplied by SceneSpec.texture_scale
CHECKER_CELL = 0.42
DOT_CELL = 0.42
STRIPE_PERIOD = 0.36

_TABLE = 256


class HashTables:
    """A permutation table (512,) and uniform random tables (16, 256) drawn from one seed."""

    def __init__(self, perm: torch.Tensor, uniform: torch.Tensor):
        self.perm = perm
        self.uniform = uniform

    def cell_hash(self, cells: torch.Tensor) -> torch.Tensor:
        """Integer lattice cells (N, 3) int64 -> hashes (N,) in [0, 256)."""
        c = cells & (_TABLE - 1)
        h = self.perm[c[:, 0]]
        h = self.perm[h + c[:, 1]]
        return self.perm[h + c[:, 2]]


def hash_tables(seed: int) -> HashTables:
    g = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(_TABLE, generator=g)
    uniform = torch.rand(16, _TABLE, generator=g, dtype=torch.float64)
    return HashTables(torch.cat([perm, perm]), uniform)


def _checker_parity(q: torch.Tensor) -> torch.Tensor:
    return (torch.floor(q).long().sum(-1) % 2) == 1


def _cell_value(q: torch.Tensor, tables: HashTables, table: int) -> torch.Tensor:
    """A random value in [0, 1) per unit lattice cell of points ``q`` (N, 3): (N,)."""
    return tables.uniform[table, tables.cell_hash(torch.floor(q).long())].to(q.dtype)


def _dots(q: torch.Tensor, tables: HashTables, first_table: int, radius: tuple[float, float], presence: float):
    """Balls in a jittered unit lattice: one per cell (with probability ``presence``), fully inside it.

    q: (N, 3) points in lattice units. Uses uniform tables ``first_table .. first_table + 5``.
    Returns inside (N,) bool and the ball's random tone (N,) in [0, 1).
    """
    cells = torch.floor(q)
    h = tables.cell_hash(cells.long())
    u = tables.uniform[first_table : first_table + 6, h].T.to(q.dtype)  # (N, 6)
    r = radius[0] + (radius[1] - radius[0]) * u[:, 0]
    centre = cells + r[:, None] + (1 - 2 * r[:, None]) * u[:, 1:4]
    return ((q - centre).norm(dim=-1) < r) & (u[:, 4] < presence), u[:, 5]


def solid_texture(pattern: str, p: torch.Tensor, tables: HashTables, scale: float, phase, axis) -> tuple[torch.Tensor, torch.Tensor]:
    """The texture at object-space points ``p`` (N, 3).

    Returns ``secondary`` (N,) bool (True where the neutral secondary colour shows) and ``tone``
    (N,) in [0, 1): a per-cell random lightness that makes every corner and dot locally distinct.
    scale multiplies the pattern's cell sizes; phase (3,) shifts it; axis (3,) is the stripe direction.
    """
    check_choice("pattern", pattern, PATTERNS)
    check_shape("p", p, (None, 3), expected="(N, 3)")
    phase = torch.as_tensor(phase, dtype=p.dtype)
    q = p + phase
    if pattern == "checkered":
        c = CHECKER_CELL * scale
        coarse = _checker_parity(q / c)
        fine = _checker_parity(q * (3.0 / c))
        use_fine = _cell_value(q / c, tables, 0) < 0.3
        second = torch.where(use_fine, fine, coarse)
        tone = torch.where(use_fine, _cell_value(q * (3.0 / c), tables, 1), _cell_value(q / c, tables, 2))
        return second, tone
    if pattern == "dotted":
        g = DOT_CELL * scale
        big, big_tone = _dots(q / g, tables, 3, radius=(0.22, 0.42), presence=0.9)
        small, small_tone = _dots((q + 0.37) / (0.5 * g), tables, 9, radius=(0.2, 0.38), presence=0.55)
        ground = _cell_value((q + 0.11) / (1.7 * g), tables, 15)
        tone = torch.where(big, big_tone, torch.where(small, small_tone, ground))
        return big | small, tone
    # striped
    period = STRIPE_PERIOD * scale
    axis = torch.as_tensor(axis, dtype=p.dtype)
    u = (q @ axis) / period
    stripe = torch.floor(u)
    bands = (u - stripe) < 0.5
    dots, dot_tone = _dots(q / (1.3 * period), tables, 3, radius=(0.15, 0.3), presence=0.5)
    band_tone = tables.uniform[1, stripe.long() & 255].to(p.dtype)
    return bands ^ dots, torch.where(dots, dot_tone, band_tone)
