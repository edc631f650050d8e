"""Ready-made probed runs: a rendered scene noised and probed in one forward (DIFT-style), and generated
sets written to disk with their records (the input of :func:`corrlab.evaluation.comparison_table`).

Capture only: scores live in :mod:`corrlab.evaluation`.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Sequence

import torch
from tqdm.auto import tqdm

from ..errors import CorrlabError, ShapeError, ValueRangeError, describe
from .matcher import MatchingOptions

__all__ = ["COMPARISON_MATCHING", "probe_rendered", "probe_generations"]

#: Matching options for comparisons with keypoint matchers: one match per token (head-averaged
#: similarity), so native match counts are comparable with SIFT's; everything else the probe default.
COMPARISON_MATCHING = MatchingOptions(heads="mean")


def probe_rendered(
    pipe,
    mvset,
    t: float,
    layers: Sequence[str] | None = None,
    seed: int = 0,
    guidance_scale: float = 1.0,
    batch_index: int | None = None,
    matching: MatchingOptions | None = None,
    **options,
):
    """DIFT-style probe of a rendered scene: noise its views to time ``t`` and run one model forward.

    ``x_t = (1 - t) x_0 + t eps`` (rectified flow; ``x_0`` the images in the model's [-1, 1] range,
    ``eps`` from ``torch.Generator().manual_seed(seed)``), conditioned on the set's cameras and prompt;
    one call of ``pipe.velocity`` (guidance 1 by default: the conditional branch alone). Returns the
    :class:`~corrlab.probing.ProbeRecord` (one step, ``timestep`` = t) with the set's prompt, seed and
    cameras attached. Needs a :class:`corrlab.model.CorrlabPipeline` (or anything with its ``velocity``,
    ``encode_prompt`` and ``ray_embeds``). Score it with :func:`corrlab.evaluation.pck_record`.
    ``matching`` (None: the probe's defaults) and keyword ``options`` replacing its fields, as in
    :func:`probe_generations` and :func:`corrlab.probing.probe`.
    """
    from ..probing import probe
    from ..sets import MultiViewSet, load_set

    if not isinstance(mvset, MultiViewSet):
        if not isinstance(mvset, (str, os.PathLike)):
            raise CorrlabError(f"mvset: expected a MultiViewSet or a set directory, got {describe(mvset)}")
        mvset = load_set(mvset)
    if not all(hasattr(pipe, a) for a in ("velocity", "encode_prompt", "ray_embeds")):
        raise CorrlabError(f"pipe: expected a CorrlabPipeline (velocity, encode_prompt, ray_embeds), got {describe(pipe)}")
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0.0 <= float(t) <= 1.0:
        raise ValueRangeError(f"t: expected a time in [0, 1] (1 = pure noise), got {t!r}")
    if mvset.height != mvset.width:
        raise ShapeError(f"mvset: expected square views, got {mvset.height}x{mvset.width}")
    g = torch.Generator().manual_seed(int(seed))
    x0 = mvset.images[None] * 2.0 - 1.0
    eps = torch.randn(x0.shape, generator=g, dtype=x0.dtype)
    x_t = ((1.0 - t) * x0 + t * eps).to(pipe.device)
    with torch.no_grad(), probe(pipe, layers=layers, batch_index=batch_index, matching=matching,
                                       **options) as rec:
        pipe.velocity(x_t, float(t), pipe.encode_prompt([mvset.prompt]), pipe.ray_embeds(mvset.cameras, mvset.height)[None],
                      guidance_scale=guidance_scale)
    rec.set_meta(prompt=mvset.prompt, seed=int(seed), cameras=mvset.cameras)  # velocity() returns no set
    return rec


def probe_generations(
    pipe,
    seeds: Iterable[int],
    out_root,
    layers: Sequence[str] | None = None,
    steps: Sequence[int] | None = None,
    num_views: int = 4,
    num_inference_steps: int | None = None,
    guidance_scale: float | None = None,
    progress: bool = True,
    matching: MatchingOptions = COMPARISON_MATCHING,
    reference_views: Sequence[int] = (),
    layout: str = "train",
    **options,
) -> list[Path]:
    """Generate and probe one set per seed; returns the set directories (each with ``record.nc``).

    The prompt and the cameras come from the same seed, as in :func:`corrlab.scenes.sample_scene`.
    ``reference_views`` (image-conditioned generation, the paper's main setting; needs a pipeline with
    ``supports_reference``): the seed's scene is rendered under ``layout``'s cameras
    (:func:`corrlab.scenes.render_scene`), those views are given as clean references and the others generated
    under the scene's cameras; the saved set lists them in ``meta["given_views"]``. Empty (default):
    text-to-multi-view under ``sample_cameras(seed, layout="train")``.
    ``matching`` defaults to :data:`COMPARISON_MATCHING`; keyword ``options`` replace its fields. The probe
    records each returned set's prompt, seed and cameras itself.
    """
    from ..probing import probe
    from ..scenes import render_scene, sample_scene
    from ..sets import save_set

    given = sorted({int(v) for v in reference_views})
    if any(not 0 <= v < num_views for v in given) or len(given) >= num_views:
        raise ValueRangeError(
            f"reference_views: expected distinct view indices in [0, {num_views}) leaving at least one view to "
            f"generate, got {list(reference_views)}"
        )
    if given and not getattr(pipe, "supports_reference", False):
        raise CorrlabError(f"reference_views: the pipeline's model takes no reference views, got {given}; use a "
                           f"reference-conditioned model such as corrlab-mvunet-s")

    out_root = Path(out_root)
    matching = MatchingOptions.build(matching, **options)
    sampling = {"num_inference_steps": num_inference_steps, "guidance_scale": guidance_scale}
    sampling = {k: v for k, v in sampling.items() if v is not None}  # None: the pipeline's own default
    dirs = []
    for seed in tqdm(list(seeds), desc="probing generations", disable=not progress):
        prompt = sample_scene(seed).prompt
        conditioning = {}
        if given:
            truth = render_scene(seed, num_views, pipe.sample_size, layout)
            conditioning = {"cameras": truth.cameras, "reference": {v: truth.images[v] for v in given}}
        with probe(pipe, layers=layers, steps=steps, matching=matching) as rec:
            mvs = pipe(prompt, num_views=num_views, seed=seed, progress=False, **sampling, **conditioning)
        d = save_set(mvs, out_root / f"seed_{seed}")
        rec.save(d / "record.nc")
        dirs.append(d)
    return dirs
