"""``corrlab generate``: sample one multi-view set from the embedded model and save it."""
from __future__ import annotations

import argparse
import contextlib
import dataclasses


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "generate",
        help="generate a multi-view set with the embedded model",
        description="Sample a multi-view set (views as PNG, cameras.json with the conditioning cameras, "
        "prompt, seed) with the embedded model (corrlab-mvunet-s unless --model). Without --cameras the cameras follow the "
        "renderer's training layout for --seed.",
    )
    add_generation_arguments(p, steps_flag="--steps")
    p.add_argument("--reference", metavar="SET_DIR",
                   help="image-conditioned generation: copy views --reference-views of this corrlab set as clean "
                   "references and generate the others (cameras from --cameras, else from SET_DIR)")
    p.add_argument("--reference-views", type=int, nargs="+", metavar="V",
                   help="indices of the given views (default: 0; needs --reference)")
    p.add_argument("--reference-guidance", type=float, metavar="R",
                   help="image guidance: push the generated views away from the model's prediction without the "
                   "references by R (default 1 = off; needs --reference)")
    add_diffusers_arguments(p)
    ca = p.add_argument_group("CorrAdapter", "training-free native-correspondence aggregation (methods.md section 2)")
    ca.add_argument("--corr-adapter", action="store_true", help="generate with CorrAdapter enabled")
    ca.add_argument("--eta", type=float, help="weight of the original attention output (default 0.1; 1 = off)")
    ca.add_argument("--radius", type=int, help="window radius r of the aggregation (matching.window_radius, default 3)")
    ca.add_argument("--active-steps", type=int, help="adapt only the first K steps (default 10; 0 = every step)")
    ca.add_argument("--refresh", type=int, help="recompute correspondences every N steps (default 5)")
    ca.add_argument("--preset", choices=("syncdreamer", "mvadapter"),
                    help="start from a released integration's exact settings (README: reproducing the released "
                    "settings); the options above override it")
    p.set_defaults(func=run)


def add_generation_arguments(p, steps_flag: str) -> None:
    """The flags of one generation shared by ``generate`` and ``probe``: prompt, seed, views, sampling steps
    (``steps_flag``: ``--steps`` for generate, ``--num-steps`` for probe, whose ``--steps`` are recorded steps),
    guidance, model, cameras."""
    p.add_argument("--prompt", required=True, help='e.g. "red striped box" (words from the scene vocabulary)')
    p.add_argument("--seed", type=int, default=0, help="noise seed (and camera seed without --cameras)")
    p.add_argument("--views", type=int, default=4, help="number of views when --cameras is not given (default 4)")
    p.add_argument(steps_flag, type=int, help="sampling steps (default: the pipeline's)")
    p.add_argument("--guidance", type=float, help="classifier-free guidance scale (default: the pipeline's)")
    p.add_argument("--model", help="model folder or name under data/ (default: $CORRLAB_MODEL or the shipped model), or a "
                   "diffusers pipeline folder (or cached hub id) of a supported type: WanPipeline, FluxPipeline, "
                   "StableDiffusionPipeline, MultiViewUNetPipeline")
    p.add_argument("--cameras", help="cameras.json of a corrlab set (or its folder): generate under those cameras")


def add_diffusers_arguments(p) -> None:
    """The diffusers-pipeline sizes and the output flags shared by ``generate`` and ``probe``."""
    dp = p.add_argument_group("diffusers pipelines (--model PIPELINE_DIR)")
    dp.add_argument("--height", type=int, help="image height (default: the pipeline's)")
    dp.add_argument("--width", type=int, help="image width (default: the pipeline's)")
    dp.add_argument("--frames", type=int, help="video frames (WanPipeline; default: the pipeline's)")
    p.add_argument("--out", required=True, help="output set directory")
    p.add_argument("--no-progress", action="store_true")


def embedded_model_and_cameras(args: argparse.Namespace):
    """``(pipe, cameras, size)`` for a generation with the embedded model: ``--model`` loaded, ``--cameras``
    read (None, None without it); the diffusers-only flags are refused."""
    from ..errors import CorrlabError
    from ..model import load_default

    for flag in ("height", "width", "frames"):
        if getattr(args, flag) is not None:
            raise CorrlabError(f"--{flag}: only for a diffusers pipeline --model, got it with the embedded model")
    pipe = load_default(args.model)
    cameras, size = (None, None)
    if args.cameras:
        cameras, size = load_cameras(args.cameras, patch_size=pipe.model.config.patch_size)
    return pipe, cameras, size


def sample_embedded(pipe, args: argparse.Namespace, cameras, size, num_steps: int | None, **extra):
    """One set from the embedded pipeline with the generation flags (``num_steps`` None: the default)."""
    from ..model import DEFAULT_GUIDANCE, DEFAULT_STEPS

    return pipe(args.prompt, cameras=cameras, num_views=args.views, num_inference_steps=num_steps or DEFAULT_STEPS,
                guidance_scale=DEFAULT_GUIDANCE if args.guidance is None else args.guidance, seed=args.seed,
                progress=not args.no_progress, size=size, **extra)


def load_cameras(path, patch_size: int | None = None) -> tuple[list, int]:
    """Cameras and the (square) image size from a corrlab ``cameras.json``.

    With ``patch_size``, the image size must be divisible by it (the model's token grid).
    """
    import json
    from pathlib import Path

    from ..errors import CorrlabError, FormatError
    from ..geometry import Camera

    f = Path(path)
    if f.is_dir():
        f = f / "cameras.json"
    if not f.is_file():
        raise CorrlabError(f"--cameras: expected a cameras.json file (or a set folder), got {str(path)!r} (missing)")
    try:
        header = json.loads(f.read_text())
        views = header["views"]
        width, height = int(header["width"]), int(header["height"])
    except (ValueError, KeyError, TypeError) as e:
        raise FormatError(f"--cameras: {str(f)!r} is not a corrlab cameras.json ({e!r}); expected keys views, width, height") from None
    if width != height:
        raise CorrlabError(f"--cameras: expected square views, got width {width} and height {height} in {str(f)!r}")
    if not isinstance(views, list) or not views:
        raise FormatError(f"--cameras: expected a non-empty 'views' list in {str(f)!r}, got {views!r:.80}")
    if patch_size and width % patch_size:
        raise CorrlabError(f"--cameras: expected an image size divisible by the patch size {patch_size}, got {width}")
    return [Camera.from_dict(v) for v in views], width


def run(args: argparse.Namespace) -> int:
    from ..errors import CorrlabError
    from ..sets import save_set

    if args.views < 1:
        raise CorrlabError(f"--views: expected a positive number of views, got {args.views}")
    from ..pipelines import pipeline_source

    if pipeline_source(args.model) is not None:
        for flag in ("reference", "reference_guidance"):
            if getattr(args, flag, None) is not None:
                raise CorrlabError(f"--{flag.replace('_', '-')}: image-conditioned generation is for corrlab's "
                                   "embedded models, got it with a diffusers pipeline --model")
        return run_pipeline_command(args, record=False)
    pipe, cameras, size = embedded_model_and_cameras(args)
    reference, cameras, size = load_reference(args, cameras, size)
    adapter = _corr_adapter(args, pipe)
    extra = {"reference": reference} if reference else {}
    if args.reference_guidance is not None:
        extra["reference_guidance"] = args.reference_guidance
    with adapter if adapter is not None else contextlib.nullcontext():
        mvs = sample_embedded(pipe, args, cameras, size, args.steps, **extra)
    if adapter is not None:
        mvs.meta["corr_adapter"] = {**dataclasses.asdict(adapter.config), "layers": adapter.layers,
                                    "preset": getattr(args, "preset", None)}
    out = save_set(mvs, args.out)
    print(out)
    return 0


def load_reference(args: argparse.Namespace, cameras, size):
    """``({view: image (3, S, S)}, cameras, size)`` from ``--reference SET_DIR [--reference-views V ...]``.

    Without ``--cameras`` the reference set's cameras are used; with them, the set must have the same
    image size and at least as many views as the highest given index.
    """
    from ..errors import CorrlabError

    if args.reference_views is not None and not args.reference:
        raise CorrlabError("--reference-views: expected together with --reference SET_DIR, got it without")
    if args.reference_guidance is not None and not args.reference:
        raise CorrlabError(f"--reference-guidance: expected together with --reference SET_DIR, got "
                           f"{args.reference_guidance} without it")
    if not args.reference:
        return None, cameras, size
    from ..sets import load_set

    ref_set = load_set(args.reference)
    S = int(ref_set.images.shape[-1])
    if cameras is None:
        cameras, size = list(ref_set.cameras), S
    elif S != size:
        raise CorrlabError(f"--reference: expected views of {size} px like --cameras, got {S} px in {args.reference!r}")
    views = args.reference_views if args.reference_views is not None else [0]
    n = min(len(cameras), ref_set.images.shape[0])
    bad = [v for v in views if not 0 <= v < n]
    if bad:
        raise CorrlabError(f"--reference-views: expected indices in [0, {n}) (views of both the set and the cameras), got {bad}")
    return {int(v): ref_set.images[v] for v in views}, cameras, size


def _corr_adapter(args: argparse.Namespace, pipe):
    """A disabled CorrAdapterHandle from the --corr-adapter options (None without --corr-adapter)."""
    from ..errors import CorrlabError

    given = {k: getattr(args, k, None) for k in ("eta", "radius", "active_steps", "refresh", "preset")}
    if not getattr(args, "corr_adapter", False):
        used = [f"--{k.replace('_', '-')}" for k, v in given.items() if v is not None]
        if used:
            raise CorrlabError(f"{', '.join(used)}: expected together with --corr-adapter, got them without it")
        return None
    from ..interventions import CorrAdapterConfig, CorrAdapterHandle

    params = {k: v for k, v in (("eta", args.eta), ("window_radius", args.radius), ("refresh_every", args.refresh))
              if v is not None}
    if args.active_steps is not None:
        params["active_steps"] = None if args.active_steps == 0 else args.active_steps
    if getattr(args, "reference", None):
        params["image_conditioned"] = True  # the paper's rule: every step when reference images condition
    preset = getattr(args, "preset", None)
    if preset is None:
        return CorrAdapterHandle(pipe, **params)
    from ..model import DEFAULT_STEPS

    steps = getattr(args, "steps", None) or DEFAULT_STEPS  # the last-step refresh needs the generation's length
    config = CorrAdapterConfig.preset(preset, **({"num_steps": steps} if preset == "syncdreamer" else {}), **params)
    return CorrAdapterHandle(pipe, config)


def run_pipeline_command(args: argparse.Namespace, record: bool) -> int:
    """``corrlab generate|probe --model PIPELINE``: one generation through the pipeline's own ``__call__``
    (with CorrAdapter when asked; under the probe when ``record``), saved by :func:`corrlab.pipelines.save_pipeline_output`
    (plus ``record.nc``)."""
    from typing import Any

    import torch

    from ..errors import CorrlabError
    from ..pipelines import (check_supported, load_pipeline, multi_image, output_images, pipeline_call_kwargs,
                             pipeline_source, record_frame_indices, save_pipeline_output)

    if getattr(args, "cameras", None):
        raise CorrlabError("--cameras: diffusers pipelines are not camera-conditioned; expected no --cameras with a pipeline --model")
    source = pipeline_source(args.model)
    cuda = torch.cuda.is_available()  # a GPU when there is one, in bfloat16 (the weights' usual dtype)
    pipe = load_pipeline(source, torch_dtype=torch.bfloat16 if cuda else None, device="cuda" if cuda else None)
    pipe.set_progress_bar_config(disable=bool(args.no_progress))
    kind = check_supported(pipe)
    steps = getattr(args, "num_steps", None) if record else getattr(args, "steps", None)
    views = None if kind != "extended" else args.views
    call = pipeline_call_kwargs(pipe, args.prompt, args.seed, num_inference_steps=steps, guidance_scale=args.guidance,
                                num_images=views, height=args.height, width=args.width, num_frames=args.frames)
    adapter = None if record else _corr_adapter(args, pipe)
    meta: dict[str, Any] = {"pipeline": type(pipe).__name__, "kind": kind, "model": str(args.model), "prompt": args.prompt,
                            "seed": int(args.seed), "call": {k: v for k, v in call.items() if k not in ("generator", "prompt")}}
    with contextlib.ExitStack() as stack:
        stack.enter_context(multi_image(pipe, views))
        rec = None
        if record:
            from .probe import matching_from_args
            from ..probing import probe

            rec = stack.enter_context(probe(pipe, layers=args.layers, steps=args.steps, matching=matching_from_args(args),
                                            batch_index=args.batch_index, chunk_size=args.chunk_size))
        if adapter is not None:
            stack.enter_context(adapter)
        images = output_images(pipe(**call))
    if adapter is not None:
        meta["corr_adapter"] = {**dataclasses.asdict(adapter.config), "layers": adapter.layers}
    if rec is not None:
        if not rec.steps:
            raise CorrlabError(f"--steps: no step of the generation matched {args.steps}")
        meta["record_frames"] = record_frame_indices(pipe, rec.num_images, images.shape[0])
        rec.set_meta(prompt=args.prompt, seed=int(args.seed), model=str(args.model))
    out = save_pipeline_output(args.out, images, meta)
    if rec is not None:
        rec.save(out / "record.nc")
    print(out)
    return 0
