"""Segment transport: jointly generate a structurally aligned pair with a rectified-flow model.

From "One Algorithm to Align Them All" (CVPR 2026); the method as corrlab implements it is written
out in ``/work/shared/spec/methods.md`` section 3. Rectified flow ``x_t = (1 - t) x_0 + t eps``
(``t = 1`` noise, ``t = 0`` data); a step from ``t1`` to ``t2`` is ``x <- x + (t2 - t1) v``.

Two endpoints ``x_a``, ``x_b`` start from the same noise. Each step, ``k`` points
``x_i = (1 - alpha_i) x_a + alpha_i x_b`` with conditions ``c_i = (1 - alpha_i) c_a + alpha_i c_b`` are
evaluated in ONE batched call of the velocity function; a weighted least-squares line fit of their
velocities over alpha gives the endpoint velocities (the closed form of the paper's regression of the
stepped points, in velocity form); both are pulled towards an anchor velocity
``v <- w_t v_anchor + (1 - w_t) v`` (the model's velocity at the midpoint, or the mean of the two), so that
``v_b - v_a`` shrinks by exactly ``1 - w_t``.

The ablation chain of the paper is one sampler with five modes:

=============== ==================================================================================
``full``        k weighted points, midpoint anchor (A)
``anchor-mean`` k weighted points, anchor ``(v_a + v_b) / 2`` (B)
``endpoints``   only alpha in {0, 1}, anchor ``(v_a + v_b) / 2`` (C)
``hard-cut``    MatchDiffusion: shared ``(v_a + v_b) / 2`` for ``num_joint_steps``, then independent (D)
``independent`` same noise, no coupling
=============== ==================================================================================

A velocity function is any callable ``velocity_fn(x (K, *S), t: float, cond (K, *C)) -> v (K, *S)``;
a condition is a tensor ``(*C)`` or a tuple of tensors (interpolated leaf by leaf). Adapters for the
embedded model and diffusers transformers live in :mod:`corrlab.interventions.velocity_adapters`.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Callable, Literal, Sequence, Union

import pandas as pd
import torch
from tqdm.auto import tqdm

from ..errors import CorrlabError, ShapeError, ValueRangeError, check_choice, describe
from .schedules import LinearDecaySmoothing, MidpointToUniformWeights

__all__ = [
    "MODES",
    "Condition",
    "VelocityFn",
    "SegmentTransportConfig",
    "StepPlan",
    "SegmentResult",
    "segment_alphas",
    "interpolate_points",
    "interpolate_conditions",
    "line_fit_coefficients",
    "fit_segment_endpoints",
    "plan_step",
    "segment_step",
    "segment_transport",
    "alpha_sweep",
    "history_frame",
]

Mode = Literal["full", "anchor-mean", "endpoints", "hard-cut", "independent"]
MODES: tuple[str, ...] = ("full", "anchor-mean", "endpoints", "hard-cut", "independent")
Condition = Union[torch.Tensor, tuple]
VelocityFn = Callable[[torch.Tensor, float, Condition], torch.Tensor]


# --------------------------------------------------------------------------- configuration
@dataclass(frozen=True)
class SegmentTransportConfig:
    """Every parameter of the sampler.

    Attributes:
        mode: one of :data:`MODES`.
        k: number of points on the segment (``full``, ``anchor-mean``); alphas ``linspace(0, 1, k)``, so an odd
            ``k`` includes the midpoint and the anchor costs nothing extra.
        weight_schedule: ``(step_frac, alphas (k,) float64) -> p (k,)``, non-negative, positive on at least two
            distinct alphas. Default :class:`~corrlab.interventions.schedules.MidpointToUniformWeights`.
        smoothing_schedule: ``step_frac -> w_t`` in [0, 1]. Default
            :class:`~corrlab.interventions.schedules.LinearDecaySmoothing` (0.7 decaying to 0 at half way).
        num_joint_steps: ``hard-cut``: steps that share the averaged velocity; ``None`` means
            ``round(joint_fraction * T)``.
        joint_fraction: see ``num_joint_steps`` (MatchDiffusion's examples share 7-15 of 50 steps).
    """

    mode: Mode = "full"
    k: int = 5
    weight_schedule: Callable[[float, torch.Tensor], torch.Tensor] = field(default_factory=MidpointToUniformWeights)
    smoothing_schedule: Callable[[float], float] = field(default_factory=LinearDecaySmoothing)
    num_joint_steps: int | None = None
    joint_fraction: float = 0.25

    def __post_init__(self):
        check_choice("mode", self.mode, MODES)
        if not isinstance(self.k, int) or isinstance(self.k, bool) or self.k < 2:
            raise ValueRangeError(f"k: expected an integer number of segment points >= 2, got {self.k!r}")
        if not callable(self.weight_schedule):
            raise CorrlabError(f"weight_schedule: expected a callable (step_frac, alphas) -> p, got {describe(self.weight_schedule)}")
        if not callable(self.smoothing_schedule):
            raise CorrlabError(f"smoothing_schedule: expected a callable step_frac -> w, got {describe(self.smoothing_schedule)}")
        if self.num_joint_steps is not None and (not isinstance(self.num_joint_steps, int) or self.num_joint_steps < 0):
            raise ValueRangeError(f"num_joint_steps: expected a non-negative integer or None, got {self.num_joint_steps!r}")
        if not 0 <= self.joint_fraction <= 1:
            raise ValueRangeError(f"joint_fraction: expected a value in [0, 1], got {self.joint_fraction!r}")

    def joint_steps(self, num_steps: int) -> int:
        """Number of shared steps of ``hard-cut`` in a trajectory of ``num_steps`` steps."""
        n = self.num_joint_steps if self.num_joint_steps is not None else round(self.joint_fraction * num_steps)
        return min(n, num_steps)


@dataclass(frozen=True)
class StepPlan:
    """What one step does: ``alphas (k,)`` and ``weights (k,)`` float64, smoothing ``w`` and the anchor kind."""

    alphas: torch.Tensor
    weights: torch.Tensor
    w: float
    anchor: Literal["midpoint", "mean"]


@dataclass
class SegmentResult:
    """Output of :func:`segment_transport`.

    Attributes:
        x_a, x_b: the endpoints at the last time, ``(*S)``.
        config: the configuration that produced them.
        history: with ``return_trajectory``: ``t (T+1,)``, ``x_a``, ``x_b (T+1, *S)``,
            ``segment_length (T+1,)`` (``||x_b - x_a||``), ``w (T,)``, ``weights (T, k)`` (``p_t`` at
            :attr:`alphas`), ``num_evals (T,)`` (points evaluated in the step's one call); else ``None``.
    """

    x_a: torch.Tensor
    x_b: torch.Tensor
    config: SegmentTransportConfig
    history: dict | None = None

    @property
    def alphas(self) -> torch.Tensor:
        """``(k,)`` float64 positions of the segment points this mode transported (``(0, 1)`` without intermediate points)."""
        if self.config.mode in ("full", "anchor-mean"):
            return segment_alphas(self.config.k)
        return torch.tensor([0.0, 1.0], dtype=torch.float64)

    def sweep(self, m: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``alpha_sweep(self, m)``."""
        return alpha_sweep(self, m)


# --------------------------------------------------------------------------- pure pieces
def segment_alphas(k: int) -> torch.Tensor:
    """``(k,)`` float64 alphas evenly spaced on [0, 1], both ends included (0.5 included for odd k)."""
    if not isinstance(k, int) or k < 2:
        raise ValueRangeError(f"k: expected an integer >= 2, got {k!r}")
    return torch.linspace(0.0, 1.0, k, dtype=torch.float64)


def interpolate_points(x_a: torch.Tensor, x_b: torch.Tensor, alphas: torch.Tensor) -> torch.Tensor:
    """Points ``(1 - alpha) x_a + alpha x_b`` on the segment: ``(*S), (*S), (K,) -> (K, *S)``.

    Exact at the ends: alpha = 0 returns ``x_a`` and alpha = 1 returns ``x_b`` bit for bit.
    """
    if x_a.shape != x_b.shape:
        raise ShapeError(f"x_b: expected the shape of x_a {tuple(x_a.shape)}, got {describe(x_b)}")
    a = torch.as_tensor(alphas).to(device=x_a.device, dtype=x_a.dtype).reshape(-1, *([1] * x_a.dim()))
    return (1 - a) * x_a.unsqueeze(0) + a * x_b.unsqueeze(0)


def _leaves(cond: Condition) -> tuple[torch.Tensor, ...]:
    return tuple(cond) if isinstance(cond, (tuple, list)) else (cond,)


def _rebuild(cond: Condition, leaves: Sequence[torch.Tensor]) -> Condition:
    return tuple(leaves) if isinstance(cond, (tuple, list)) else leaves[0]


def _check_conditions(cond_a: Condition, cond_b: Condition) -> None:
    la, lb = _leaves(cond_a), _leaves(cond_b)
    if len(la) != len(lb):
        raise CorrlabError(f"cond_b: expected the structure of cond_a ({len(la)} tensors), got {describe(cond_b)}")
    for i, (ca, cb) in enumerate(zip(la, lb)):
        if not isinstance(ca, torch.Tensor) or not isinstance(cb, torch.Tensor):
            raise CorrlabError(f"cond_a/cond_b[{i}]: expected torch tensors, got {describe(ca)} and {describe(cb)}")
        if ca.shape != cb.shape:
            raise ShapeError(f"cond_b[{i}]: expected the shape of cond_a[{i}] {tuple(ca.shape)}, got {describe(cb)}")
        if not (ca.is_floating_point() and cb.is_floating_point()):
            raise CorrlabError(f"cond_a/cond_b[{i}]: expected floating-point tensors (they are interpolated), got {ca.dtype}, {cb.dtype}")


def _conditions_equal(cond_a: Condition, cond_b: Condition) -> bool:
    return all(torch.equal(a, b) for a, b in zip(_leaves(cond_a), _leaves(cond_b)))


def interpolate_conditions(cond_a: Condition, cond_b: Condition, alphas: torch.Tensor) -> Condition:
    """``(1 - alpha) c_a + alpha c_b`` leaf by leaf: ``(*C), (*C), (K,) -> (K, *C)`` (same tuple structure)."""
    _check_conditions(cond_a, cond_b)
    out = []
    for ca, cb in zip(_leaves(cond_a), _leaves(cond_b)):
        dt = torch.promote_types(ca.dtype, torch.float32)
        out.append(interpolate_points(ca.to(dt), cb.to(dt), alphas))
    return _rebuild(cond_a, out)


def line_fit_coefficients(alphas: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Coefficients of the weighted least-squares line fit through points over alpha.

    Minimising ``sum_i p_i ||(1 - alpha_i) y_a + alpha_i y_b - y_i||^2`` gives
    ``y_a = sum_i g_i y_i`` and ``y_b = sum_i h_i y_i`` with (methods.md section 3, step 3)
    ``g_i = p_i (c11 (1 - alpha_i) - c01 alpha_i) / D``, ``h_i = p_i (c00 alpha_i - c01 (1 - alpha_i)) / D``.
    Both sum to 1 (constants are reproduced exactly in exact arithmetic).

    Args:
        alphas: ``(k,)`` positions on the segment.
        weights: ``(k,)`` non-negative weights ``p_i`` (any scale).

    Returns:
        ``g (k,)``, ``h (k,)`` float64.

    Raises:
        CorrlabError: fewer than two distinct alphas carry positive weight (``D = 0``), or the fit is
            numerically singular, or weights are negative / non-finite.
    """
    a = torch.as_tensor(alphas, dtype=torch.float64).reshape(-1)
    p = torch.as_tensor(weights, dtype=torch.float64).reshape(-1)
    if a.shape != p.shape:
        raise ShapeError(f"weights: expected one weight per alpha, shape {tuple(a.shape)}, got {describe(weights)}")
    if not bool(torch.isfinite(p).all()) or bool((p < 0).any()) or not float(p.sum()) > 0:
        raise ValueRangeError(f"weights: expected finite non-negative weights with a positive sum, got {p.tolist()}")
    support = torch.unique(a[p > 0])
    if support.numel() < 2:
        raise CorrlabError(
            f"weights: expected positive weight on at least two distinct alphas (else the line fit is singular, D = 0), "
            f"got weights {p.tolist()} at alphas {a.tolist()}"
        )
    p = p / p.sum()
    c00 = (p * (1 - a) ** 2).sum()
    c01 = (p * a * (1 - a)).sum()
    c11 = (p * a**2).sum()
    det = c00 * c11 - c01**2
    if not float(det) > 1e-12 * float(c00 * c11):
        raise CorrlabError(
            f"weights: the line fit is numerically singular (D = {float(det):.3e}); put weight on alphas further apart, "
            f"got weights {p.tolist()} at alphas {a.tolist()}"
        )
    g = p * (c11 * (1 - a) - c01 * a) / det
    h = p * (c00 * a - c01 * (1 - a)) / det
    return g, h


def fit_segment_endpoints(
    alphas: torch.Tensor, weights: torch.Tensor, y: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Endpoints of the weighted least-squares line through points ``y_i`` at ``alpha_i``, per coordinate.

    Args:
        alphas: ``(k,)``; weights: ``(k,)``; y: ``(k, *S)`` (stepped points or velocities: the fit is linear).

    Returns:
        ``y_a (*S)``, ``y_b (*S)`` in ``y``'s dtype (at least float32). Computed as
        ``y_ref + sum_i g_i (y_i - y_ref)`` with ``y_ref`` the most-weighted point, so ``k`` identical points give
        exactly that point back and nearly equal points keep their small differences precisely.
    """
    g, h = line_fit_coefficients(alphas, weights)
    if y.dim() < 1 or y.shape[0] != g.numel():
        raise ShapeError(f"y: expected shape ({g.numel()}, *S) (one row per alpha), got {describe(y)}")
    dt = torch.promote_types(y.dtype, torch.float32)
    y = y.to(dt)
    ref = y[int(torch.argmax(torch.as_tensor(weights, dtype=torch.float64)))]
    r = y - ref.unsqueeze(0)
    y_a = ref + torch.tensordot(g.to(dt, copy=False).to(y.device), r, dims=1)
    y_b = ref + torch.tensordot(h.to(dt, copy=False).to(y.device), r, dims=1)
    return y_a, y_b


def plan_step(config: SegmentTransportConfig, step: int, num_steps: int) -> StepPlan:
    """What step ``step`` of ``num_steps`` does under ``config`` (pure; ``step_frac = step / num_steps``)."""
    s = step / num_steps
    two = torch.tensor([0.0, 1.0], dtype=torch.float64)
    ones = torch.ones(2, dtype=torch.float64)
    if config.mode == "independent":
        return StepPlan(two, ones, 0.0, "mean")
    if config.mode == "hard-cut":
        return StepPlan(two, ones, 1.0 if step < config.joint_steps(num_steps) else 0.0, "mean")
    alphas = two if config.mode == "endpoints" else segment_alphas(config.k)
    weights = torch.as_tensor(config.weight_schedule(s, alphas.clone()), dtype=torch.float64).reshape(-1)
    if weights.shape != alphas.shape:
        raise ShapeError(f"weight_schedule: expected {alphas.numel()} weights at step {step}, got {describe(weights)}")
    w = float(config.smoothing_schedule(s))
    if not 0.0 <= w <= 1.0:
        raise ValueRangeError(f"smoothing_schedule: expected w_t in [0, 1], got {w} at step {step}")
    return StepPlan(alphas, weights, w, "midpoint" if config.mode == "full" else "mean")


def _check_velocity(v, k: int, shape: tuple, where: str) -> torch.Tensor:
    if not isinstance(v, torch.Tensor) or tuple(v.shape) != (k, *shape):
        raise ShapeError(f"velocity_fn: expected a tensor of shape {(k, *shape)} {where}, got {describe(v)}")
    if not bool(torch.isfinite(v).all()):
        raise ValueRangeError(f"velocity_fn: returned non-finite values {where}")
    return v


def segment_step(
    velocity_fn: VelocityFn,
    x_a: torch.Tensor,
    x_b: torch.Tensor,
    cond_a: Condition,
    cond_b: Condition,
    t1: float,
    t2: float,
    plan: StepPlan,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """One transport step of the segment ``[x_a, x_b]`` from ``t1`` to ``t2``.

    Evaluates the points with positive weight (plus the midpoint when the anchor needs it and 0.5 is not
    among them) in ONE call of ``velocity_fn``, fits the endpoint velocities, smooths them towards the
    anchor and steps. Returns ``(x_a', x_b', number of evaluated points)``; ``x_b' - x_a'`` equals
    ``x_b - x_a + (t2 - t1) (1 - w) (v_b - v_a)`` with ``v_a, v_b`` the fitted velocities.
    """
    keep = plan.weights > 0
    alphas, weights = plan.alphas[keep], plan.weights[keep]
    need_mid = plan.anchor == "midpoint" and plan.w > 0
    mid_idx = None
    if need_mid:
        close = torch.isclose(alphas, torch.tensor(0.5, dtype=torch.float64), rtol=0, atol=1e-12).nonzero()
        if close.numel():
            mid_idx = int(close[0])
        else:
            alphas = torch.cat([alphas, torch.tensor([0.5], dtype=torch.float64)])
            mid_idx = alphas.numel() - 1
    n_fit = int(keep.sum())
    x_pts = interpolate_points(x_a, x_b, alphas)
    c_pts = interpolate_conditions(cond_a, cond_b, alphas)
    v = _check_velocity(velocity_fn(x_pts, float(t1), c_pts), alphas.numel(), tuple(x_a.shape), f"at t = {float(t1):.4f}")
    v = v.to(x_a.dtype)
    v_a, v_b = fit_segment_endpoints(alphas[:n_fit], weights, v[:n_fit])
    if plan.w > 0:
        anchor = v[mid_idx] if need_mid else 0.5 * (v_a + v_b)
        v_a = plan.w * anchor + (1 - plan.w) * v_a
        v_b = plan.w * anchor + (1 - plan.w) * v_b
    h = float(t2) - float(t1)
    return x_a + h * v_a, x_b + h * v_b, alphas.numel()


def _check_timesteps(timesteps) -> torch.Tensor:
    ts = torch.as_tensor(timesteps, dtype=torch.float64).reshape(-1) if timesteps is not None else None
    if ts is None or ts.numel() < 2:
        raise ShapeError(f"timesteps: expected (T+1,) times decreasing from 1 to 0 with T >= 1, got {describe(timesteps)}")
    if not bool(torch.isfinite(ts).all()) or float(ts.min()) < 0 or float(ts.max()) > 1:
        raise ValueRangeError(f"timesteps: expected finite times in [0, 1], got min {float(ts.min())}, max {float(ts.max())}")
    if not bool((ts[1:] < ts[:-1]).all()):
        raise ValueRangeError(f"timesteps: expected strictly decreasing times (1 = noise, 0 = data), got {ts.tolist()[:6]}...")
    return ts


def segment_transport(
    velocity_fn: VelocityFn,
    noise: torch.Tensor,
    cond_a: Condition,
    cond_b: Condition,
    timesteps: torch.Tensor,
    *,
    config: SegmentTransportConfig | None = None,
    mode: Mode | None = None,
    k: int | None = None,
    weight_schedule: Callable | None = None,
    smoothing_schedule: Callable | None = None,
    num_joint_steps: int | None = None,
    return_trajectory: bool = False,
    progress: bool = True,
) -> SegmentResult:
    """Jointly generate the endpoints of a segment from the same noise (see the module docstring).

    Args:
        velocity_fn: ``(x (K, *S), t, cond (K, *C)) -> v (K, *S)``, one batched call per step.
        noise: ``(*S)`` initial noise shared by both endpoints.
        cond_a, cond_b: conditions ``(*C)`` (or tuples of tensors) of the two endpoints, same shapes.
        timesteps: ``(T+1,)`` strictly decreasing times in [0, 1] (normally 1 to 0).
        config: a :class:`SegmentTransportConfig`; the keyword arguments ``mode``, ``k``, ``weight_schedule``,
            ``smoothing_schedule``, ``num_joint_steps`` override its fields when given.
        return_trajectory: keep the endpoints at every time in ``result.history``.
        progress: show a tqdm bar.

    Returns:
        :class:`SegmentResult` with ``x_a``, ``x_b`` ``(*S)`` in float32 (or the noise's dtype if wider).
        Identical conditions give bit-identical endpoints (the segment stays a point: one evaluation per step).
    """
    overrides = {
        n: v
        for n, v in dict(
            mode=mode, k=k, weight_schedule=weight_schedule, smoothing_schedule=smoothing_schedule, num_joint_steps=num_joint_steps
        ).items()
        if v is not None
    }
    if config is not None and not isinstance(config, SegmentTransportConfig):
        raise CorrlabError(f"config: expected a SegmentTransportConfig or None, got {describe(config)}")
    config = dataclasses.replace(config or SegmentTransportConfig(), **overrides)
    if not callable(velocity_fn):
        raise CorrlabError(f"velocity_fn: expected a callable (x, t, cond) -> v, got {describe(velocity_fn)}")
    if not isinstance(noise, torch.Tensor) or not noise.is_floating_point() or noise.dim() == 0:
        raise CorrlabError(f"noise: expected a floating-point tensor (*S), got {describe(noise)}")
    if not bool(torch.isfinite(noise).all()):
        raise ValueRangeError(f"noise: expected finite values, got {describe(noise)} with non-finite entries")
    _check_conditions(cond_a, cond_b)
    ts = _check_timesteps(timesteps)
    num_steps = ts.numel() - 1

    dt = torch.promote_types(noise.dtype, torch.float32)
    x_a = noise.detach().to(dt).clone()
    x_b = x_a.clone()
    same = _conditions_equal(cond_a, cond_b)
    keep = return_trajectory
    hist = {"x_a": [x_a.clone()], "x_b": [x_b.clone()], "w": [], "weights": [], "num_evals": []} if keep else None

    for i in tqdm(range(num_steps), desc=f"segment transport ({config.mode})", disable=not progress, leave=False):
        plan = plan_step(config, i, num_steps)  # validates the schedules even in the degenerate case
        with torch.no_grad():
            if same:  # the segment is a point: one evaluation, both endpoints move together
                one = torch.tensor([0.0], dtype=torch.float64)
                v = _check_velocity(
                    velocity_fn(x_a.unsqueeze(0), float(ts[i]), interpolate_conditions(cond_a, cond_b, one)),
                    1, tuple(x_a.shape), f"at t = {float(ts[i]):.4f}",
                )[0].to(dt)
                x_a = x_a + (float(ts[i + 1]) - float(ts[i])) * v
                x_b, n = x_a.clone(), 1
            else:
                x_a, x_b, n = segment_step(velocity_fn, x_a, x_b, cond_a, cond_b, ts[i], ts[i + 1], plan)
        if keep:
            hist["x_a"].append(x_a.clone())
            hist["x_b"].append(x_b.clone())
            hist["w"].append(plan.w)
            hist["weights"].append(plan.weights / plan.weights.sum())
            hist["num_evals"].append(n)

    history = None
    if keep:
        xa, xb = torch.stack(hist["x_a"]), torch.stack(hist["x_b"])
        history = {
            "t": ts,
            "x_a": xa,
            "x_b": xb,
            "segment_length": (xb - xa).flatten(1).norm(dim=1),
            "w": torch.tensor(hist["w"], dtype=torch.float64),
            "weights": torch.stack(hist["weights"]),
            "num_evals": torch.tensor(hist["num_evals"], dtype=torch.int64),
        }
    return SegmentResult(x_a=x_a, x_b=x_b, config=config, history=history)


def alpha_sweep(result: SegmentResult | tuple[torch.Tensor, torch.Tensor], m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``m`` points evenly spaced along the final segment, ends included.

    Args:
        result: a :class:`SegmentResult` or a pair ``(x_a, x_b)`` of ``(*S)`` tensors.
        m: number of points, >= 2.

    Returns:
        ``alphas (m,)`` float64 and ``x (m, *S)`` with ``x[j] = (1 - alphas[j]) x_a + alphas[j] x_b``.
    """
    if isinstance(result, SegmentResult):
        x_a, x_b = result.x_a, result.x_b
    elif isinstance(result, (tuple, list)) and len(result) == 2:
        x_a, x_b = result
    else:
        raise CorrlabError(f"result: expected a SegmentResult or a pair (x_a, x_b), got {describe(result)}")
    if not isinstance(m, int) or isinstance(m, bool) or m < 2:
        raise ValueRangeError(f"m: expected an integer number of sweep points >= 2, got {m!r}")
    alphas = torch.linspace(0.0, 1.0, m, dtype=torch.float64)
    return alphas, interpolate_points(x_a, x_b, alphas)


def history_frame(result: SegmentResult) -> pd.DataFrame:
    """Tidy per-step table of a trajectory: columns ``step, t, segment_length, w, num_evals``.

    ``sns.lineplot(data=history_frame(r), x="t", y="segment_length")`` shows how the pair separates.
    """
    if result.history is None:
        raise CorrlabError("result: expected a SegmentResult made with return_trajectory=True, got one without history")
    h = result.history
    n = h["t"].numel()
    w = [math.nan] + h["w"].tolist()
    ne = [0] + h["num_evals"].tolist()
    return pd.DataFrame(
        {
            "step": range(n),
            "t": h["t"].tolist(),
            "segment_length": h["segment_length"].tolist(),
            "w": w,
            "num_evals": ne,
            "mode": result.config.mode,
        }
    )
