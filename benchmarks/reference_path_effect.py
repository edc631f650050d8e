"""How much a ``MultiViewUNet(reference_concat=True)`` uses its reference path, by view angle to the reference.

On held-out scenes of a camera layout (view 0 given clean, the other views noised to time ``t`` with seeded noise),
the model's velocity with its reference convolution (``conv_in_reference``) as trained and with it zeroed (weight and
bias: the input the path adds removed, the rest of the network unchanged). Per generated view, by its angle to the
reference (camera centres seen from the scene centre): the relative change of the velocity ``|v - v0| / |v0|`` and
the flow-matching loss ``mean (v - (noise - x0))^2`` with and without the path. A path that carries the reference's
pixels to the views that look the same way lowers the loss there and leaves far views alone.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/reference_path_effect.py --model MODEL_DIR [--layout random]

Ends with one line of key=value pairs (``dv_<t>_<bin>``, ``loss_with_<t>_<bin>``, ``loss_without_<t>_<bin>``).
"""
from __future__ import annotations

import argparse
import math
import os

import pandas as pd
import torch

from corrlab.errors import CorrlabError
from corrlab.model import CorrlabPipeline
from corrlab.model.train import HELD_OUT_SEED_START, render_batch
from corrlab.scenes import LAYOUTS, sample_cameras

ANGLE_BINS = (0, 30, 60, 181)


def view_angles(seed: int, views: int, size: int, layout: str) -> list[float]:
    """Angles in degrees between view 0's camera centre and each view's, seen from the scene centre (the origin)."""
    centres = [c.center.to(torch.float64) for c in sample_cameras(seed, views, size, layout)]
    cos = [float(centres[0] @ c / (centres[0].norm() * c.norm())) for c in centres]
    return [math.degrees(math.acos(max(-1.0, min(1.0, x)))) for x in cos]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="pipeline folder of a MultiViewUNet with reference_concat=True")
    ap.add_argument("--layout", default="random", choices=LAYOUTS)
    ap.add_argument("--n-sets", type=int, default=12)
    ap.add_argument("--timesteps", type=float, nargs="+", default=[0.9, 0.5, 0.2])
    ap.add_argument("--seed-start", type=int, default=HELD_OUT_SEED_START)
    args = ap.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    model = CorrlabPipeline.from_pretrained(args.model).transformer.eval()
    if not getattr(model.config, "reference_concat", False):
        raise CorrlabError(f"model: expected a MultiViewUNet with reference_concat=True, got {args.model!r}")
    V, S = 4, int(model.config.sample_size)
    seeds = list(range(args.seed_start, args.seed_start + args.n_sets))
    x0, prompts, rays = render_batch(seeds, V, S, args.layout, 1, float(model.config.scene_scale))
    B = len(seeds)
    given = torch.zeros(B, V, dtype=torch.bool)
    given[:, 0] = True
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    angles = torch.tensor([view_angles(s, V, S, args.layout) for s in seeds])[:, 1:].reshape(-1)
    rows = []
    with torch.no_grad():
        pe = model.encode_prompt(prompts)
        for t in args.timesteps:
            x_t = torch.where(given[:, :, None, None, None], x0, (1 - t) * x0 + t * noise)
            tt = torch.full((B,), float(t))
            v = model(x_t, tt, pe, rays, given)
            saved = [p.clone() for p in model.conv_in_reference.parameters()]
            try:
                for p in model.conv_in_reference.parameters():
                    p.zero_()
                v0 = model(x_t, tt, pe, rays, given)
            finally:
                for p, s in zip(model.conv_in_reference.parameters(), saved):
                    p.copy_(s)
            target = noise - x0
            dv = ((v - v0).flatten(2).norm(dim=2) / v0.flatten(2).norm(dim=2))[:, 1:].reshape(-1)
            loss = (v - target).pow(2).mean(dim=(2, 3, 4))[:, 1:].reshape(-1)
            loss0 = (v0 - target).pow(2).mean(dim=(2, 3, 4))[:, 1:].reshape(-1)
            for a, d, l1, l0 in zip(angles.tolist(), dv.tolist(), loss.tolist(), loss0.tolist()):
                rows.append({"t": t, "angle_deg": a, "dv": d, "loss_with": l1, "loss_without": l0})
    df = pd.DataFrame(rows)
    df["angle_bin"] = pd.cut(df["angle_deg"], ANGLE_BINS, right=False,
                             labels=[f"{a}_{b}" for a, b in zip(ANGLE_BINS[:-1], ANGLE_BINS[1:])])
    table = df.groupby(["t", "angle_bin"], observed=True).agg(
        views=("dv", "size"), dv=("dv", "mean"), loss_with=("loss_with", "mean"), loss_without=("loss_without", "mean"))
    print(f"{args.model}, layout {args.layout}, {B} sets, view 0 given; velocity change and flow loss by angle:")
    print(table.round(4).to_string())
    kv = []
    for (t, b), r in table.iterrows():
        for k in ("dv", "loss_with", "loss_without"):
            kv.append(f"{k}_{t}_{b}={r[k]:.4f}")
    print(" ".join(kv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
