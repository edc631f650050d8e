"""``corrlab probe``: generate a multi-view set while recording the model's native correspondences."""
from __future__ import annotations

import argparse

from .generate import add_diffusers_arguments, add_generation_arguments


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "probe",
        help="generate a set with the embedded model and record native correspondences (DIR/record.nc)",
        description="Generate one multi-view set with the embedded model while probing its multi-image "
        "attention layers; writes the set (views, cameras.json) and the probe record DIR/record.nc. "
        "Score it with `corrlab score DIR`.",
    )
    add_generation_arguments(p, steps_flag="--num-steps")
    p.add_argument("--layers", nargs="+", metavar="NAME", help="layers to probe (default: all multi-image layers)")
    p.add_argument("--steps", nargs="+", type=int, metavar="I", help="step indices to record (default: all)")
    add_matching_arguments(p)
    add_diffusers_arguments(p)
    p.set_defaults(func=run)


def add_matching_arguments(parser) -> None:
    """The probe's matching flags: one per :class:`~corrlab.probing.matcher.MatchingOptions` field (defaults
    there, shown in the help), plus ``--chunk-size`` and ``--batch-index``."""
    from ..probing.matcher import DEFAULT_CHUNK_SIZE, MatchingOptions

    d = MatchingOptions()
    g = parser.add_argument_group("matching (defaults: the paper's, corrlab.probing.MatchingOptions)")
    g.add_argument("--similarity", choices=("softmax", "dual_softmax"), help=f"({d.similarity})")
    g.add_argument("--heads", choices=("per_head", "mean"), help=f"({d.heads})")
    g.add_argument("--confidence", choices=("global", "window"), help=f"({d.confidence})")
    g.add_argument("--threshold", type=float, help=f"keep a match when confidence >= this ({d.threshold})")
    g.add_argument("--strict", action="store_true", default=None, help="keep a match only when confidence > threshold")
    g.add_argument("--window-radius", type=int, help=f"r of the (2r+1)^2 window ({d.window_radius})")
    g.add_argument("--mutual", action="store_true", default=None, help="keep only mutual nearest neighbours")
    g.add_argument("--history", type=int, help="match with the max of q/k over the last N calls (SyncDreamer: 11)")
    g.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE,
                   help=f"source tokens per block (memory bound, {DEFAULT_CHUNK_SIZE})")
    g.add_argument("--batch-index", type=int, help="batch entry to record (default: the conditional branch)")


def matching_from_args(args: argparse.Namespace):
    """One :class:`~corrlab.probing.matcher.MatchingOptions` from the flags given (the others: its defaults)."""
    from ..probing.matcher import MatchingOptions

    given = {name: getattr(args, name, None) for name in MatchingOptions.fields()}
    return MatchingOptions.build(**{k: v for k, v in given.items() if v is not None})


def run(args: argparse.Namespace) -> int:
    from ..errors import CorrlabError
    from ..model import DEFAULT_STEPS, resolve_model_path
    from ..probing import probe
    from ..sets import save_set
    from .generate import embedded_model_and_cameras, sample_embedded

    if args.views < 1:
        raise CorrlabError(f"--views: expected a positive number of views, got {args.views}")
    matching = matching_from_args(args)  # before any loading: bad flags fail fast
    from ..pipelines import pipeline_source
    from .generate import run_pipeline_command

    if pipeline_source(args.model) is not None:
        return run_pipeline_command(args, record=True)
    pipe, cameras, size = embedded_model_and_cameras(args)
    with probe(pipe, layers=args.layers, steps=args.steps, matching=matching, batch_index=args.batch_index,
               chunk_size=args.chunk_size) as rec:
        mvs = sample_embedded(pipe, args, cameras, size, args.num_steps)
    if not rec.steps:
        raise CorrlabError(f"--steps: no step of the {args.num_steps or DEFAULT_STEPS} sampled matched {args.steps}")
    rec.set_meta(model=str(resolve_model_path(args.model)))  # prompt, seed, cameras: recorded by the probe
    out = save_set(mvs, args.out)
    rec.save(out / "record.nc")
    print(out)
    return 0
