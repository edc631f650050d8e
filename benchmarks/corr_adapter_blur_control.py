"""Is CorrAdapter's consistency gain more than blur? corr_psnr and PSNR of base, base + CorrAdapter and base blurred.

corr_psnr (colour agreement of the views at the TRUE correspondences, ``corrlab.model.consistency``) rewards
smooth images, so a gain in it could be smoothing rather than alignment. On the image-conditioned evaluation
scenes of ``corr_adapter_conditioned.py`` (view 0 given, same noise per scene), this scores the base's
generation, the same generation with CorrAdapter (``--adapter``, one of that script's settings) and the base's
generated views blurred with a Gaussian of each ``--sigmas`` (pixels); beside each, the mean absolute image
gradient of the generated views (sharpness). Paired differences vs the base with 95 % bootstrap CIs over scenes.

    OMP_NUM_THREADS=1 python benchmarks/corr_adapter_blur_control.py --n 32 --steps 10

Ends with one line of key=value pairs.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from corr_adapter_conditioned import CANDIDATES, EVAL_START, adapter_params, tiny_pipeline  # noqa: E402

from corrlab.evaluation import bootstrap_mean_ci  # noqa: E402
from corrlab.interventions import CorrAdapterHandle  # noqa: E402
from corrlab.model import load_default  # noqa: E402
from corrlab.model.conditioned import psnr  # noqa: E402
from corrlab.model.consistency import correspondence_psnr  # noqa: E402
from corrlab.scenes import render_scene  # noqa: E402


def gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """``images (N, C, H, W)`` blurred by a separable Gaussian of ``sigma`` pixels (replicated border)."""
    r = max(1, int(np.ceil(3 * sigma)))
    t = torch.arange(-r, r + 1, dtype=images.dtype)
    k = torch.exp(-t ** 2 / (2 * sigma * sigma))
    k = k / k.sum()
    C = images.shape[1]
    x = F.pad(images, (r, r, r, r), mode="replicate")
    x = F.conv2d(x, k.view(1, 1, 1, -1).repeat(C, 1, 1, 1), groups=C)
    return F.conv2d(x, k.view(1, 1, -1, 1).repeat(C, 1, 1, 1), groups=C)


def mean_gradient(images: torch.Tensor) -> float:
    """Mean absolute difference of neighbouring pixels (rows and columns) of ``images (N, C, H, W)``."""
    return float((images[..., 1:, :] - images[..., :-1, :]).abs().mean()
                 + (images[..., :, 1:] - images[..., :, :-1]).abs().mean())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="corrlab-mvunet-s")
    ap.add_argument("--tiny", action="store_true", help="a small random-init UNet (smoke test)")
    ap.add_argument("--adapter", default="finest eta0.1 keep-all", choices=sorted(CANDIDATES))
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--views", type=int, default=4)
    ap.add_argument("--sigmas", type=float, nargs="+", default=[0.5, 0.75, 1.0])
    ap.add_argument("--seed-start", type=int, default=EVAL_START)
    args = ap.parse_args(argv)
    if args.n < 2 or args.views < 2 or any(s <= 0 for s in args.sigmas):
        ap.error(f"expected --n >= 2, --views >= 2 and positive --sigmas, got {args.n}, {args.views}, {args.sigmas}")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    pipe = tiny_pipeline() if args.tiny else load_default(args.model)
    ca = CorrAdapterHandle(pipe, image_conditioned=True, **adapter_params(pipe, CANDIDATES[args.adapter]))
    names = ["base", "CorrAdapter"] + [f"blur {s:g}" for s in args.sigmas]
    scores = {k: [] for k in names}  # per scene: (corr_psnr, psnr, gradient)
    for seed in tqdm(range(args.seed_start, args.seed_start + args.n), desc="scenes"):
        truth = render_scene(seed, args.views, pipe.sample_size, "train")
        kw = dict(cameras=truth.cameras, reference={0: truth.images[0]}, num_inference_steps=args.steps,
                  guidance_scale=1.0, seed=seed, progress=False)
        base = pipe(truth.prompt, **kw).images
        ca.enable()
        try:
            adapted = pipe(truth.prompt, **kw).images
        finally:
            ca.disable()
        variants = {"base": base, "CorrAdapter": adapted}
        for s in args.sigmas:
            blurred = base.clone()
            blurred[1:] = gaussian_blur(base[1:], s)  # the given view 0 stays the reference
            variants[f"blur {s:g}"] = blurred
        for k, x in variants.items():
            scores[k].append((correspondence_psnr(x, truth)[0],
                              float(np.mean([psnr(x[v], truth.images[v]) for v in range(1, args.views)])),
                              mean_gradient(x[1:])))
    ref = np.array(scores["base"])
    key = {"n": args.n, "steps": args.steps, "adapter": args.adapter.replace(" ", "_")}
    print(f"{args.n} scenes from seed {args.seed_start}, view 0 given; paired vs base, 95 % bootstrap CI")
    for k in names:
        r = np.array(scores[k])
        cp, lo_c, hi_c, _ = bootstrap_mean_ci(r[:, 0] - ref[:, 0])
        ps, lo_p, hi_p, _ = bootstrap_mean_ci(r[:, 1] - ref[:, 1])
        print(f"{k:12s} corr_psnr {r[:, 0].mean():7.3f} ({cp:+.3f} [{lo_c:+.3f}, {hi_c:+.3f}])  "
              f"PSNR {r[:, 1].mean():7.3f} ({ps:+.3f} [{lo_p:+.3f}, {hi_p:+.3f}])  gradient {r[:, 2].mean():.4f}")
        tag = k.replace(" ", "")
        key[f"{tag}_corr_psnr"] = f"{cp:+.3f}[{lo_c:+.3f},{hi_c:+.3f}]"
        key[f"{tag}_psnr"] = f"{ps:+.3f}[{lo_p:+.3f},{hi_p:+.3f}]"
        key[f"{tag}_gradient"] = round(float(r[:, 2].mean()), 4)
    print(" ".join(f"{k}={v}" for k, v in key.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
