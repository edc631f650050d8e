"""Schedules of the segment-transport sampler: point weights ``p_t(alpha)``, smoothing ``w_t``, timesteps.

The paper ("One Algorithm to Align Them All") publishes no schedules, only their shape: the point
weights are "concentrated near the midpoint early, gradually uniform", the smoothing weight is
"moderate, stronger early". corrlab's defaults follow ``/work/shared/spec/methods.md`` section 3:

* :class:`MidpointToUniformWeights`: ``p_t(alpha) ~ exp(-(alpha - 0.5)^2 / (2 sigma_t^2)) + floor``,
  ``sigma_t`` growing geometrically from ``sigma_start = 0.1`` to ``sigma_end = 3`` (effectively uniform on
  ``[0, 1]``: the end points then get 0.986 of the midpoint's weight) over the first ``ramp_fraction = 0.4``
  of the steps, exactly uniform after that. The floor (0.05) keeps the line fit well conditioned.
* :class:`LinearDecaySmoothing`: ``w_t = w_start * max(0, 1 - s / end_fraction)``, ``w_start = 0.7``,
  reaching 0 at ``end_fraction = 0.5`` of the trajectory.

A weight schedule is any callable ``(step_frac: float, alphas (k,) float64) -> p (k,)`` and a smoothing
schedule any callable ``step_frac -> w`` in [0, 1]; ``step_frac = i / T`` for step ``i`` of ``T``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import CorrlabError, ValueRangeError

__all__ = [
    "MidpointToUniformWeights",
    "UniformWeights",
    "FixedWeights",
    "LinearDecaySmoothing",
    "ConstantSmoothing",
    "linear_timesteps",
    "shifted_timesteps",
]


@dataclass(frozen=True)
class MidpointToUniformWeights:
    """Gaussian weights around alpha = 0.5 whose width grows to uniform over the first ``ramp_fraction``.

    ``p(alpha) = exp(-(alpha - 0.5)^2 / (2 sigma^2)) + floor``, normalised to sum 1, with
    ``sigma = sigma_start * (sigma_end / sigma_start) ** (s / ramp_fraction)`` for ``s < ramp_fraction``
    and exactly uniform weights afterwards.
    """

    sigma_start: float = 0.1
    sigma_end: float = 3.0
    ramp_fraction: float = 0.4
    floor: float = 0.05

    def __post_init__(self):
        if not (self.sigma_start > 0 and self.sigma_end >= self.sigma_start):
            raise ValueRangeError(
                f"sigma_start, sigma_end: expected 0 < sigma_start <= sigma_end, got {self.sigma_start}, {self.sigma_end}"
            )
        if not 0 < self.ramp_fraction <= 1:
            raise ValueRangeError(f"ramp_fraction: expected a value in (0, 1], got {self.ramp_fraction}")
        if self.floor < 0:
            raise ValueRangeError(f"floor: expected a non-negative weight floor, got {self.floor}")

    def sigma(self, step_frac: float) -> float:
        """Width ``sigma_t`` at ``step_frac`` (``inf`` once uniform)."""
        if step_frac >= self.ramp_fraction:
            return math.inf
        return self.sigma_start * (self.sigma_end / self.sigma_start) ** (step_frac / self.ramp_fraction)

    def __call__(self, step_frac: float, alphas: torch.Tensor) -> torch.Tensor:
        alphas = torch.as_tensor(alphas, dtype=torch.float64)
        sigma = self.sigma(step_frac)
        if math.isinf(sigma):
            p = torch.ones_like(alphas)
        else:
            p = torch.exp(-((alphas - 0.5) ** 2) / (2 * sigma**2)) + self.floor
        return p / p.sum()


@dataclass(frozen=True)
class UniformWeights:
    """Equal weight on every point at every step."""

    def __call__(self, step_frac: float, alphas: torch.Tensor) -> torch.Tensor:
        alphas = torch.as_tensor(alphas, dtype=torch.float64)
        return torch.full_like(alphas, 1.0 / len(alphas))


@dataclass(frozen=True)
class FixedWeights:
    """The same given weights ``(k,)`` at every step (e.g. ``(1, 0, 0, 0, 1)``: endpoints only)."""

    weights: tuple[float, ...]

    def __call__(self, step_frac: float, alphas: torch.Tensor) -> torch.Tensor:
        if len(self.weights) != len(alphas):
            raise CorrlabError(
                f"weights: expected {len(alphas)} weights (one per alpha), got {len(self.weights)}: {self.weights}"
            )
        return torch.tensor(self.weights, dtype=torch.float64)


@dataclass(frozen=True)
class LinearDecaySmoothing:
    """``w_t = w_start * max(0, 1 - s / end_fraction)``: strong early, zero from ``end_fraction`` on."""

    w_start: float = 0.7
    end_fraction: float = 0.5

    def __post_init__(self):
        if not 0 <= self.w_start <= 1:
            raise ValueRangeError(f"w_start: expected a value in [0, 1], got {self.w_start}")
        if not 0 < self.end_fraction <= 1:
            raise ValueRangeError(f"end_fraction: expected a value in (0, 1], got {self.end_fraction}")

    def __call__(self, step_frac: float) -> float:
        return self.w_start * max(0.0, 1.0 - step_frac / self.end_fraction)


@dataclass(frozen=True)
class ConstantSmoothing:
    """``w_t = w`` at every step (``w = 0``: no smoothing)."""

    w: float = 0.0

    def __post_init__(self):
        if not 0 <= self.w <= 1:
            raise ValueRangeError(f"w: expected a value in [0, 1], got {self.w}")

    def __call__(self, step_frac: float) -> float:
        return self.w


def linear_timesteps(num_steps: int) -> torch.Tensor:
    """``(num_steps + 1,)`` float64 times from 1 (noise) to 0 (data), evenly spaced."""
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueRangeError(f"num_steps: expected a positive integer, got {num_steps!r}")
    return torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)


def shifted_timesteps(num_steps: int, shift: float) -> torch.Tensor:
    """Flux/Wan-style shifted times ``t' = shift t / (1 + (shift - 1) t)``, ``(num_steps + 1,)`` from 1 to 0.

    ``shift > 1`` spends more steps at high noise (diffusers' ``FlowMatchEulerDiscreteScheduler(shift=...)``).
    """
    if not shift > 0:
        raise ValueRangeError(f"shift: expected a positive number, got {shift!r}")
    t = linear_timesteps(num_steps)
    return shift * t / (1 + (shift - 1) * t)
