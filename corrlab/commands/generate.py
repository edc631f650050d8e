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
        "prompt, seed) with the embedded MultiViewDiT. Without --cameras the cameras follow the "
        "renderer's training layout for --seed.",
    )
    p.add_argument("--prompt", required=True, help='e.g. "red striped box" (words from the scene vocabulary)')
    p.add_argument("--seed", type=int, default=0, help="noise seed (and camera seed without --cameras)")
    p.add_argument("--views", type=int, default=4, help="number of views when --cameras is not given")
    p.add_argument("--steps", type=int, help="sampling steps (default: the pipeline's)")
    p.add_argument("--guidance", type=float, help="classifier-free guidance scale (default: the pipeline's)")
    p.add_argument("--model", help="model folder or name under data/ (default: $CORRLAB_MODEL or the shipped model), or a "
                   "diffusers pipeline folder (or cached hub id) of a supported type: WanPipeline, FluxPipeline, "
                   "StableDiffusionPipeline, MultiViewUNetPipeline")
    p.add_argument("--cameras", help="cameras.json of a corrlab set: generate under those cameras")
    dp = p.add_argument_group("diffusers pipelines (--model PIPELINE_DIR)")
    dp.add_argument("--height", type=int, help="image height (default: the pipeline's)")
    dp.add_argument("--width", type=int, help="image width (default: the pipeline's)")
    dp.add_argument("--frames", type=int, help="video frames (WanPipeline; default: the pipeline's)")
    p.add_argument("--out", required=True, help="output set directory")
    p.add_argument("--no-progress", action="store_true")
    ca = p.add_argument_group("CorrAdapter", "training-free native-correspondence aggregation (methods.md section 2)")
    ca.add_argument("--corr-adapter", action="store_true", help="generate with CorrAdapter enabled")
    ca.add_argument("--eta", type=float, help="weight of the original attention output (default 0.1; 1 = off)")
    ca.add_argument("--radius", type=int, help="aggregation window radius r (default 3)")
    ca.add_argument("--active-steps", type=int, help="adapt only the first K steps (default 10; 0 = every step)")
    ca.add_argument("--refresh", type=int, help="recompute correspondences every N steps (default 5)")
    p.set_defaults(func=run)


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
    from ..model import DEFAULT_GUIDANCE, DEFAULT_STEPS, load_default
    from ..sets import save_set

    if args.views < 1:
        raise CorrlabError(f"--views: expected a positive number of views, got {args.views}")
    from ..pipelines import pipeline_source, run_pipeline_command

    if pipeline_source(args.model) is not None:
        return run_pipeline_command(args, record=False)
    for flag in ("height", "width", "frames"):
        if getattr(args, flag) is not None:
            raise CorrlabError(f"--{flag}: only for a diffusers pipeline --model, got it with the embedded model")
    pipe = load_default(args.model)
    cameras, size = (None, None)
    if args.cameras:
        cameras, size = load_cameras(args.cameras, patch_size=pipe.model.config.patch_size)
    adapter = _corr_adapter(args, pipe)
    with adapter if adapter is not None else contextlib.nullcontext():
        mvs = pipe(
            args.prompt,
            cameras=cameras,
            num_views=args.views,
            num_inference_steps=args.steps or DEFAULT_STEPS,
            guidance_scale=DEFAULT_GUIDANCE if args.guidance is None else args.guidance,
            seed=args.seed,
            progress=not args.no_progress,
            size=size,
        )
    if adapter is not None:
        mvs.meta["corr_adapter"] = {**dataclasses.asdict(adapter.config), "layers": adapter.layers}
    out = save_set(mvs, args.out)
    print(out)
    return 0


def _corr_adapter(args: argparse.Namespace, pipe):
    """A disabled CorrAdapterHandle from the --corr-adapter options (None without --corr-adapter)."""
    from ..errors import CorrlabError

    given = {k: getattr(args, k, None) for k in ("eta", "radius", "active_steps", "refresh")}
    if not getattr(args, "corr_adapter", False):
        used = [f"--{k.replace('_', '-')}" for k, v in given.items() if v is not None]
        if used:
            raise CorrlabError(f"{', '.join(used)}: expected together with --corr-adapter, got them without it")
        return None
    from ..interventions import CorrAdapterHandle

    params = {k: v for k, v in (("eta", args.eta), ("radius", args.radius), ("refresh_every", args.refresh)) if v is not None}
    if args.active_steps is not None:
        params["active_steps"] = None if args.active_steps == 0 else args.active_steps
    return CorrAdapterHandle(pipe, **params)

