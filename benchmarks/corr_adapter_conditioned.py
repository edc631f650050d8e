"""CorrAdapter and CorrAdapter* on the embedded model v2 in the paper's image-conditioned setting (issue 12, 5-6).

Held-out rendered scenes, view 0 given (the rendered reference), views 1..3 generated under their TRUE
cameras, the same noise seed for every config of a scene. CorrAdapter acts at EVERY step (the paper's rule
for image-conditioned generation: ``image_conditioned=True``). Per scene and config:

* ``psnr``, ``ssim``: of the generated views against the rendered truth of the same scene (mean over views);
* ``sift@1px``, ``sift@2px``: SIFT epipolar precision (symmetric distance) of all view pairs of the set
  (reference + generated) under the true cameras, pooled per scene (correct / matches);
* ``corr_psnr``: PSNR between the set's views at the TRUE pixel correspondences (from the scene's depth):
  multi-view consistency measured exactly (``corrlab.model.consistency.correspondence_psnr``);
* ``kept``: CorrAdapter's kept fraction of match slots (how many matches it actually aligns).

Configs: ``base``; ``base+CA``; with ``--lora`` also ``LoRA`` and ``LoRA+CA``. The CorrAdapter setting is
chosen on SEPARATE selection scenes (``--select-n``, seeds from ``HELD_OUT + 60000``) among ``CANDIDATES``
by the largest mean paired PSNR change vs base (chosen before any evaluation scene is generated); the
evaluation scenes are seeds from ``HELD_OUT + 70000``. Every effect is a paired difference (config - base,
same scene and seed) with a 95 % bootstrap CI over scenes.

Part ``text`` (needs ``--lora``): LoRA transfer to text-only generation: 4-view sets from the prompts and
cameras of held-out scenes (seeds from ``HELD_OUT + 80000``), guidance 3, base vs LoRA: SIFT precision at
2 px under the true cameras and under another scene's cameras.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/corr_adapter_conditioned.py --n 32 --select-n 8 \\
        --lora data/corrlab-mvunet-s-corrstar --text-n 32 --out results/corr_adapter_conditioned
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/corr_adapter_conditioned.py --tiny --n 2 --select-n 1 --steps 2  # smoke

Writes tidy CSVs (``scenes.csv`` per scene x config, ``effects.csv``, ``selection.csv``, ``text.csv``) under
--out (atomically) and ends with one line of key=value pairs. Use OMP_NUM_THREADS=1 on a shared CPU (2
threads were 8x slower there than 1 while other jobs ran).
"""
from __future__ import annotations

import argparse
import io
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from corrlab.baselines import match_sift
from corrlab.interventions import CorrAdapterHandle
from corrlab.io_utils import atomic_write_bytes
from corrlab.evaluation import bootstrap_mean_ci, pool_scores, score_matches
from corrlab.model import CorrlabPipeline, MultiViewUNet, load_default
from corrlab.model.conditioned import psnr, ssim
from corrlab.model.consistency import correspondence_psnr
from corrlab.model.lora import load_lora
from corrlab.model.train import HELD_OUT_SEED_START
from corrlab.scenes import render_scene

SELECT_START = HELD_OUT_SEED_START + 60_000
EVAL_START = HELD_OUT_SEED_START + 70_000
TEXT_START = HELD_OUT_SEED_START + 80_000
NATIVE_START = HELD_OUT_SEED_START + 90_000

#: CorrAdapter settings tried on the selection scenes (image-conditioned: every step). "finest" = the
#: finest-grid layers (corrlab's default for this model: blocks.0 and blocks.4, 16 x 16), "decoder" =
#: blocks.4 only (the releases adapt only the finest decoder level), "all" = every multi-view layer (the 8 x 8
#: ones too). eta is the weight of the ORIGINAL output (0 = the aggregated output alone); r the window radius in
#: tokens (default 3: a 7 x 7 window, almost half of a 16 x 16 grid; r 1: 3 x 3).
CANDIDATES = {
    "finest eta0.1": dict(eta=0.1),
    "decoder eta0.1": dict(eta=0.1, layers=["blocks.4.attn"]),
    "finest eta0.1 keep-all": dict(eta=0.1, threshold=0.0),
    "decoder eta0.1 r1": dict(eta=0.1, layers=["blocks.4.attn"], window_radius=1),
    "decoder eta0 r1": dict(eta=0.0, layers=["blocks.4.attn"], window_radius=1),
    "decoder eta0.5": dict(eta=0.5, layers=["blocks.4.attn"]),
    "finest eta0.1 r1": dict(eta=0.1, window_radius=1),
    "all eta0.1": dict(eta=0.1, layers="all"),
}


def adapter_params(pipe: CorrlabPipeline, params: dict) -> dict:
    """A :data:`CANDIDATES` setting as ``CorrAdapterHandle`` keywords: ``layers="all"`` becomes every multi-view
    attention layer of the pipeline's model."""
    if params.get("layers") == "all":
        return {**params, "layers": list(pipe.model.attention_grids())}
    return dict(params)


def tiny_pipeline() -> CorrlabPipeline:
    """A small random-init UNet for smoke runs (zero-initialised layers randomised, so attention matters)."""
    torch.manual_seed(0)
    model = MultiViewUNet(sample_size=32, channels=[16, 32], attention_levels=[0, 1], stem=2, num_heads=2,
                          prompt_dim=8, ray_freqs=2)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    return CorrlabPipeline(model.eval())


def sift_scores(images: torch.Tensor, cameras) -> dict:
    """SIFT on every view pair, pooled: ``{"sift@1px": precision, "sift@2px": ..., "sift_matches": n}``."""
    V = images.shape[0]
    pairs = {(i, j): match_sift(images[i], images[j]) for i in range(V) for j in range(i + 1, V)}
    df = score_matches(pairs, cameras, thresholds=(1.0, 2.0), kind="symmetric", method="sift")
    g = pool_scores(df, by=("threshold",)).set_index("threshold")
    out = {"sift_matches": int(g["n_matches"].iloc[0]) if len(g) else 0}
    for th in (1.0, 2.0):  # pooled precision, NaN without matches
        out[f"sift@{th:g}px"] = float(g.loc[th, "precision"]) if th in g.index else np.nan
    return out


def scene_metrics(truth, gen, given=(0,)) -> dict:
    targets = [v for v in range(truth.images.shape[0]) if v not in given]
    cp, n = correspondence_psnr(gen.images, truth)
    return {"psnr": float(np.mean([psnr(gen.images[v], truth.images[v]) for v in targets])),
            "ssim": float(np.mean([ssim(gen.images[v], truth.images[v]) for v in targets])),
            "corr_psnr": cp, "corr_pixels": n, **sift_scores(gen.images, truth.cameras)}


def run_config(pipe, seeds, adapter: dict | None, lora: str | None, steps: int, guidance: float, views: int,
               desc: str) -> list[dict]:
    """Generate every scene of ``seeds`` under one config; one row of metrics per scene."""
    rows = []
    handle = load_lora(pipe, lora) if lora else None
    try:
        ca = CorrAdapterHandle(pipe, image_conditioned=True, **adapter_params(pipe, adapter)) if adapter is not None else None
        for seed in tqdm(seeds, desc=desc, leave=False):
            truth = render_scene(int(seed), views, pipe.sample_size, "train")
            t0 = time.perf_counter()
            if ca is not None:
                ca.enable()
            try:
                gen = pipe(truth.prompt, cameras=truth.cameras, reference={0: truth.images[0]},
                           num_inference_steps=steps, guidance_scale=guidance, seed=int(seed), progress=False)
                stats = ca.stats if ca is not None else None
            finally:
                if ca is not None:
                    ca.disable()
            row = {"scene": int(seed), "seconds": time.perf_counter() - t0, **scene_metrics(truth, gen)}
            row["kept"] = stats["kept"] / stats["total"] if stats and stats["total"] else np.nan
            rows.append(row)
    finally:
        if handle is not None:
            handle.unload()
    return rows


def truth_rows(seeds, views: int, size: int) -> list[dict]:
    """The rendered truth scored like a generation (the ceiling of every consistency metric)."""
    rows = []
    for seed in seeds:
        truth = render_scene(int(seed), views, size, "train")
        rows.append({"scene": int(seed), **scene_metrics(truth, truth), "kept": np.nan, "seconds": 0.0})
    return rows


METRICS = ("psnr", "ssim", "sift@1px", "sift@2px", "corr_psnr")


def effects(df: pd.DataFrame, reference: str = "base") -> pd.DataFrame:
    """Tidy paired effects: one row per (config, metric): n, reference mean, config mean, diff mean, CI."""
    wide = df.pivot_table(index="scene", columns="config", values=list(METRICS), dropna=False)
    out = []
    for config in [c for c in df.config.unique() if c not in (reference, "truth")]:
        for m in METRICS:
            d = (wide[(m, config)] - wide[(m, reference)]).to_numpy()
            mean, lo, hi, _ = bootstrap_mean_ci(d)
            ok = np.isfinite(d)
            out.append({"config": config, "vs": reference, "metric": m, "n_scenes": int(ok.sum()),
                        "reference_mean": float(wide[(m, reference)][ok].mean()),
                        "config_mean": float(wide[(m, config)][ok].mean()), "diff": mean, "ci_low": lo, "ci_high": hi,
                        "better": int((d[ok] > 0).sum()), "worse": int((d[ok] < 0).sum())})
    return pd.DataFrame(out)


def text_transfer(pipe, lora: str, n: int, steps: int, guidance: float, views: int, shard=(0, 1),
                  configs=("base", "LoRA")) -> pd.DataFrame:
    """Text-only sets (prompt + cameras of held-out scenes), base vs LoRA: SIFT under true / another scene's cameras."""
    seeds = [TEXT_START + i for i in range(n)]
    truths = [render_scene(s, views, pipe.sample_size, "train") for s in seeds]
    rows = []
    for config in configs:
        handle = load_lora(pipe, lora) if config == "LoRA" else None
        try:
            for i in tqdm(range(shard[0], n, shard[1]), desc=f"text-only {config}", leave=False):
                truth = truths[i]
                gen = pipe(truth.prompt, cameras=truth.cameras, num_inference_steps=steps, guidance_scale=guidance,
                           seed=seeds[i], progress=False)
                other = truths[(i + 1) % len(truths)].cameras
                for cams, name in ((truth.cameras, "true cameras"), (other, "another scene's cameras")):
                    s = sift_scores(gen.images, cams)
                    rows.append({"scene": seeds[i], "config": config, "cameras": name, **s})
        finally:
            if handle is not None:
                handle.unload()
    return pd.DataFrame(rows)


def report(out: Path, args) -> dict:
    """Read every ``scenes*.csv`` / ``text*.csv`` under ``out`` (shards merged), write ``effects.csv``, print the
    tables; returns the key=value figures."""
    key: dict = {}
    files = sorted(out.glob("scenes*.csv"))
    if files:
        df = pd.concat([pd.read_csv(f) for f in files], ignore_index=True).drop_duplicates(["config", "scene"])
        if df.config.eq("base").any() and len(df.config.unique()) > 1:
            eff = effects(df)
            write_csv(eff, out / "effects.csv")
            key["n_scenes"] = int(df[df.config == "base"].scene.nunique())
            labels = df.adapter.dropna() if "adapter" in df else []
            key["adapter"] = str(labels.iloc[0]).replace(" ", "_") if len(labels) else "-"
            print(f"\nimage-conditioned, {key['n_scenes']} held-out scenes (seeds from {EVAL_START}), view 0 given: "
                  f"means per config (adapter: {key['adapter']})")
            print(df.groupby("config", sort=False)[list(METRICS) + ["kept", "seconds"]].mean().round(4).to_string())
            print("\npaired effects (config - base), 95 % bootstrap CI over scenes")
            print(eff.round(4).to_string(index=False))
            for r in eff.itertuples():
                if r.config == "truth":
                    continue
                key[f"{r.config.replace('+', '_')}_{r.metric.replace('@', '')}"] = f"{r.diff:+.4f}[{r.ci_low:+.4f},{r.ci_high:+.4f}]"
            for c, v in df[df.config.str.endswith("CA")].groupby("config")["kept"].mean().items():
                key[f"{c.replace('+', '_')}_kept"] = round(float(v), 4)
    files = sorted(out.glob("text*.csv"))
    if files:
        tx = pd.concat([pd.read_csv(f) for f in files], ignore_index=True).drop_duplicates(["config", "scene", "cameras"])
        pooled = tx.groupby(["config", "cameras"], sort=False)[["sift@1px", "sift@2px"]].mean()
        n = tx.scene.nunique()
        print(f"\ntext-only LoRA transfer: {n} sets (seeds from {TEXT_START}), guidance {args.text_guidance}")
        print(pooled.round(4).to_string())
        wide = tx.pivot_table(index="scene", columns=["config", "cameras"], values="sift@2px")
        if ("LoRA", "true cameras") in wide and ("base", "true cameras") in wide:
            d = (wide[("LoRA", "true cameras")] - wide[("base", "true cameras")]).to_numpy()
            gap = ((wide[("LoRA", "true cameras")] - wide[("LoRA", "another scene's cameras")])
                   - (wide[("base", "true cameras")] - wide[("base", "another scene's cameras")])).to_numpy()
            key["text_sets"] = int(n)
            for name, x in (("text_LoRA_sift2px", d), ("text_LoRA_gap_sift2px", gap)):
                m, lo, hi, _ = bootstrap_mean_ci(x)
                key[name] = f"{m:+.4f}[{lo:+.4f},{hi:+.4f}]"
                print(f"  {name}: {m:+.4f}  95% CI [{lo:+.4f}, {hi:+.4f}]")
        for (c, cams), r in pooled.iterrows():
            key[f"text_{c}_{'true' if cams == 'true cameras' else 'other'}_sift2px"] = round(float(r["sift@2px"]), 4)
    return key


def write_csv(df: pd.DataFrame, path: Path) -> None:
    buf = io.StringIO()
    df.to_csv(buf, index=False)
    atomic_write_bytes(path, buf.getvalue().encode())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="corrlab-mvunet-s", help="base model folder or name under data/")
    ap.add_argument("--tiny", action="store_true", help="a small random-init UNet (smoke test)")
    ap.add_argument("--lora", help="CorrAdapter* LoRA folder (adds the LoRA and LoRA+CA configs and the text part)")
    ap.add_argument("--n", type=int, default=32, help="evaluation scenes")
    ap.add_argument("--select-n", type=int, default=8, help="selection scenes for the CorrAdapter setting")
    ap.add_argument("--adapter", choices=sorted(CANDIDATES), help="skip the selection: use this setting")
    ap.add_argument("--text-n", type=int, default=32, help="text-only transfer sets (0 = skip)")
    ap.add_argument("--native-n", type=int, default=16, help="native part: held-out 2-view scenes")
    ap.add_argument("--parts", nargs="+", default=["select", "conditioned", "text", "native"],
                    choices=["select", "conditioned", "text", "native"],
                    help="select: choose the CorrAdapter setting on the selection scenes (skipped with --adapter); "
                    "conditioned: the evaluation scenes; text: the text-only LoRA transfer; native: native far-moving "
                    "hits (generated view 1 -> reference view 0, t = 0.5, corrlab.model.conditioned.native_hits) of "
                    "base vs the LoRA(s): what the consistency losses do to the attention itself")
    ap.add_argument("--lora-candidates", nargs="+", metavar="NAME=PATH",
                    help="select part: also score these LoRAs (no CorrAdapter) on the selection scenes, vs base")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=1.0, help="image-conditioned guidance (1, as model_quality (e))")
    ap.add_argument("--text-guidance", type=float, default=3.0)
    ap.add_argument("--views", type=int, default=4)
    ap.add_argument("--out", default="results/corr_adapter_conditioned")
    ap.add_argument("--shard", default="0/1", metavar="K/N", help="run only scenes K, K+N, ... (parallel shards; "
                    "each writes its own CSV, and every run prints the report of all CSVs under --out)")
    ap.add_argument("--configs", nargs="+", choices=["truth", "base", "base+CA", "LoRA", "LoRA+CA"],
                    help="conditioned part: only these configs (default all)")
    ap.add_argument("--text-configs", nargs="+", choices=["base", "LoRA"], default=["base", "LoRA"])
    ap.add_argument("--seed-start", type=int, default=EVAL_START,
                    help=f"conditioned part: first scene seed (default {EVAL_START}, the evaluation scenes; "
                    f"{SELECT_START}: the selection scenes, to run a selection in parallel shards)")
    ap.add_argument("--report", action="store_true", help="only merge the CSVs under --out and print the report")
    args = ap.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    out = Path(args.out)
    key: dict = {"steps": args.steps}
    pd.set_option("display.width", 200, "display.max_columns", 20)

    if args.report:
        key = report(out, args)
        print(" ".join(f"{k}={v}" for k, v in key.items()))
        return 0
    pipe = tiny_pipeline() if args.tiny else load_default(args.model)
    common = dict(steps=args.steps, guidance=args.guidance, views=args.views)
    chosen = args.adapter
    if "conditioned" in args.parts and not chosen and "select" not in args.parts:
        ap.error("--parts conditioned: needs --adapter NAME or the select part")
    if "select" in args.parts and (not chosen or args.lora_candidates):
        # choose on separate scenes, before the evaluation scenes are generated
        sel_seeds = [SELECT_START + i for i in range(args.select_n)]
        rows = [{"config": "base", **r} for r in run_config(pipe, sel_seeds, None, None, desc="select: base", **common)]
        candidates = {} if chosen else dict(CANDIDATES)
        for name, params in candidates.items():
            rows += [{"config": name, **r} for r in run_config(pipe, sel_seeds, params, None, desc=f"select: {name}", **common)]
        for spec in args.lora_candidates or []:
            name, _, path = spec.partition("=")
            rows += [{"config": f"LoRA:{name}", **r} for r in run_config(pipe, sel_seeds, None, path, desc=f"select: {name}", **common)]
        sel = pd.DataFrame(rows)
        sel_eff = effects(sel)
        write_csv(sel, out / "selection.csv")
        write_csv(sel_eff, out / "selection_effects.csv")
        print(f"selection ({args.select_n} scenes, seeds from {SELECT_START}): paired change vs base")
        print(sel_eff.pivot_table(index="config", columns="metric", values="diff").round(4).to_string())
        print(sel.groupby("config", sort=False)[["kept", "seconds"]].mean().round(4).to_string())
        ps = sel_eff[(sel_eff.metric == "psnr") & sel_eff.config.isin(list(candidates))].set_index("config")["diff"]
        if len(ps):
            chosen = str(ps.idxmax())
            key["selected"] = chosen.replace(" ", "_")
            print(f"selected CorrAdapter setting (largest mean paired PSNR change): {chosen}")
    suffix = "" if (args.shard == "0/1" and not args.configs) else \
        f"_{args.shard.replace('/', 'of')}" + (f"_{'-'.join(c.replace('+', '') for c in args.configs)}" if args.configs else "")
    k, n_shards = (int(x) for x in args.shard.split("/"))
    if "conditioned" in args.parts:
        params = CANDIDATES[chosen]
        print(f"CorrAdapter setting: {chosen} {params} (every step)")
        seeds = [args.seed_start + i for i in range(args.n)][k::n_shards]
        configs = [("truth", None, None), ("base", None, None), ("base+CA", params, None)]
        if args.lora:
            configs += [("LoRA", None, args.lora), ("LoRA+CA", params, args.lora)]
        rows = []
        for name, adapter, lora in configs:
            if args.configs and name not in args.configs:
                continue
            if name == "truth":
                rows += [{"config": "truth", **r} for r in truth_rows(seeds, args.views, pipe.sample_size)]
            else:
                rows += [{"config": name, **r} for r in run_config(pipe, seeds, adapter, lora, desc=name, **common)]
        df = pd.DataFrame(rows)
        df["adapter"] = chosen if df.config.str.endswith("CA").any() else None
        write_csv(df, out / f"scenes{suffix}.csv")
    if "text" in args.parts and args.lora and args.text_n > 0:
        tx = text_transfer(pipe, args.lora, args.text_n, args.steps, args.text_guidance, args.views, shard=(k, n_shards),
                           configs=args.text_configs)
        write_csv(tx, out / f"text{suffix}{'_' + '-'.join(args.text_configs) if len(args.text_configs) < 2 else ''}.csv")
    if "native" in args.parts and (args.lora or args.lora_candidates) and args.native_n > 0:
        from corrlab.model.conditioned import native_hits, pool_hits

        loras = [("base", None)] + ([("LoRA", args.lora)] if args.lora else []) + \
            [tuple(c.split("=", 1)) for c in (args.lora_candidates or [])]
        frames = []
        for name, path in loras:
            handle = load_lora(pipe, path) if path else None
            try:
                df = native_hits(pipe.model, n_sets=args.native_n, t=0.5, seed_start=NATIVE_START, progress=True)
            finally:
                if handle is not None:
                    handle.unload()
            df["config"] = name
            frames.append(df)
        nat = pd.concat(frames, ignore_index=True)
        write_csv(nat, out / "native.csv")
        pooled = pd.concat([pool_hits(d).assign(config=d.config.iloc[0]) for d in frames], ignore_index=True)
        far = pooled[(pooled.subset == "far") & pooled.grid.eq("16x16")]
        table = far[far.method == "native"].pivot_table(index="config", columns="layer", values="share", sort=False)
        print(f"\nnative far-moving hits within 1 token, t = 0.5, {args.native_n} scenes (seeds from {NATIVE_START}), 16x16 layers")
        print(table.round(3).to_string())
        ctrl = far[(far.config == "base") & far.method.isin(["camera geometry only", "chance", "appearance NN (noisy input)"])]
        print(ctrl.pivot_table(index="method", columns="layer", values="share").round(3).to_string())
        for cfg, r in table.iterrows():
            for layer, v in r.items():
                key[f"native_far_{cfg}_{layer.split('.')[1]}"] = round(float(v), 4)
    key.update(report(out, args))
    print(" ".join(f"{k}={v}" for k, v in key.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
