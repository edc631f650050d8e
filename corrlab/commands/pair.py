"""``corrlab pair``: jointly generate a structurally aligned pair of sets with segment transport."""
from __future__ import annotations

import argparse

MODES = ("full", "anchor-mean", "endpoints", "hard-cut", "independent")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "pair",
        help="generate a structurally aligned pair of multi-view sets (segment transport)",
        description="Generate two multi-view sets from two prompts and the same noise with segment transport "
        "(One Algorithm to Align Them All) or one of its ablations, and save them as DIR/a/ and DIR/b/ "
        "(corrlab set format), plus DIR/sweep/alpha_XX/ for --sweep M sets along the segment "
        "(XX = index 00..M-1; each set's cameras.json meta holds its alpha) and DIR/pair.json with the settings.",
    )
    p.add_argument("--prompt-a", required=True, help='first prompt, e.g. "red striped box"')
    p.add_argument("--prompt-b", required=True, help='second prompt, e.g. "blue dotted sphere"')
    p.add_argument("--seed", type=int, default=0, help="noise seed (and camera seed without --cameras)")
    p.add_argument("--mode", choices=MODES, default="full", help="full method or an ablation (default: full)")
    p.add_argument("--k", type=int, default=5, help="points on the segment (default 5: alphas 0, .25, .5, .75, 1)")
    p.add_argument("--sweep", type=int, default=0, help="also save M sets evenly spaced along the final segment")
    p.add_argument("--views", type=int, default=4, help="number of views when --cameras is not given")
    p.add_argument("--steps", type=int, help="sampling steps (default: the pipeline's)")
    p.add_argument("--guidance", type=float, help="classifier-free guidance scale (default: the pipeline's)")
    p.add_argument("--model", help="model folder or name under data/ (default: $CORRLAB_MODEL or the shipped model)")
    p.add_argument("--cameras", help="cameras.json of a corrlab set: generate under those cameras")
    s = p.add_argument_group("schedules (defaults: corrlab.interventions.schedules)")
    s.add_argument("--w-start", type=float, default=0.7, help="smoothing weight w_t at the first step (default 0.7)")
    s.add_argument("--w-end", type=float, default=0.5, help="fraction of steps at which w_t reaches 0 (default 0.5)")
    s.add_argument("--sigma-start", type=float, default=0.1, help="width of p_t(alpha) around 0.5 at the first step")
    s.add_argument("--ramp", type=float, default=0.4, help="fraction of steps after which p_t(alpha) is uniform")
    s.add_argument("--floor", type=float, default=0.05, help="weight floor added to p_t(alpha)")
    s.add_argument("--joint-steps", type=int, help="hard-cut: shared steps (default: a quarter of the steps)")
    p.add_argument("--out", required=True, help="output directory (gets a/, b/, sweep/, pair.json)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from ..errors import CorrlabError
    from ..interventions import LinearDecaySmoothing, MidpointToUniformWeights, SegmentTransportConfig
    from ..interventions.pair_generation import SamplingOptions, generate_pair
    from ..io_utils import atomic_write_text
    from ..model import DEFAULT_GUIDANCE, DEFAULT_STEPS, load_default
    from ..sets import save_set
    from .generate import load_cameras

    if args.views < 1:
        raise CorrlabError(f"--views: expected a positive number of views, got {args.views}")
    if args.sweep < 0 or args.sweep == 1:
        raise CorrlabError(f"--sweep: expected 0 (no sweep) or a number of sets >= 2, got {args.sweep}")
    config = SegmentTransportConfig(
        mode=args.mode,
        k=args.k,
        weight_schedule=MidpointToUniformWeights(sigma_start=args.sigma_start, ramp_fraction=args.ramp, floor=args.floor),
        smoothing_schedule=LinearDecaySmoothing(w_start=args.w_start, end_fraction=args.w_end),
        num_joint_steps=args.joint_steps,
    )
    pipe = load_default(args.model)
    cameras, size = (None, None)
    if args.cameras:
        cameras, size = load_cameras(args.cameras, patch_size=pipe.model.config.patch_size)
    steps = args.steps or DEFAULT_STEPS
    guidance = DEFAULT_GUIDANCE if args.guidance is None else args.guidance
    sampling = SamplingOptions(num_views=args.views, num_inference_steps=steps, guidance_scale=guidance, size=size)
    res = generate_pair(pipe, args.prompt_a, args.prompt_b, args.seed, cameras=cameras, sampling=sampling,
                        transport=config, sweep=args.sweep, progress=not args.no_progress)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_set(res.set_a, out / "a")
    save_set(res.set_b, out / "b")
    if res.sweep_sets:
        (out / "sweep").mkdir(exist_ok=True)
        for j, mvs in enumerate(res.sweep_sets):
            save_set(mvs, out / "sweep" / f"alpha_{j:02d}")
    atomic_write_text(
        out / "pair.json",
        json.dumps({
            "prompt_a": args.prompt_a, "prompt_b": args.prompt_b, "seed": args.seed, "mode": args.mode, "k": args.k,
            "steps": steps, "guidance": guidance, "sweep_alphas": res.sweep_alphas,
            "weight_schedule": repr(config.weight_schedule), "smoothing_schedule": repr(config.smoothing_schedule),
            "num_joint_steps": config.joint_steps(steps) if args.mode == "hard-cut" else None,
        }, indent=2),
    )
    print(out)
    return 0
