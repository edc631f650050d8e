"""Quality of the embedded model (the figures of its model card).

(a) Multi-view consistency: SIFT matches between the generated views of held-out prompt/seed sets,
    scored by symmetric epipolar distance under the conditioning cameras (precision and correct count
    at 1 and 2 px), next to the renderer's sets with the same cameras (ceiling) and the generated views
    scored under the cameras of another set (shuffled, floor), and the renders under another set's cameras
    (the renders' own gap true - shuffled is the most the generated views can show at this image size).
(b) Native correspondences: per layer and t in {0.2, 0.5, 0.8}, share of view-0 object tokens whose
    match in view 1 (the matcher's head-averaged softmax, ``heads="mean"``, read by the taps) is within
    1 token of the truth, for all and for far-moving (>= 2 tokens)
    tokens, next to chance, same position, camera geometry only, appearance NN (noisy and clean), and
    the untrained architecture.
(c) Prompt adherence: dominant hue of generated objects vs the colour word (renders as a check).
(d) Sampling seconds per 4-view set at the default step count.
(e) The paper's image-conditioned setting (reference-conditioned models only): held-out scenes, view 0
    given, views 1-3 generated under their true cameras. PSNR / SSIM / object-mask IoU against the rendered
    truth of the same scene beside the controls "copy the reference view" and "mean image", with 95 %
    bootstrap CIs of the paired differences; SIFT epipolar precision of the (reference + generated) views
    under the true cameras vs another scene's cameras, beside the renders; native far-moving hits at
    t = 0.5 (generated view -> reference view) with the best finest-grid layer chosen on SEPARATE scenes, beside
    chance, same position, camera geometry only and appearance NN.
Also writes a contact sheet (rendered | generated, same prompt and cameras) with --contact-sheet, and for
(e) reference | generated | truth with --conditioned-sheet.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/model_quality.py --n-sets 4 --n-native 2 --n-prompt 8   # quick
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/model_quality.py --out artifacts/model_quality          # full
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/model_quality.py --layout random --skip b c   # the issue-12 cameras

Ends with one line of key=value pairs.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from corrlab.baselines import match_sift
from corrlab.evaluation import bootstrap_mean_ci, pool_scores, score_matches
from corrlab.model import DEFAULT_GUIDANCE, DEFAULT_STEPS, MultiViewDiT, load_default
from corrlab.model.adherence import dominant_colour_word
from corrlab.model.native import (
    appearance_nn,
    chance_rate,
    geometry_guess,
    hits,
    model_argmax,
    pixel_to_index,
    token_centres,
    token_queries,
)
from corrlab.model.sheets import conditioned_sheet, save_png, text_sheet
from corrlab.model.train import HELD_OUT_SEED_START
from corrlab.scenes import LAYOUTS, VOCABULARY, render_scene, sample_cameras

THRESHOLDS = (1.0, 2.0)
# summary-key stems of the SIFT rows: the renders' gap (rendered - rendered_shuffled) is the most the
# generated views' gap (generated - shuffled) can show at this image size
SIFT_KEYS = {"rendered": "rendered", "generated": "generated", "generated, shuffled cameras": "shuffled",
             "rendered, shuffled cameras": "rendered_shuffled"}


# ------------------------------------------------------------------------------------------ (a)
def sift_pair_scores(images: torch.Tensor, cameras, method: str, upsample: int = 1) -> pd.DataFrame:
    """SIFT on every view pair (i < j) of ``images (V, 3, H, W)``, scored under ``cameras``.

    ``upsample > 1`` runs SIFT on bicubically enlarged views and maps the keypoints back
    (``x = (x_up + 0.5) / upsample - 0.5``), so distances stay in original pixels.
    """
    V = images.shape[0]
    if upsample > 1:
        images = torch.nn.functional.interpolate(images, scale_factor=upsample, mode="bicubic", align_corners=False).clamp(0, 1)
    matches = {}
    for i in range(V):
        for j in range(i + 1, V):
            m = match_sift(images[i], images[j])
            matches[(i, j)] = ((m.pts0 + 0.5) / upsample - 0.5, (m.pts1 + 0.5) / upsample - 0.5)
    return score_matches(matches, cameras, THRESHOLDS, kind="symmetric", method=method)


def consistency(pipe, n_sets: int, steps: int, guidance: float, seed_start: int, upsample: int = 1,
                layout: str = "train"):
    """Generate ``n_sets`` held-out 4-view sets; returns (tidy scores, generated sets, seconds per set)."""
    frames, generated, rendered, seconds = [], [], [], []
    for i in tqdm(range(n_sets), desc="(a) generate + SIFT"):
        seed = seed_start + i
        ref = render_scene(seed, 4, pipe.sample_size, layout)
        t0 = time.perf_counter()
        gen = pipe(ref.prompt, cameras=ref.cameras, num_inference_steps=steps, guidance_scale=guidance, seed=seed,
                   progress=False)
        seconds.append(time.perf_counter() - t0)
        generated.append(gen)
        rendered.append(ref)
        for method, imgs in (("rendered", ref.images), ("generated", gen.images)):
            df = sift_pair_scores(imgs, ref.cameras, method, upsample)
            df["set"] = i
            frames.append(df)
    for i, gen in enumerate(generated):  # floors: generated views and renders under another set's cameras
        other = rendered[(i + 1) % len(rendered)].cameras if len(rendered) > 1 else sample_cameras(seed_start - 1, 4, pipe.sample_size, layout)
        for method, imgs in (("generated, shuffled cameras", gen.images), ("rendered, shuffled cameras", rendered[i].images)):
            df = sift_pair_scores(imgs, other, method, upsample)
            df["set"] = i
            frames.append(df)
    return pd.concat(frames, ignore_index=True), generated, rendered, seconds


def pool_consistency(df: pd.DataFrame) -> pd.DataFrame:
    out = pool_scores(df, ("method", "threshold")).rename(columns={"n_pairs": "pairs"})
    out["correct_per_pair"] = out["n_correct"] / out["pairs"]
    return out


def precision_by_view_angle(df: pd.DataFrame, threshold: float = 2.0, edges=(0, 30, 60, 90, 120, 180)) -> pd.DataFrame:
    """Pooled SIFT precision at ``threshold`` px per method and bucket of the pair's TRUE view angle (degrees).

    Every pair is bucketed by the angle between the viewing directions of its true cameras (the rows of the
    "rendered" method, same set and views), also under shuffled cameras, so each bucket compares the same pairs.
    Returns a wide table: rows = angle buckets, columns = (precision | n_matches, method).
    """
    d = df[df["threshold"] == threshold]
    true = d[d["method"] == "rendered"].set_index(["set", "src", "tgt"])["view_angle"]
    d = d.join(true.rename("true_angle"), on=["set", "src", "tgt"])
    d = d.assign(view_angle_deg=pd.cut(d["true_angle"], list(edges)))
    g = d.groupby(["view_angle_deg", "method"], observed=True)[["n_correct", "n_matches"]].sum()
    g["precision"] = (g["n_correct"] / g["n_matches"]).round(3)
    return g[["precision", "n_matches"]].unstack("method")


def psnr_by_view_angle(rec: pd.DataFrame, edges=(0, 30, 60, 180)) -> pd.DataFrame:
    """Mean PSNR per method and bucket of the generated view's angle to the reference (``reconstruction`` rows),
    with the paired difference "generated - copy reference" over the same views and the number of views."""
    wide = rec.pivot_table(index=["scene", "view", "view_angle"], columns="method", values="psnr").reset_index()
    wide["generated - copy reference"] = wide["generated"] - wide["copy reference"]
    wide["bucket"] = pd.cut(wide["view_angle"], list(edges))
    cols = ["generated", "copy reference", "mean image", "generated - copy reference"]
    out = wide.groupby("bucket", observed=True)[cols].mean().round(3)
    out["n"] = wide.groupby("bucket", observed=True).size()
    return out


# ------------------------------------------------------------------------------------------ (b)
def native_rows(models: dict, n_sets: int, timesteps, far_tokens: float, seed_start: int, size: int, patch: int,
                layout: str = "train") -> pd.DataFrame:
    """Tidy rows (set, t, method, layer, subset, hits, n) for models and controls on view 0 -> 1."""
    h = w = size // patch
    rows = []
    centres = token_centres(size, size, patch)
    for i in tqdm(range(n_sets), desc="(b) native correspondences"):
        seed = seed_start + 10_000 + i
        mvs = render_scene(seed, 4, size, layout)
        q = token_queries(mvs, 0, 1, patch)
        if len(q.src_idx) == 0:
            continue
        far = q.moved >= far_tokens
        subsets = {"all": torch.ones_like(far), "far": far}

        def add(t, method, layer, hit):
            for name, m in subsets.items():
                rows.append(dict(set=i, t=t, method=method, layer=layer, subset=name,
                                 hits=float(hit[m].double().sum()), n=int(m.sum())))

        centre = torch.tensor(mvs.meta["scene"]["position"], dtype=torch.float64)
        static = {
            "chance": chance_rate(q.gt_pix, patch, h, w),
            "same position": hits(q.src_idx, q.gt_pix, patch, h, w).double(),
            "camera geometry only": hits(
                pixel_to_index(geometry_guess(mvs.cameras[0], mvs.cameras[1], centres[q.src_idx], centre), patch, h, w),
                q.gt_pix, patch, h, w).double(),
            "appearance NN (clean)": hits(appearance_nn(mvs.images, 0, 1, patch)[q.src_idx], q.gt_pix, patch, h, w).double(),
        }
        noise = torch.randn(mvs.images.shape, generator=torch.Generator().manual_seed(seed))
        for t in timesteps:
            for method, hit in static.items():
                add(t, method, "-", hit)
            for method, model in models.items():
                argmax, x_t = model_argmax(model, mvs, t, noise)
                for layer, am in argmax.items():
                    add(t, method, layer, hits(am[q.src_idx], q.gt_pix, patch, h, w).double())
            add(t, "appearance NN (noisy input)", "-", hits(appearance_nn(x_t, 0, 1, patch)[q.src_idx], q.gt_pix, patch, h, w).double())
    return pd.DataFrame(rows)


def pool_native(df: pd.DataFrame) -> pd.DataFrame:
    out = df.groupby(["method", "layer", "t", "subset"], sort=False)[["hits", "n"]].sum().reset_index()
    out["share"] = out["hits"] / out["n"]
    return out


# ------------------------------------------------------------------------------------------ (c)
def adherence(pipe, n: int, steps: int, guidance: float, seed_start: int, batch: int = 8) -> pd.DataFrame:
    """``n`` 2-view generations cycling through the colours; dominant hue of view 0 vs the colour word."""
    colours = VOCABULARY["colour"]
    rng = np.random.default_rng(seed_start)
    prompts = [f"{colours[i % len(colours)]} {rng.choice(VOCABULARY['pattern'])} {rng.choice(VOCABULARY['shape'])}"
               for i in range(n)]
    rows = []
    for b0 in tqdm(range(0, n, batch), desc="(c) prompt adherence"):
        chunk = prompts[b0:b0 + batch]
        seed = seed_start + 20_000 + b0
        sets = pipe(chunk, num_views=2, num_inference_steps=steps, guidance_scale=guidance, seed=seed, progress=False)
        for k, s in enumerate(sets):
            found = dominant_colour_word(s.images[0])
            rows.append(dict(source="generated", prompt=chunk[k], colour=chunk[k].split()[0], found=found))
    for i in range(n):  # the classifier on renders (a sanity check of the measurement, not of the model)
        ref = render_scene(seed_start + 20_000 + i, 1, pipe.sample_size, "train")
        rows.append(dict(source="rendered", prompt=ref.prompt, colour=ref.prompt.split()[0],
                         found=dominant_colour_word(ref.images[0])))
    df = pd.DataFrame(rows)
    df["match"] = df["colour"] == df["found"]
    return df


# ------------------------------------------------------------------------------------------ (e)
def conditioned_part(pipe, n_sets: int, n_native: int, steps: int, guidance: float, seed_start: int,
                     sheet: str | None, summary: dict, out: Path | None, layout: str = "train",
                     grid: str | None = None, reference_guidance: float = 1.0) -> None:
    from corrlab.model.conditioned import at_grid, native_hits, pool_hits, reconstruction

    rec, sets = reconstruction(pipe, n_sets=n_sets, views=4, steps=steps, guidance=guidance,
                               seed_start=seed_start + 30_000, layout=layout, return_sets=True, progress=True,
                               reference_guidance=reference_guidance)
    per_scene = rec.groupby(["scene", "method"])[["psnr", "ssim", "iou"]].mean().reset_index()
    print("\n(e) image-conditioned: view 0 given, views 1-3 generated; mean over scenes")
    print(per_scene.groupby("method")[["psnr", "ssim", "iou"]].mean().round(3).to_string())
    wide = per_scene.pivot(index="scene", columns="method")
    for metric in ("psnr", "ssim", "iou"):
        for control in ("copy reference", "mean image"):
            d = (wide[(metric, "generated")] - wide[(metric, control)]).dropna().to_numpy()
            m, lo, hi, _ = bootstrap_mean_ci(d)
            key = f"cond_{metric}_gen_minus_{control.replace(' ', '_')}"
            summary[key] = f"{m:.3f}[{lo:.3f},{hi:.3f}]"
            print(f"  {metric}: generated - {control} = {m:+.3f}  95% CI [{lo:+.3f}, {hi:+.3f}]")
        for method in ("generated", "copy reference", "mean image"):
            summary[f"cond_{metric}_{method.replace(' ', '_')}"] = round(float(wide[(metric, method)].mean()), 4)
    by_angle = psnr_by_view_angle(rec)
    print("(e) PSNR by the generated view's angle to the reference (degrees; mean over views, n views)")
    print(by_angle.to_string())
    for interval, r in by_angle.iterrows():
        lo_deg, hi_deg = int(interval.left), int(interval.right)
        summary[f"cond_psnr_gen_minus_copy_{lo_deg}_{hi_deg}deg"] = round(float(r["generated - copy reference"]), 3)
    frames = []
    for i, (truth, gen) in enumerate(sets):
        other = sets[(i + 1) % len(sets)][0].cameras
        for method, imgs, cams in (("rendered", truth.images, truth.cameras), ("generated", gen.images, truth.cameras),
                                   ("generated, shuffled cameras", gen.images, other),
                                   ("rendered, shuffled cameras", truth.images, other)):
            df = sift_pair_scores(imgs, cams, method)
            df["set"] = i
            frames.append(df)
    pairs = pd.concat(frames, ignore_index=True)
    pooled = pool_consistency(pairs)
    print("(e) SIFT on reference + generated views (symmetric epipolar distance, pooled)")
    print(pooled.to_string(index=False))
    print("(e) the same at 2 px by the pair's true view angle (degrees)")
    print(precision_by_view_angle(pairs).to_string())
    for _, r in pooled.iterrows():
        key = SIFT_KEYS[r["method"]]
        summary[f"cond_sift_{key}_prec@{r['threshold']:g}px"] = round(float(r["precision"]), 4)
    # native: choose the best layer on selection scenes, report it on separate evaluation scenes
    sel = pool_hits(native_hits(pipe.model, n_sets=n_native, t=0.5, seed_start=seed_start + 40_000, layout=layout, progress=True))
    ev_rows = native_hits(pipe.model, n_sets=n_native, t=0.5, seed_start=seed_start + 50_000, layout=layout, progress=True)
    ev = pool_hits(ev_rows)
    # the paper's protocol: correspondences of the highest-resolution multi-image layers (a coarse grid makes
    # "within 1 token" a larger pixel radius); among them the best is chosen on the selection scenes
    far_sel = at_grid(sel[(sel.subset == "far") & (sel.method == "native")], grid)
    best = far_sel.loc[far_sel["share"].idxmax(), "layer"]
    far_ev = ev[ev.subset == "far"]
    print(f"(e) native far-moving hits at t=0.5 (best {grid or 'finest'}-grid layer chosen on separate scenes: {best}; "
          f"controls per layer at that layer's grid)")
    print(far_ev.pivot_table(index=["method"], columns=["layer"], values="share", sort=False).round(3).to_string())
    pick = far_ev[far_ev.layer == best].set_index("method")["share"]
    summary["cond_native_best_layer"] = best
    for method, v in pick.items():
        summary["cond_native_far_" + re.sub(r"[^0-9A-Za-z]+", "_", method).strip("_")] = round(float(v), 4)
    summary["cond_native_far_queries"] = int(far_ev[(far_ev.layer == best) & (far_ev.method == "native")]["n"].iloc[0])
    if out:
        rec.to_csv(out / "conditioned.csv", index=False)
        ev_rows.to_csv(out / "conditioned_native.csv", index=False)
    if sheet:
        save_png(conditioned_sheet(sets), sheet)


# ------------------------------------------------------------------------------------------ main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="model folder or name under data/ (default: the shipped model)")
    ap.add_argument("--n-sets", type=int, default=32, help="(a) held-out 4-view sets")
    ap.add_argument("--n-native", type=int, default=16, help="(b) held-out rendered sets")
    ap.add_argument("--n-prompt", type=int, default=64, help="(c) generations")
    ap.add_argument("--timesteps", type=float, nargs="+", default=[0.2, 0.5, 0.8])
    ap.add_argument("--sift-upsample", type=int, default=1, help="(a) run SIFT on views enlarged by this factor")
    ap.add_argument("--far-tokens", type=float, default=2.0)
    ap.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    ap.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE)
    ap.add_argument("--seed-start", type=int, default=HELD_OUT_SEED_START)
    ap.add_argument("--contact-sheet", help="write the rendered | generated contact sheet PNG here")
    ap.add_argument("--out", help="folder for the tidy CSV tables and summary.json")
    ap.add_argument("--conditioned-sheet", help="(e) write the reference | generated | truth contact sheet PNG here")
    ap.add_argument("--cond-guidance", type=float, default=1.0, help="(e) guidance scale of image-conditioned sampling")
    ap.add_argument("--reference-guidance", type=float, default=1.0,
                    help="(e) image guidance of image-conditioned sampling (1 = off; see CorrlabPipeline.__call__)")
    ap.add_argument("--layout", default="train", choices=LAYOUTS,
                    help="camera layout of the held-out scenes (the model trains on 'train')")
    ap.add_argument("--skip", nargs="*", default=[], choices=["a", "b", "c", "e"], help="parts to skip")
    ap.add_argument("--grid", help="(e) the token grid of the native layers to choose from, e.g. 16x16 "
                                   "(default: the finest)")
    args = ap.parse_args(argv)
    if args.seed_start < HELD_OUT_SEED_START:
        ap.error(f"--seed-start: expected a held-out seed >= {HELD_OUT_SEED_START}, got {args.seed_start}")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    pipe = load_default(args.model)
    summary: dict = {"layout": args.layout, "steps": args.steps, "guidance": args.guidance, "cond_guidance": args.cond_guidance,
                     "reference_guidance": args.reference_guidance, "sift_upsample": args.sift_upsample}
    out = Path(args.out) if args.out else None
    if out:
        out.mkdir(parents=True, exist_ok=True)
    pd.set_option("display.width", 200, "display.max_rows", 200)

    if "a" not in args.skip:
        df, generated, rendered, seconds = consistency(pipe, args.n_sets, args.steps, args.guidance, args.seed_start, args.sift_upsample,
                                                       args.layout)
        pooled = pool_consistency(df)
        print("\n(a) SIFT multi-view consistency (symmetric epipolar distance, pooled over view pairs)")
        print(pooled.to_string(index=False))
        print("(a) the same at 2 px by the pair's true view angle (degrees)")
        print(precision_by_view_angle(df).to_string())
        for _, r in pooled.iterrows():
            key = SIFT_KEYS[r["method"]]
            summary[f"sift_{key}_prec@{r['threshold']:g}px"] = round(float(r["precision"]), 4)
            summary[f"sift_{key}_correct_per_pair@{r['threshold']:g}px"] = round(float(r["correct_per_pair"]), 3)
        summary["seconds_per_4view_set"] = round(float(np.median(seconds)), 2)
        print(f"\n(d) sampling: median {np.median(seconds):.2f} s per 4-view {pipe.sample_size}px set, "
              f"{args.steps} steps, guidance {args.guidance} (min {min(seconds):.2f}, max {max(seconds):.2f})")
        if out:
            df.to_csv(out / "consistency.csv", index=False)
        if args.contact_sheet:
            save_png(text_sheet(rendered, generated), args.contact_sheet)

    if "b" not in args.skip and not isinstance(pipe.model, MultiViewDiT):
        print("\n(b) skipped: text-only native correspondences are measured for MultiViewDiT; see (e)")
    elif "b" not in args.skip:
        cfg = dict(pipe.model.config)
        torch.manual_seed(0)
        untrained = MultiViewDiT(**{k: v for k, v in cfg.items() if not k.startswith("_")}).eval()
        df = native_rows({"model": pipe.model, "untrained": untrained}, args.n_native, args.timesteps,
                         args.far_tokens, args.seed_start, pipe.sample_size, pipe.model.config.patch_size,
                         args.layout)
        pooled = pool_native(df)
        print("\n(b) native correspondence: share of view-0 object tokens whose view-1 argmax is within 1 token")
        wide = pooled.pivot_table(index=["method", "layer"], columns=["subset", "t"], values="share", sort=False)
        print(wide.round(3).to_string())
        chance = pooled[(pooled.method == "chance") & (pooled.t == args.timesteps[0])].set_index("subset")["n"]
        print(f"queries per t: all {int(chance.get('all', 0))}, far {int(chance.get('far', 0))}")
        summary["native_queries_all"] = int(chance.get("all", 0))
        summary["native_queries_far"] = int(chance.get("far", 0))
        for t in args.timesteps:
            sel = pooled[(pooled.t == t) & (pooled.subset == "far")]
            for method in sel.method.unique():
                best = sel[sel.method == method]["share"].max()
                summary[f"native_far_t{t:g}_{method.replace(' ', '_').replace('(', '').replace(')', '')}"] = round(float(best), 4)
            m = sel[sel.method == "model"]
            if len(m):
                summary[f"native_far_t{t:g}_best_layer"] = m.loc[m["share"].idxmax(), "layer"]
        if out:
            df.to_csv(out / "native.csv", index=False)

    if "c" not in args.skip:
        df = adherence(pipe, args.n_prompt, args.steps, args.guidance, args.seed_start)
        rate = df.groupby("source")["match"].mean()
        print("\n(c) prompt adherence (dominant hue == colour word)")
        print(rate.round(3).to_string())
        print(df[df.source == "generated"].groupby("colour")["match"].mean().round(2).to_string())
        summary["adherence_generated"] = round(float(rate.get("generated", float("nan"))), 4)
        summary["adherence_rendered"] = round(float(rate.get("rendered", float("nan"))), 4)
        if out:
            df.to_csv(out / "adherence.csv", index=False)

    if "e" not in args.skip and pipe.supports_reference:
        conditioned_part(pipe, args.n_sets, args.n_native, args.steps, args.cond_guidance, args.seed_start,
                         args.conditioned_sheet, summary, out, args.layout, args.grid, args.reference_guidance)

    if out:
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(" ".join(f"{k}={v}" for k, v in summary.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
