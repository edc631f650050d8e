"""CorrAdapter effect: multi-view consistency of generated sets with vs without it, same seeds and prompts.

For each of --n sets (seed ``--seed + s``, a prompt from the scene vocabulary, the pipeline's default
cameras for that seed) the set is generated plainly and with CorrAdapter (its default parameters), from
the same noise. Consistency of every generation is measured two ways, under the conditioning cameras
(symmetric epipolar distance, pixels):

* SIFT: ``corrlab.baselines.match_sift`` on every pair of views, precision at 1, 2 and 5 px
  (``corrlab.evaluation.score_matches``; pooled per set: correct / matches over its pairs);
* native correspondences: ``corrlab.probe`` on --probe-layer at --probe-steps during the same generation
  (default matching: softmax, per head, global confidence >= 0.05), scored with
  ``corrlab.probing.score_record`` (kept matches, pooled per set over pairs, heads and probed steps).

The change is reported per set as a paired difference (adapter - plain) with its mean, std and a
bootstrap 95 % CI over sets (sets where a metric is undefined in either run, e.g. no SIFT match, are
left out of that metric and counted). A small sweep (--sweep, on the first --sweep-n sets) varies eta,
r, the active steps, the refresh interval and the layers one at a time around the defaults, plus a
"strong" setting (eta 0, every match kept, every step, later half of the layers).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/corr_adapter_effect.py --n 32               # shipped model
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/corr_adapter_effect.py --model runs/mvdit-s/ema/step_0000750 \\
        --n 32 --steps 20 --sweep-n 8 --out results/corr_adapter_effect.csv
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/corr_adapter_effect.py --tiny --n 2 --steps 3 --sweep-n 1  # smoke

Writes the tidy per-set table (one row per set x config x metric x threshold) to --out (CSV, atomic) and
ends with one line of key=value pairs (the default config's mean paired differences).
"""
from __future__ import annotations

import argparse
import itertools
import os
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

import corrlab
from corrlab.baselines import match_sift
from corrlab.interventions import CorrAdapterConfig, CorrAdapterHandle
from corrlab.evaluation import pool_scores, score_matches, score_record
from corrlab.model import DEFAULT_GUIDANCE, DEFAULT_STEPS, CorrlabPipeline, MultiViewDiT, load_default
from corrlab.scenes import VOCABULARY

THRESHOLDS = (1.0, 2.0, 5.0)
HALF = "later-half"  # placeholder resolved to the later half of the model's multi-image layers


def tiny_pipeline(seed: int = 0) -> CorrlabPipeline:
    """A small random-init model for smoke runs (the zero-initialised adaLN gates and output layers are
    randomised too, so attention, and CorrAdapter, change the output)."""
    g = torch.Generator().manual_seed(seed)
    model = MultiViewDiT(sample_size=32, patch_size=4, hidden_size=64, num_layers=4, num_heads=2, prompt_dim=16)
    with torch.no_grad():
        for p in model.parameters():
            if float(p.abs().max()) == 0.0:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return CorrlabPipeline(model.eval())


def prompts(n: int, seed: int) -> list[str]:
    """``n`` prompts "colour pattern shape" drawn without repeats (while they last) from the vocabulary."""
    combos = list(itertools.product(VOCABULARY["colour"], VOCABULARY["pattern"], VOCABULARY["shape"]))
    order = np.random.default_rng(seed).permutation(len(combos))
    return [" ".join(combos[order[s % len(combos)]]) for s in range(n)]


def sift_precision(images: torch.Tensor, cameras) -> pd.DataFrame:
    """Pooled SIFT precision of one set: one row per threshold (precision, n_correct, n_matches)."""
    V = images.shape[0]
    pairs = {(i, j): match_sift(images[i], images[j]) for i in range(V) for j in range(i + 1, V)}
    return pool_scores(score_matches(pairs, cameras, thresholds=THRESHOLDS, method="sift"), ("threshold",))


def native_precision(rec, cameras) -> pd.DataFrame:
    """Pooled epipolar precision of a probe record's kept native matches: one row per threshold."""
    return pool_scores(score_record(rec, cameras=cameras, thresholds=THRESHOLDS), ("threshold",))


def run_one(pipe, prompt, seed, args, probe_steps, adapter: CorrAdapterHandle | None) -> tuple[list[dict], torch.Tensor]:
    """Generate one set (plain or adapted) while probing; its SIFT and native scores as rows, and its images."""
    common = dict(num_views=args.views, num_inference_steps=args.steps, guidance_scale=args.guidance, seed=seed,
                  progress=False)
    if adapter is not None:
        adapter.enable()
    try:
        with corrlab.probe(pipe, layers=[args.probe_layer], steps=probe_steps) as rec:
            mvs = pipe(prompt, **common)
        stats = adapter.stats if adapter is not None else {"kept": 0, "total": 0}
    finally:
        if adapter is not None:
            adapter.disable()
    rows = []
    for metric, table in (("sift", sift_precision(mvs.images, mvs.cameras)), ("native", native_precision(rec, mvs.cameras))):
        for r in table.itertuples():
            rows.append({"metric": metric, "threshold": r.threshold, "n_correct": int(r.n_correct),
                         "n_matches": int(r.n_matches),
                         "precision": r.n_correct / r.n_matches if r.n_matches else np.nan})
    kept = stats["kept"] / stats["total"] if stats["total"] else np.nan
    for r in rows:
        r["kept_fraction"] = kept
    return rows, mvs.images


def paired(df: pd.DataFrame, config: str, n_boot: int = 2000, seed: int = 0) -> pd.DataFrame:
    """Paired differences (config - plain) of precision per set: mean, std, bootstrap 95 % CI, n sets."""
    key = ["set", "metric", "threshold"]
    base = df[df.config == "plain"].set_index(key)["precision"]
    other = df[df.config == config].set_index(key)["precision"]
    diff = (other - base.reindex(other.index)).dropna()
    rng = np.random.default_rng(seed)
    out = []
    for (metric, th), d in diff.groupby(level=["metric", "threshold"]):
        x = d.to_numpy()
        boots = rng.choice(x, size=(n_boot, len(x)), replace=True).mean(axis=1) if len(x) else np.array([np.nan])
        p_plain = base.xs((metric, th), level=["metric", "threshold"]).reindex(d.index.get_level_values("set")).mean()
        out.append({"config": config, "metric": metric, "threshold": th, "n_sets": len(x),
                    "plain_mean": p_plain, "diff_mean": x.mean() if len(x) else np.nan,
                    "diff_std": x.std(ddof=1) if len(x) > 1 else np.nan,
                    "ci_low": np.quantile(boots, 0.025), "ci_high": np.quantile(boots, 0.975),
                    "better_sets": int((x > 0).sum()), "worse_sets": int((x < 0).sum())})
    return pd.DataFrame(out)


def sweep_configs(args) -> dict[str, dict]:
    """The default config and one-at-a-time variations of eta, r and active steps."""
    d = CorrAdapterConfig()
    configs = {"default": {}}
    if args.sweep:
        for eta in (0.5, 0.8):
            configs[f"eta={eta}"] = {"eta": eta}
        for r in (1, 5):
            configs[f"r={r}"] = {"window_radius": r}
        configs["active=all"] = {"active_steps": None}
        default_active = d.schedule()[0]  # "auto" resolved by the paper's rule (text-to-multi-view: 10)
        configs[f"active={max(1, (default_active or args.steps) // 2)}"] = {
            "active_steps": max(1, (default_active or args.steps) // 2)}
        configs["refresh=1"] = {"refresh_every": 1}
        configs["layers=half"] = {"layers": HALF}
        # the strongest setting: every match kept, aggregate replaces attention, every step, later half
        configs["strong"] = {"eta": 0.0, "threshold": 0.0, "active_steps": None, "layers": HALF}
    if args.sweep_configs:
        unknown = sorted(set(args.sweep_configs) - set(configs))
        if unknown:
            raise SystemExit(f"--sweep-configs: unknown {unknown}; expected some of {sorted(configs)}")
        configs = {c: p for c, p in configs.items() if c == "default" or c in args.sweep_configs}
    return configs


def write_csv(df: pd.DataFrame, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        df.to_csv(tmp, index=False)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="model folder or name under data/ (default: the shipped model)")
    ap.add_argument("--tiny", action="store_true", help="use a small random-init model (smoke test)")
    ap.add_argument("--n", type=int, default=32, help="sets (seeds x prompts) for the default config")
    ap.add_argument("--sweep-n", type=int, default=8, help="sets for each sweep config (the first ones)")
    ap.add_argument("--no-sweep", dest="sweep", action="store_false")
    ap.add_argument("--sweep-configs", nargs="+", help="run only these sweep configs (names as printed)")
    ap.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    ap.add_argument("--views", type=int, default=4)
    ap.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE)
    ap.add_argument("--seed", type=int, default=1000, help="first seed (sets use seed, seed + 1, ...)")
    ap.add_argument("--probe-layer", help="layer probed for native precision (default: the last adapted layer)")
    ap.add_argument("--probe-steps", type=int, nargs="+",
                    help="steps probed (default: the middle and the last step)")
    ap.add_argument("--out", default="results/corr_adapter_effect.csv")
    args = ap.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    pipe = tiny_pipeline() if args.tiny else load_default(args.model)
    handle = CorrAdapterHandle(pipe)
    args.probe_layer = args.probe_layer or handle.layers[-1]
    probe_steps = args.probe_steps or sorted({args.steps // 2, args.steps - 1})
    configs = sweep_configs(args)
    prompt_list = prompts(args.n, args.seed)
    jobs = [(s, "plain") for s in range(args.n)] + [(s, "default") for s in range(args.n)]
    jobs += [(s, c) for c in configs if c != "default" for s in range(min(args.sweep_n, args.n))]
    rows = []
    plain_images: dict[int, torch.Tensor] = {}
    for s, config in tqdm(jobs, desc="generations"):
        adapter = None
        if config != "plain":
            params = dict(configs[config])
            if params.get("layers") == HALF:
                names = [info.name for info in corrlab.probing.list_layers(pipe)]
                params["layers"] = names[len(names) // 2:]
            adapter = CorrAdapterHandle(pipe, **params)
        result, images = run_one(pipe, prompt_list[s], args.seed + s, args, probe_steps, adapter)
        if config == "plain":
            plain_images[s] = images
        change = float((images - plain_images[s]).abs().mean())  # mean |adapted - plain| pixel change
        for r in result:
            rows.append({"set": s, "seed": args.seed + s, "prompt": prompt_list[s], "config": config,
                         "pixel_change": change, **r})
    df = pd.DataFrame(rows)
    write_csv(df, Path(args.out))
    summary = pd.concat([paired(df, c) for c in configs], ignore_index=True)
    write_csv(summary, Path(args.out).with_name(Path(args.out).stem + "_summary.csv"))
    cfg = CorrAdapterConfig()
    print(f"model: {'tiny random-init' if args.tiny else (args.model or 'shipped')}, {args.views} views, "
          f"{args.steps} steps, guidance {args.guidance}; {args.n} sets (sweep: {min(args.sweep_n, args.n)} sets)")
    print(f"adapter default: layers {handle.layers}, eta {cfg.eta}, r {cfg.radius}, active_steps {cfg.active_steps}, "
          f"refresh_every {cfg.refresh_every}; native probed at {args.probe_layer}, steps {probe_steps}")
    by_config = df[df.config != "plain"].groupby("config")
    print("kept fraction of match slots per config:",
          ", ".join(f"{c} {v:.3f}" for c, v in by_config["kept_fraction"].mean().items()))
    print("mean |adapted - plain| pixel change per config:",
          ", ".join(f"{c} {v:.4f}" for c, v in by_config["pixel_change"].mean().items()))
    with pd.option_context("display.width", 200, "display.max_columns", 20, "display.precision", 4):
        print(summary.to_string(index=False))
    d = summary[summary.config == "default"].set_index(["metric", "threshold"])
    key = {"n_sets": args.n, "steps": args.steps,
           "pixel_change": round(float(df[df.config == "default"]["pixel_change"].mean()), 5)}
    for (metric, th) in [("sift", 1.0), ("sift", 2.0), ("native", 2.0), ("native", 5.0)]:
        if (metric, th) in d.index:
            r = d.loc[(metric, th)]
            tag = f"{metric}_{int(th)}px"
            key.update({f"{tag}_plain": round(float(r.plain_mean), 4), f"{tag}_diff": round(float(r.diff_mean), 4),
                        f"{tag}_ci": f"[{r.ci_low:.4f},{r.ci_high:.4f}]", f"{tag}_sets": int(r.n_sets)})
    print(" ".join(f"{k}={v}" for k, v in key.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
