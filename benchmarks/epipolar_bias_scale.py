"""How strongly the embedded model's epipolar bias tells a token's epipolar line from its neighbours, by view angle.

``corrlab-mvunet-s`` subtracts ``lambda_h * p^2`` from its attention logits, ``p = d_i . m_j + m_i . d_j`` the
reciprocal product of the two tokens' Plücker rays (``corrlab.model.ray_bias``). ``p = (o_i - o_j) . (d_i x d_j)``
grows with the baseline ``|o_j - o_i|`` between the two cameras, so the same pixel distance from the epipolar
line costs less and less as two views come together. No images, no sampling: for camera pairs of the renderer's
layouts this computes, on the model's 16 x 16 token grid (64 px), the mean ``p^2`` over token pairs on each
other's epipolar line (< 1 px from it) and over pairs 1-2 tokens off it (4-8 px), and the bias contrast
``lambda_max * (off - on)`` in logits (``lambda_max``: the largest learned strength of the shipped weights), by
the pair's view angle; beside it the same contrast with ``p`` divided by the baseline (times the median
baseline of the 'train' layout's pairs), a normalisation the current bias does not have.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/epipolar_bias_scale.py

Ends with one line of key=value pairs (``contrast_<layout>_<bin>`` and ``normalised_<layout>_<bin>``, logits).
"""
from __future__ import annotations

import argparse
import math
import os

import pandas as pd
import torch

from corrlab.geometry.epipolar import fundamental_matrix
from corrlab.model import load_default
from corrlab.model.ray_bias import reciprocal_product, unit_rays
from corrlab.model.train import HELD_OUT_SEED_START
from corrlab.scenes import sample_cameras

ANGLE_BINS = (0, 15, 30, 60, 120, 181)


def token_pixels(grid: int, size: int) -> torch.Tensor:
    """``(grid^2, 2)`` float64 pixel centres of a ``grid x grid`` token grid on a ``size`` px image, row-major."""
    step = size / grid
    c = torch.arange(grid, dtype=torch.float64) * step + (step - 1) / 2
    yy, xx = torch.meshgrid(c, c, indexing="ij")
    return torch.stack([xx.reshape(-1), yy.reshape(-1)], dim=1)


def pair_rows(cams, pix: torch.Tensor) -> list[dict]:
    """Per camera pair: view angle, baseline, mean p^2 on / 1-2 tokens off the epipolar line."""
    rays = []
    for cam in cams:
        o, d = cam.rays(pix)
        rays.append(unit_rays(torch.cat([d, torch.cross(o, d, dim=1)], dim=1)))
    hom = torch.cat([pix, torch.ones(len(pix), 1, dtype=pix.dtype)], dim=1)
    rows = []
    for a in range(len(cams)):
        for b in range(a + 1, len(cams)):
            p2 = reciprocal_product(rays[a], rays[b]) ** 2  # (N, N)
            lines = hom @ fundamental_matrix(cams[a], cams[b]).T  # epipolar lines in b of a's tokens
            dist = (lines @ hom.T).abs() / lines[:, :2].norm(dim=1, keepdim=True)  # (N, N) pixels
            cos = float((cams[a].R[2] @ cams[b].R[2]).clamp(-1.0, 1.0))
            rows.append({"angle": math.degrees(math.acos(cos)),
                         "baseline": float((cams[a].center - cams[b].center).norm()),
                         "on": float(p2[dist < 1.0].mean()), "off": float(p2[(dist > 4.0) & (dist < 8.0)].mean())})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="model folder or name under data/ (default: the shipped model)")
    ap.add_argument("--n-sets", type=int, default=60, help="camera sets per layout (4 views: 6 pairs each)")
    ap.add_argument("--layouts", nargs="+", default=["train", "random"])
    ap.add_argument("--seed-start", type=int, default=HELD_OUT_SEED_START)
    args = ap.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    model = load_default(args.model).model
    strengths = [float(m.epipolar_gain_scale * m.epipolar_gain.detach().max()) for m in model.modules()
                 if getattr(m, "epipolar_gain", None) is not None]
    if not strengths:
        raise SystemExit(f"{args.model or 'the shipped model'} has no epipolar bias (epipolar_bias=False)")
    lam = max(strengths)
    size, grid = model.config.sample_size, model.config.sample_size // 4
    pix = token_pixels(grid, size)
    rows = []
    for layout in args.layouts:
        for s in range(args.n_sets):
            for r in pair_rows(sample_cameras(args.seed_start + s, 4, size, layout=layout), pix):
                rows.append({**r, "layout": layout})
    df = pd.DataFrame(rows)
    ref = float(df[df.layout == "train"].baseline.median()) if (df.layout == "train").any() else 1.0
    df["bin"] = pd.cut(df.angle, ANGLE_BINS, right=False, labels=[f"{a}-{b}" for a, b in zip(ANGLE_BINS, ANGLE_BINS[1:])])
    df["contrast"] = lam * (df.off - df.on)
    df["normalised"] = df.contrast * ref ** 2 / df.baseline ** 2
    table = (df.groupby(["layout", "bin"], observed=True)
             .agg(pairs=("angle", "size"), baseline=("baseline", "median"), contrast=("contrast", "median"),
                  normalised=("normalised", "median")).reset_index())
    print(f"largest learned strength lambda = {lam:.1f}; {grid} x {grid} tokens at {size} px; medians over pairs; "
          f"normalised = contrast x ({ref:.2f} / baseline)^2")
    print(table.to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    summary = {"lambda_max": round(lam, 2), "reference_baseline": round(ref, 3)}
    for r in table.itertuples():
        summary[f"contrast_{r.layout}_{r.bin}"] = round(r.contrast, 3)
        summary[f"normalised_{r.layout}_{r.bin}"] = round(r.normalised, 3)
    print(" ".join(f"{k}={v}" for k, v in summary.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
