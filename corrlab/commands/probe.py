"""``corrlab probe``: generate a multi-view set while recording the model's native correspondences."""
from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "probe",
        help="generate a set with the embedded model and record native correspondences (DIR/record.nc)",
        description="Generate one multi-view set with the embedded model while probing its multi-image "
        "attention layers; writes the set (views, cameras.json) and the probe record DIR/record.nc. "
        "Score it with `corrlab score DIR`.",
    )
    p.add_argument("--prompt", required=True, help='e.g. "red striped box" (words from the scene vocabulary)')
    p.add_argument("--seed", type=int, default=0, help="noise seed (and camera seed without --cameras)")
    p.add_argument("--cameras", help="cameras.json of a corrlab set (or its folder): generate under those cameras")
    p.add_argument("--views", type=int, default=4, help="number of views when --cameras is not given (default 4)")
    p.add_argument("--num-steps", type=int, help="sampling steps (default: the pipeline's)")
    p.add_argument("--guidance", type=float, help="classifier-free guidance scale (default: the pipeline's)")
    p.add_argument("--model", help="model folder or name under data/ (default: $CORRLAB_MODEL or the shipped model), or a "
                   "diffusers pipeline folder (or cached hub id) of a supported type: WanPipeline, FluxPipeline, "
                   "StableDiffusionPipeline, MultiViewUNetPipeline")
    p.add_argument("--layers", nargs="+", metavar="NAME", help="layers to probe (default: all multi-image layers)")
    p.add_argument("--steps", nargs="+", type=int, metavar="I", help="step indices to record (default: all)")
    g = p.add_argument_group("matching (defaults: the paper's)")
    g.add_argument("--similarity", choices=("softmax", "dual_softmax"), default="softmax")
    g.add_argument("--heads", choices=("per_head", "mean"), default="per_head")
    g.add_argument("--confidence", choices=("global", "window"), default="global")
    g.add_argument("--threshold", type=float, default=0.05, help="keep a match when confidence >= this (0.05)")
    g.add_argument("--window-radius", type=int, default=3, help="r of the (2r+1)^2 window (3)")
    g.add_argument("--mutual", action="store_true", help="keep only mutual nearest neighbours")
    g.add_argument("--history", type=int, help="match with the max of q/k over the last N calls (SyncDreamer: 11)")
    g.add_argument("--chunk-size", type=int, default=256, help="source tokens per block (memory bound, 256)")
    g.add_argument("--batch-index", type=int, help="batch entry to record (default: the conditional branch)")
    dp = p.add_argument_group("diffusers pipelines (--model PIPELINE_DIR)")
    dp.add_argument("--height", type=int, help="image height (default: the pipeline's)")
    dp.add_argument("--width", type=int, help="image width (default: the pipeline's)")
    dp.add_argument("--frames", type=int, help="video frames (WanPipeline; default: the pipeline's)")
    p.add_argument("--out", required=True, help="output set directory")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..errors import CorrlabError
    from ..model import DEFAULT_GUIDANCE, DEFAULT_STEPS, load_default, resolve_model_path
    from ..probing import probe
    from ..sets import save_set
    from .generate import load_cameras

    if args.views < 1:
        raise CorrlabError(f"--views: expected a positive number of views, got {args.views}")
    from ..pipelines import pipeline_source, run_pipeline_command

    if pipeline_source(args.model) is not None:
        return run_pipeline_command(args, record=True)
    for flag in ("height", "width", "frames"):
        if getattr(args, flag) is not None:
            raise CorrlabError(f"--{flag}: only for a diffusers pipeline --model, got it with the embedded model")
    pipe = load_default(args.model)
    cameras, size = None, None
    if args.cameras:
        cameras, size = load_cameras(args.cameras)
    matching = dict(
        similarity=args.similarity, heads=args.heads, confidence=args.confidence, threshold=args.threshold,
        window_radius=args.window_radius, mutual=args.mutual, chunk_size=args.chunk_size,
    )
    with probe(pipe, layers=args.layers, steps=args.steps, batch_index=args.batch_index, history=args.history,
               **matching) as rec:
        mvs = pipe(
            args.prompt,
            cameras=cameras,
            num_views=args.views,
            num_inference_steps=args.num_steps or DEFAULT_STEPS,
            guidance_scale=DEFAULT_GUIDANCE if args.guidance is None else args.guidance,
            seed=args.seed,
            progress=not args.no_progress,
            size=size,
        )
    if not rec.steps:
        raise CorrlabError(f"--steps: no step of the {args.num_steps or DEFAULT_STEPS} sampled matched {args.steps}")
    rec.set_meta(prompt=mvs.prompt, seed=mvs.seed, cameras=mvs.cameras, model=str(resolve_model_path(args.model)))
    out = save_set(mvs, args.out)
    rec.save(out / "record.nc")
    print(out)
    return 0
