"""Pair generation with the embedded model: two prompts, one segment transport, two aligned multi-view sets.

:func:`generate_pair` (one pair) and :func:`generate_pairs` (``P`` pairs in one transport, pairs being extra
coordinates of the line fit) run :func:`~corrlab.interventions.transport.segment_transport` over
:func:`~corrlab.interventions.velocity_adapters.embedded_velocity_fn` and return :class:`PairResult`
(two :class:`~corrlab.sets.MultiViewSet` and, optionally, sets along the final segment).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from ..errors import CorrlabError, ValueRangeError, describe
from ..model.pipeline import check_guidance_scale
from .transport import SegmentResult, SegmentTransportConfig, alpha_sweep, segment_transport
from .velocity_adapters import embedded_velocity_fn

__all__ = ["SamplingOptions", "PairResult", "generate_pair", "generate_pairs"]


@dataclass(frozen=True)
class SamplingOptions:
    """How each set of a pair is sampled: the settings of the embedded pipeline's own call.

    Attributes:
        num_views: views per set when no cameras are given (cameras from ``sample_cameras(seed, ...)``).
        num_inference_steps: sampling steps; None = the pipeline's default (``DEFAULT_STEPS``).
        guidance_scale: classifier-free guidance; None = the pipeline's default (``DEFAULT_GUIDANCE``).
        size: image side in pixels; None = the model's ``sample_size``.

    ``pipe(prompt, seed=s, **options.pipeline_kwargs())`` samples the same set as ``mode="independent"``.
    """

    num_views: int = 4
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    size: int | None = None

    def __post_init__(self) -> None:
        for name, low in (("num_views", 1), ("num_inference_steps", 1), ("size", 1)):
            v = getattr(self, name)
            if (v is not None or name == "num_views") and (isinstance(v, bool) or not isinstance(v, int) or v < low):
                raise ValueRangeError(f"{name}: expected {'None or ' if name != 'num_views' else ''}an int >= {low}, got {v!r}")
        if self.guidance_scale is not None:
            check_guidance_scale(self.guidance_scale)

    def pipeline_kwargs(self) -> dict:
        """The keyword arguments of ``CorrlabPipeline.__call__`` (those set; the others keep its defaults)."""
        out = {"num_views": self.num_views, "num_inference_steps": self.num_inference_steps,
               "guidance_scale": self.guidance_scale, "size": self.size}
        return {k: v for k, v in out.items() if v is not None}


@dataclass
class PairResult:
    """A jointly generated pair: ``set_a``, ``set_b`` (:class:`~corrlab.sets.MultiViewSet`), the alpha sweep
    ``sweep_sets`` at ``sweep_alphas`` (empty without ``sweep``), and the raw :class:`SegmentResult`."""

    set_a: object
    set_b: object
    sweep_sets: list = field(default_factory=list)
    sweep_alphas: list = field(default_factory=list)
    segment: SegmentResult | None = None


def _to_images(x: torch.Tensor) -> torch.Tensor:
    """Model scale [-1, 1] -> images [0, 1] (as the pipeline decodes)."""
    return ((x.float().cpu() + 1.0) / 2.0).clamp(0.0, 1.0)


def generate_pairs(
    pipe,
    prompt_pairs: Sequence[tuple[str, str]],
    seeds: Sequence[int],
    *,
    cameras=None,
    sampling: SamplingOptions | None = None,
    transport: SegmentTransportConfig | None = None,
    sweep: int = 0,
    progress: bool = True,
) -> list[PairResult]:
    """Generate ``P`` aligned pairs in one segment transport (pairs are extra coordinates of the line fit).

    Pair ``j`` uses prompts ``prompt_pairs[j]``, noise ``randn((1, V, 3, S, S), Generator().manual_seed(seeds[j]))``
    (the pipeline's own noise for that seed) and cameras ``sample_cameras(seeds[j], num_views, S, layout="train")``
    unless ``cameras`` (one list shared by all pairs, or one list per pair) is given.

    Args:
        sampling: views, steps, guidance, size (default :class:`SamplingOptions`: the pipeline's defaults).
        transport: the segment transport (default :class:`SegmentTransportConfig`: ``full``, ``k = 5``, the
            default schedules); ``SegmentTransportConfig(mode="independent")`` for two plain generations.
        sweep: ``M`` adds ``M`` sets evenly spaced along the final segment (0 = none).

    Results equal ``P`` separate :func:`generate_pair` calls up to batched-matmul rounding.
    """
    from ..model.pipeline import DEFAULT_GUIDANCE, DEFAULT_STEPS
    from ..sets import MultiViewSet

    if not prompt_pairs or len(prompt_pairs) != len(seeds):
        raise CorrlabError(f"prompt_pairs, seeds: expected equally long non-empty lists, got {len(prompt_pairs)} and {len(seeds)}")
    for j, pp in enumerate(prompt_pairs):
        if not (isinstance(pp, (tuple, list)) and len(pp) == 2 and all(isinstance(p, str) for p in pp)):
            raise CorrlabError(f"prompt_pairs[{j}]: expected a pair of prompt strings, got {describe(pp)}")
    if sampling is None:
        sampling = SamplingOptions()
    elif not isinstance(sampling, SamplingOptions):
        raise CorrlabError(f"sampling: expected None or a SamplingOptions, got {describe(sampling)}")
    if transport is not None and not isinstance(transport, SegmentTransportConfig):
        raise CorrlabError(f"transport: expected None or a SegmentTransportConfig, got {describe(transport)}")
    steps = DEFAULT_STEPS if sampling.num_inference_steps is None else sampling.num_inference_steps
    guidance_scale = sampling.guidance_scale
    size = sampling.size or pipe.sample_size
    P = len(seeds)
    if cameras is None:
        from ..scenes import sample_cameras

        cams = [sample_cameras(int(s), sampling.num_views, size, layout="train") for s in seeds]
    elif cameras and isinstance(cameras[0], (list, tuple)):
        if len(cameras) != P:
            raise CorrlabError(f"cameras: expected {P} camera lists (one per pair), got {len(cameras)}")
        cams = [list(c) for c in cameras]
    else:
        cams = [list(cameras)] * P
    V = len(cams[0])
    noise = torch.stack(
        [torch.randn((1, V, 3, size, size), generator=torch.Generator().manual_seed(int(s)), dtype=torch.float32)[0] for s in seeds]
    ).to(pipe.device)  # (P, V, 3, S, S): the sampler runs where the model is
    emb = pipe.encode_prompt([p for pp in prompt_pairs for p in pp]).detach().float()  # (2P, D)
    cond_a, cond_b = emb[0::2], emb[1::2]  # (P, D)
    fn = embedded_velocity_fn(pipe, cams, guidance_scale, size)
    was_training = pipe.model.training
    pipe.model.eval()
    try:
        res = segment_transport(fn, noise, cond_a, cond_b, pipe.timesteps(steps), config=transport, progress=progress)
    finally:
        pipe.model.train(was_training)
    meta = {
        "num_inference_steps": steps,
        "guidance_scale": float(DEFAULT_GUIDANCE if guidance_scale is None else guidance_scale),
        "generated": True,
        "segment_transport": {"mode": res.config.mode, "k": res.config.k},
    }
    alphas, xs = alpha_sweep(res, sweep) if sweep else (torch.empty(0), None)
    out = []
    for j in range(P):
        a, b = prompt_pairs[j]

        def make(x, prompt, alpha):
            m = dict(meta, segment_transport=dict(meta["segment_transport"], alpha=alpha, prompt_a=a, prompt_b=b))
            return MultiViewSet(images=_to_images(x), cameras=cams[j], prompt=prompt, seed=int(seeds[j]), meta=m)

        sweep_sets = [make(xs[i, j], f"{a} | {b} @ alpha={float(al):.3f}", float(al)) for i, al in enumerate(alphas)]
        out.append(
            PairResult(make(res.x_a[j], a, 0.0), make(res.x_b[j], b, 1.0), sweep_sets, [float(al) for al in alphas], res)
        )
    return out


def generate_pair(
    pipe,
    prompt_a: str,
    prompt_b: str,
    seed: int,
    *,
    cameras=None,
    sampling: SamplingOptions | None = None,
    transport: SegmentTransportConfig | None = None,
    sweep: int = 0,
    progress: bool = True,
) -> PairResult:
    """One structurally aligned pair of multi-view sets from the embedded model (see :func:`generate_pairs`).

    ``transport=SegmentTransportConfig(mode="independent")`` reproduces ``pipe(prompt_a, seed=seed)`` and
    ``pipe(prompt_b, seed=seed)`` (same noise, same cameras) up to batching rounding; ``sweep = M`` adds ``M``
    sets along the final segment.
    """
    return generate_pairs(pipe, [(prompt_a, prompt_b)], [seed], cameras=cameras, sampling=sampling,
                          transport=transport, sweep=sweep, progress=progress)[0]
