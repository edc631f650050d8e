"""Segment transport effect: structural alignment of jointly generated pairs, per ablation mode.

For N prompt pairs x seeds (held-out seeds; the two prompts differ in colour and shape), every mode
(full / anchor-mean / endpoints / hard-cut / independent) generates the pair from the same noise and
cameras; measured per pair, averaged over views:
* ``iou``: IoU of the object masks of the two endpoints (mask = pixels far from the renderer's plain
  background colour, holes filled);
* ``centroid_dist``: distance of the mask centroids, in units of the image side;
* ``scale_agree``: smaller / larger mask area (1 = same size);
* ``feat_dist``: the model's own feature distance at matched positions: cosine distance between the two
  endpoints' hidden states (output of block ``--layer``) at the same tokens (same camera rays), both
  re-noised to ``--feat-t`` with the same noise and run with their own prompt, over object tokens;
* quality kept: ``colour_ok`` (the dominant hue is the prompt's colour word) and ``shape_ok`` (a k-NN
  silhouette classifier, trained on renders, names the prompt's shape) for each endpoint.
The paper claims full > anchor-mean > endpoints > hard-cut in alignment. Spread: mean, std and a
bootstrap 95 % CI over pairs, plus the paired difference of every mode to ``independent``.
The mask, colour and shape measures are checked on renders (ground truth) first: their ceilings.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/segment_transport_effect.py                  # ~10 min
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/segment_transport_effect.py --n 4 --steps 4  # quick

Ends with one line of key=value pairs.
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import torch
from sklearn.neighbors import KNeighborsClassifier
from tqdm.auto import tqdm

from corrlab.evaluation import bootstrap_mean_ci
from corrlab.interventions import MODES
from corrlab.interventions import SegmentTransportConfig
from corrlab.interventions.pair_generation import SamplingOptions, generate_pairs
from corrlab.model import DEFAULT_GUIDANCE, CorrlabPipeline, load_default
from corrlab.model.adherence import dominant_colour_word
from corrlab.model.train import HELD_OUT_SEED_START
from corrlab.scenes import BACKGROUND_RGB, VOCABULARY, render_scene

PAIR_METRICS = ("iou", "centroid_dist", "scale_agree", "feat_dist")
END_METRICS = ("colour_ok", "shape_ok")


# ----------------------------------------------------------------------------------- measures
def object_masks(images: torch.Tensor, threshold: float = 0.12) -> np.ndarray:
    """``(V, 3, H, W)`` images -> ``(V, H, W)`` bool: pixels whose colour is more than ``threshold`` (max over
    channels) from the background, with holes filled (neutral texture cells near the background grey)."""
    bg = torch.tensor(BACKGROUND_RGB, dtype=images.dtype).view(1, 3, 1, 1)
    raw = ((images - bg).abs().amax(dim=1) > threshold).numpy().astype(np.uint8)
    out = []
    for m in raw:
        h, w = m.shape
        flood = np.pad(m, 1).copy()
        cv2.floodFill(flood, np.zeros((h + 4, w + 4), np.uint8), (0, 0), 2)
        out.append((flood[1:-1, 1:-1] != 2))
    return np.stack(out)


def mask_alignment(ma: np.ndarray, mb: np.ndarray) -> dict:
    """IoU, centroid distance (/ image side) and area agreement of two ``(V, H, W)`` mask stacks, mean over views."""
    H, W = ma.shape[1:]
    ys, xs = np.mgrid[0:H, 0:W]
    iou, cd, sc = [], [], []
    for a, b in zip(ma, mb):
        union = (a | b).sum()
        iou.append((a & b).sum() / union if union else 1.0)
        if a.sum() and b.sum():
            ca = np.array([xs[a].mean(), ys[a].mean()])
            cb = np.array([xs[b].mean(), ys[b].mean()])
            cd.append(np.linalg.norm(ca - cb) / max(H, W))
            sc.append(min(a.sum(), b.sum()) / max(a.sum(), b.sum()))
        else:
            cd.append(np.nan)
            sc.append(0.0 if (a.sum() or b.sum()) else 1.0)
    return {"iou": float(np.mean(iou)), "centroid_dist": float(np.nanmean(cd)) if not np.all(np.isnan(cd)) else np.nan,
            "scale_agree": float(np.mean(sc))}


def silhouette_features(mask: np.ndarray) -> np.ndarray:
    """Scale/translation-invariant descriptors of one ``(H, W)`` mask: log Hu moments, extent, solidity, aspect."""
    m = mask.astype(np.uint8)
    if m.sum() < 4:
        return np.zeros(10)
    hu = cv2.HuMoments(cv2.moments(m, binaryImage=True)).ravel()
    hu = -np.sign(hu) * np.log10(np.abs(hu) + 1e-30)
    cnts, _ = cv2.findContours(m, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    c = max(cnts, key=cv2.contourArea)
    area = max(cv2.contourArea(c), 1.0)
    (_, _), (rw, rh), _ = cv2.minAreaRect(c)
    extent = area / max(rw * rh, 1.0)
    solidity = area / max(cv2.contourArea(cv2.convexHull(c)), 1.0)
    aspect = min(rw, rh) / max(rw, rh, 1.0)
    return np.concatenate([np.clip(hu, -30, 30) / 10.0, [extent, solidity, aspect]])


def train_shape_classifier(n: int, views: int, size: int, seed0: int) -> tuple[KNeighborsClassifier, float]:
    """k-NN on render silhouettes (training seeds); returns it and its per-view accuracy on held-out renders."""
    def data(seeds):
        X, y = [], []
        for s in seeds:
            mv = render_scene(s, views=views, size=size, layout="train")
            shape = mv.prompt.split()[-1]
            for m in mv.masks.numpy():
                X.append(silhouette_features(m))
                y.append(shape)
        return np.array(X), np.array(y)

    X, y = data(range(seed0, seed0 + n))
    clf = KNeighborsClassifier(n_neighbors=5).fit(X, y)
    Xt, yt = data(range(HELD_OUT_SEED_START + 500_000, HELD_OUT_SEED_START + 500_000 + max(n // 4, 8)))
    return clf, float((clf.predict(Xt) == yt).mean())


def render_checks(clf, n: int, views: int, size: int) -> dict:
    """Ceilings on held-out renders: mask IoU of ``object_masks`` vs the true masks, colour and shape accuracy."""
    ious, col = [], []
    for s in range(HELD_OUT_SEED_START + 600_000, HELD_OUT_SEED_START + 600_000 + n):
        mv = render_scene(s, views=views, size=size, layout="train")
        m = object_masks(mv.images)
        t = mv.masks.numpy()
        ious += [(a & b).sum() / max((a | b).sum(), 1) for a, b in zip(m, t)]
        col += [dominant_colour_word(img) == mv.prompt.split()[0] for img in mv.images]
    return {"render_mask_iou": float(np.mean(ious)), "render_colour_ok": float(np.mean(col))}


@torch.no_grad()
def feature_distance(pipe: CorrlabPipeline, res_list, prompt_pairs, layer: int, t_feat: float, seed: int) -> list[float]:
    """Cosine distance of block ``layer``'s hidden states of the two endpoints at the same tokens (object tokens)."""
    model = pipe.model
    p = model.config.patch_size
    captured = {}
    hook = model.blocks[layer].register_forward_hook(lambda mod, inp, out: captured.__setitem__("h", out))
    out = []
    try:
        for res, (pa, pb) in zip(res_list, prompt_pairs):
            sa, sb = res.set_a, res.set_b
            V, _, H, W = sa.images.shape
            x = torch.stack([sa.images, sb.images]) * 2 - 1  # (2, V, 3, H, W) model scale
            eps = torch.randn(x.shape[1:], generator=torch.Generator().manual_seed(seed))
            xt = ((1 - t_feat) * x + t_feat * eps).to(pipe.device)
            rays = pipe.ray_embeds(sa.cameras, H)[None].expand(2, -1, -1, -1, -1)
            model(xt, torch.full((2,), t_feat, device=pipe.device), pipe.encode_prompt([pa, pb]), rays)
            h = captured["h"]  # DiT: (2, V*h*w, C) tokens; UNet: (2*V, C, h, w) feature maps
            k = p
            if h.dim() == 4:
                k = H // h.shape[-1]
                h = h.reshape(2, V, *h.shape[1:]).permute(0, 1, 3, 4, 2).reshape(2, -1, h.shape[1])
            cos = torch.nn.functional.cosine_similarity(h[0], h[1], dim=-1).cpu()  # (V*h*w,)
            ma, mb = object_masks(sa.images), object_masks(sb.images)
            union = torch.from_numpy(ma | mb).float()[:, None]
            tok = torch.nn.functional.max_pool2d(union, k).reshape(-1) > 0
            out.append(float((1 - cos[tok]).mean()) if bool(tok.any()) else float("nan"))
    finally:
        hook.remove()
    return out


# ----------------------------------------------------------------------------------- pairs
def prompt_pairs(n: int, seed0: int) -> list[tuple[tuple[str, str], int]]:
    """``n`` (prompt pair, seed): the two prompts differ in colour and shape; patterns drawn independently."""
    out = []
    for j in range(n):
        g = torch.Generator().manual_seed(seed0 + j)
        pick = lambda words, k: [words[i] for i in torch.randperm(len(words), generator=g)[:k].tolist()]  # noqa: E731
        ca, cb = pick(VOCABULARY["colour"], 2)
        sa, sb = pick(VOCABULARY["shape"], 2)
        pa, pb = (VOCABULARY["pattern"][int(torch.randint(3, (1,), generator=g))] for _ in range(2))
        out.append(((f"{ca} {pa} {sa}", f"{cb} {pb} {sb}"), seed0 + j))
    return out


def summarise(df: pd.DataFrame) -> pd.DataFrame:
    """Per mode and metric: n, mean, std, bootstrap CI; and paired difference to ``independent`` with its CI."""
    rows = []
    ind = df[df["mode"] == "independent"].set_index(["pair", "endpoint", "metric"])["value"]
    for (mode, metric), g in df.groupby(["mode", "metric"], sort=False):
        v = g["value"].to_numpy(dtype=float)
        _, lo, hi, _ = bootstrap_mean_ci(v)
        d = (g.set_index(["pair", "endpoint", "metric"])["value"] - ind).to_numpy(dtype=float)
        _, dlo, dhi, _ = bootstrap_mean_ci(d)
        rows.append(dict(mode=mode, metric=metric, n=int((~np.isnan(v)).sum()), mean=np.nanmean(v), std=np.nanstd(v),
                         ci_lo=lo, ci_hi=hi, diff_vs_independent=np.nanmean(d), diff_ci_lo=dlo, diff_ci_hi=dhi))
    return pd.DataFrame(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="model folder or name under data/ (default: the shipped model)")
    ap.add_argument("--tiny", action="store_true", help="small random-init model (smoke test of the script)")
    ap.add_argument("--n", type=int, default=32, help="prompt pairs x seeds")
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--views", type=int, default=2)
    ap.add_argument("--steps", type=int, default=8, help="sampling steps (default 8 keeps it near 10 CPU minutes)")
    ap.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE)
    ap.add_argument("--batch", type=int, default=8, help="pairs per segment transport (one batched call)")
    ap.add_argument("--layer", type=int, help="block whose output is compared (default: the middle one)")
    ap.add_argument("--feat-t", type=float, default=0.3, help="noise level of the feature comparison")
    ap.add_argument("--seed-start", type=int, default=HELD_OUT_SEED_START)
    ap.add_argument("--shape-train", type=int, default=96, help="rendered scenes for the silhouette classifier")
    ap.add_argument("--out", help="folder for per_pair.csv and summary.csv")
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    if args.tiny:
        from segment_transport_cost import tiny_pipeline  # noqa: E402 (same folder)

        pipe = tiny_pipeline()
    else:
        pipe = load_default(args.model)
    size = pipe.sample_size
    layer = len(pipe.model.blocks) // 2 if args.layer is None else args.layer
    if not 0 <= layer < len(pipe.model.blocks):
        ap.error(f"--layer: expected a block index in [0, {len(pipe.model.blocks)}), got {layer}")

    clf, shape_ceiling = train_shape_classifier(args.shape_train, args.views, size, seed0=0)
    checks = render_checks(clf, 16, args.views, size)
    checks["render_shape_ok"] = shape_ceiling
    print("measures on renders (ceilings): " + ", ".join(f"{k} {v:.3f}" for k, v in checks.items()))

    pairs = prompt_pairs(args.n, args.seed_start)
    rows = []
    for mode in args.modes:
        t0 = time.perf_counter()
        for b0 in tqdm(range(0, len(pairs), args.batch), desc=mode):
            chunk = pairs[b0 : b0 + args.batch]
            prompts, seeds = [c[0] for c in chunk], [c[1] for c in chunk]
            res = generate_pairs(pipe, prompts, seeds, transport=SegmentTransportConfig(mode=mode, k=args.k),
                                 sampling=SamplingOptions(num_views=args.views, num_inference_steps=args.steps,
                                                          guidance_scale=args.guidance), progress=False)
            feats = feature_distance(pipe, res, prompts, layer, args.feat_t, seed=12345)
            for j, (r, (pa, pb), seed, fd) in enumerate(zip(res, prompts, seeds, feats)):
                pair_id = b0 + j
                ma, mb = object_masks(r.set_a.images), object_masks(r.set_b.images)
                al = dict(mask_alignment(ma, mb), feat_dist=fd)
                base = dict(pair=pair_id, seed=seed, mode=mode, prompt_a=pa, prompt_b=pb)
                rows += [dict(base, endpoint="pair", metric=m, value=al[m]) for m in PAIR_METRICS]
                for end, s, prompt, masks in (("a", r.set_a, pa, ma), ("b", r.set_b, pb, mb)):
                    colour, shape = prompt.split()[0], prompt.split()[-1]
                    col = np.mean([dominant_colour_word(img) == colour for img in s.images])
                    shp = np.mean([clf.predict(silhouette_features(m)[None])[0] == shape for m in masks])
                    rows += [dict(base, endpoint=end, metric="colour_ok", value=float(col)),
                             dict(base, endpoint=end, metric="shape_ok", value=float(shp))]
        print(f"{mode}: {time.perf_counter() - t0:.1f} s for {len(pairs)} pairs")
    df = pd.DataFrame(rows)
    summary = summarise(df)
    pd.set_option("display.width", 200, "display.max_rows", 200)
    print(summary.round(4).to_string(index=False))

    kv = {"n": args.n, "steps": args.steps, "views": args.views, "k": args.k, "layer": layer, "tiny": args.tiny}
    kv.update({k: round(v, 4) for k, v in checks.items()})
    for _, r in summary.iterrows():
        kv[f"{r['metric']}_{r['mode']}"] = round(float(r["mean"]), 4)
    if {"full", "anchor-mean", "endpoints", "hard-cut"} <= set(args.modes):
        iou = summary[summary.metric == "iou"].set_index("mode")["mean"]
        chain = [iou[m] for m in ("full", "anchor-mean", "endpoints", "hard-cut")]
        kv["iou_chain_A>B>C>D"] = all(x > y for x, y in zip(chain, chain[1:]))
    kv["seconds"] = round(time.perf_counter() - t_start, 1)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        df.to_csv(out / "per_pair.csv", index=False)
        summary.to_csv(out / "summary.csv", index=False)
    print(" ".join(f"{k}={v}" for k, v in kv.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
