"""Native far-moving hits of a training run's checkpoints, on the model card's scenes (issue 12, item 3).

The tracking figure ``corrlab train`` logs uses 8 scenes (about 150 far queries, +-0.08). This re-measures
saved EMA weights with the protocol of ``model_quality.py`` (e): image-conditioned 2-view scenes, view 0
given clean, view 1 noised to t = 0.5; a view-1 object token's native match (the matcher's head-averaged
softmax) is a hit when within 1 token of its true match in view 0; "far" = the true match moves >= 2 tokens.
The best finest-grid (16 x 16; ``--grid`` picks another) layer is chosen on the selection scenes (``--seed-start + 40000``) and
reported on separate evaluation scenes (``+ 50000``), beside the camera-geometry-only guess, appearance
NN and appearance NN along the true epipolar line (both on the same noisy input) at that grid. So: does training keep improving the native correspondences?

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/native_over_training.py \\
        --checkpoints RUN/ema/step_0004000 RUN/ema/step_0008000 --out results/native_over_training

Checkpoints are ``RUN/ema/step_XXXXXXX`` folders (a model config + safetensors) or pipeline folders
(``data/corrlab-mvunet-s``). Writes ``native_over_training.csv`` (tidy, atomically) under --out and
ends with one line of key=value pairs.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import re
from pathlib import Path

import pandas as pd
import torch
from tqdm.auto import tqdm

from corrlab.io_utils import atomic_write_bytes
from corrlab.model import load_default
from corrlab.model.conditioned import at_grid, native_hits, pool_hits
from corrlab.model.train import HELD_OUT_SEED_START


def load_checkpoint(path: Path):
    """(model, step) from an EMA step folder or a pipeline folder (both read by ``load_default``)."""
    model = load_default(str(path)).model
    info = path / "checkpoint.json"
    if info.is_file():
        step = int(json.loads(info.read_text())["step"])
    else:
        m = re.search(r"step_(\d+)", str(path))  # RUN/ema/step_X or RUN/checkpoints/step_X/{model,ema}
        step = int(m.group(1)) if m else -1
    return model, step


def measure(model, n: int, seed_start: int, t: float) -> pd.DataFrame:
    """Far-moving shares per layer and method on the selection and the evaluation scenes (tidy)."""
    frames = []
    for split, offset in (("selection", 40_000), ("evaluation", 50_000)):
        pooled = pool_hits(native_hits(model, n_sets=n, t=t, seed_start=seed_start + offset))
        frames.append(pooled[pooled.subset == "far"].assign(split=split))
    return pd.concat(frames, ignore_index=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoints", nargs="+", required=True, help="EMA step folders or pipeline folders")
    ap.add_argument("--n-native", type=int, default=16, help="scenes per split (selection, evaluation)")
    ap.add_argument("--t", type=float, default=0.5)
    ap.add_argument("--seed-start", type=int, default=HELD_OUT_SEED_START)
    ap.add_argument("--out", help="folder for native_over_training.csv")
    ap.add_argument("--grid", help="the layers' token grid to choose from, e.g. 16x16 (default: the finest)")
    args = ap.parse_args(argv)
    if args.seed_start < HELD_OUT_SEED_START:
        ap.error(f"--seed-start: expected a held-out seed >= {HELD_OUT_SEED_START}, got {args.seed_start}")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    frames = []
    for path in tqdm([Path(p) for p in args.checkpoints], desc="checkpoints"):
        model, step = load_checkpoint(path)
        frames.append(measure(model, args.n_native, args.seed_start, args.t).assign(step=step, checkpoint=str(path)))
    df = pd.concat(frames, ignore_index=True)
    if args.out:
        buf = io.StringIO()
        df.to_csv(buf, index=False)
        atomic_write_bytes(Path(args.out) / "native_over_training.csv", buf.getvalue().encode())
    fine = at_grid(df, args.grid)
    rows, key = [], {"n_native": args.n_native, "t": args.t}
    for (step, checkpoint), g in fine.groupby(["step", "checkpoint"], sort=True):
        sel = g[(g.split == "selection") & (g.method == "native")]
        best = sel.loc[sel["share"].idxmax(), "layer"]
        ev = g[(g.split == "evaluation") & (g.layer == best)].set_index("method")
        row = {"step": step, "weights": Path(checkpoint).name, "best layer (selection)": best, "native far (evaluation)": ev.loc["native", "share"],
               "queries": int(ev.loc["native", "n"])}
        for layer in sorted(g.layer.unique()):
            row[f"{layer} (evaluation)"] = float(g[(g.split == "evaluation") & (g.layer == layer) & (g.method == "native")]["share"].iloc[0])
        for method in ("camera geometry only", "appearance NN (noisy input)", "epipolar + appearance NN (noisy input)"):
            row[method] = ev.loc[method, "share"]
        rows.append(row)
        name = f"far_step{step}" if f"far_step{step}" not in key else f"far_step{step}_{Path(checkpoint).name}"
        key[name] = round(float(row["native far (evaluation)"]), 4)
    table = pd.DataFrame(rows)
    pd.set_option("display.width", 200)
    print(f"native far-moving hits within 1 token, t = {args.t}, {args.grid or 'finest'}-grid layers; best layer chosen on "
          f"{args.n_native} selection scenes, reported on {args.n_native} evaluation scenes")
    print(table.round(3).to_string(index=False))
    key["camera_geometry_only"] = round(float(table["camera geometry only"].iloc[0]), 4)
    key["epipolar_appearance_noisy"] = round(float(table["epipolar + appearance NN (noisy input)"].iloc[0]), 4)
    print(" ".join(f"{k}={v}" for k, v in key.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
