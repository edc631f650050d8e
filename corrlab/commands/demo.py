"""``corrlab demo``: the main job (rendered-scene baselines, then probing the embedded model)."""
from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the main job: baseline table on rendered scenes, probe-and-score on the embedded model")
    p.add_argument("--out", default="out/demo", help="directory for tables, plots and generated sets (default: out/demo)")
    p.add_argument("--scenes", type=int, default=20, help="rendered 4-view scenes for the baseline table (default 20)")
    p.add_argument("--size", type=int, default=128, help="rendered image size (default 128)")
    p.add_argument("--seed", type=int, default=1_000_000, help="first scene seed (held-out range by default)")
    p.add_argument("--sets", type=int, default=4,
                   help="generated 4-view sets to probe and score (default 4; at least 2: the best (layer, step) "
                   "of one half is scored on the other)")
    p.add_argument("--model", default=None,
                   help="model folder or name under data/ (default: the embedded model, corrlab-mvunet-s, or "
                   "$CORRLAB_MODEL)")
    p.add_argument("--reference-views", type=int, nargs="+", default=[0], metavar="V",
                   help="views of each held-out rendered scene given as clean references, the others generated under "
                   "the scene's cameras (image-conditioned, the paper's main setting; default: 0)")
    p.add_argument("--text-only", action="store_true",
                   help="text-to-multi-view instead: no reference views, cameras from the seed")
    p.add_argument("--num-steps", type=int, default=None, help="sampling steps (default: the model's default)")
    p.set_defaults(func=run)


def run(args) -> int:
    from pathlib import Path

    import pandas as pd

    from ..evaluation import DEFAULT_THRESHOLDS, baseline_scores, baseline_summary
    from ..errors import CorrlabError
    from ..io_utils import atomic_write_text

    if args.sets < 2:
        raise CorrlabError(f"--sets: expected at least 2 generated sets (the best (layer, step) is chosen on one half "
                           f"and scored on the other), got {args.sets}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pd.set_option("display.width", 160)
    print(f"[1/2] baselines on {args.scenes} rendered 4-view scenes at {args.size}x{args.size} "
          f"(all 12 ordered view pairs each, symmetric epipolar distance)")
    df, skipped = baseline_scores(range(args.seed, args.seed + args.scenes), views=4, size=args.size,
                                  thresholds=DEFAULT_THRESHOLDS)
    table = baseline_summary(df)
    atomic_write_text(out / "baseline_scores.csv", df.to_csv(index=False))
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    for name, reason in skipped.items():
        print(f"  {name}: unavailable ({reason.splitlines()[0]})")

    from ..evaluation import comparison_from_scores, score_sets
    from ..io_utils import atomic_write_bytes
    from ..model import load_default, resolve_model_path
    from ..plotting import comparison_figure, figure_to_png
    from ..probing import probe_generations

    given = [] if args.text_only else sorted(set(args.reference_views))
    model_path = resolve_model_path(args.model)
    setting = (f"image-conditioned (views {given} of each rendered scene given, the others generated)" if given
               else "text-only")
    print(f"\n[2/2] probe-and-score: {args.sets} generated 4-view sets of the embedded model "
          f"({model_path.name}), {setting}; native "
          f"correspondences (all multi-image layers, all steps) vs controls and baselines on the same images.\n"
          f"native-held-out: each set scored at the best (layer, step) of the other sets (alternate halves); "
          f"native-best-in-sample is chosen and scored on the same sets (optimistic)")
    pipe = load_default(model_path)
    dirs = probe_generations(pipe, range(args.seed, args.seed + args.sets), out / "generated",
                             num_inference_steps=args.num_steps, reference_views=given)
    scores = score_sets(dirs, thresholds=tuple(range(1, 11)), controls=("identity", "chance", "appearance"))
    table = comparison_from_scores(scores)
    atomic_write_text(out / "comparison_scores.csv", scores.to_csv(index=False))
    atomic_write_text(out / "comparison.csv", table.to_csv(index=False))
    shown = table[table["threshold"].isin([1.0, 2.0, 5.0, 10.0])].drop(columns=["note", "n_sets"])
    print(shown.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print("held-out choices: " + table.loc[table["method"] == "native-held-out", "note"].iloc[0])
    fig = comparison_figure(table, title=f"native correspondences vs baselines, {args.sets} generated sets, {setting.split(' (')[0]}")
    atomic_write_bytes(out / "comparison.png", figure_to_png(fig, dpi=110))
    print(f"\ntables and plot: {out}/baseline_scores.csv, {out}/comparison.csv, {out}/comparison_scores.csv, "
          f"{out}/comparison.png")
    return 0
