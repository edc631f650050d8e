"""``corrlab demo``: the main job (rendered-scene baselines, then probing the embedded model)."""
from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the main job: baseline table on rendered scenes, probe-and-score on the embedded model")
    p.add_argument("--out", default="out/demo", help="directory for tables, plots and generated sets (default: out/demo)")
    p.add_argument("--scenes", type=int, default=20, help="rendered 4-view scenes for the baseline table (default 20)")
    p.add_argument("--size", type=int, default=128, help="rendered image size (default 128)")
    p.add_argument("--seed", type=int, default=1_000_000, help="first scene seed (held-out range by default)")
    p.set_defaults(func=run)


def run(args) -> int:
    from pathlib import Path

    import pandas as pd

    from ..baseline_table import baseline_scores, baseline_summary
    from ..io_utils import atomic_write_text

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pd.set_option("display.width", 160)
    print(f"[1/2] baselines on {args.scenes} rendered 4-view scenes at {args.size}x{args.size} "
          f"(all 6 view pairs each, symmetric epipolar distance)")
    df, skipped = baseline_scores(range(args.seed, args.seed + args.scenes), views=4, size=args.size,
                                  thresholds=(1.0, 2.0, 5.0))
    table = baseline_summary(df)
    atomic_write_text(out / "baseline_scores.csv", df.to_csv(index=False))
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    for name, reason in skipped.items():
        print(f"  {name}: unavailable ({reason.splitlines()[0]})")
    return 0
