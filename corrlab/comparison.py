"""The headline comparison: native correspondences of generated sets vs baselines on the same images.

``probe_generations`` generates one probed multi-view set per seed (the prompt and the cameras come
from the same held-out seed, as in :func:`corrlab.scenes.sample_scene`) and writes each as a set
directory with its ``record.nc``; :func:`corrlab.probing.comparison_table` then scores native matches,
the trivial controls and the baseline matchers on exactly those images; :func:`comparison_figure`
plots precision and correct matches against the epipolar threshold.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

import pandas as pd
from matplotlib.figure import Figure
from tqdm.auto import tqdm

from .probing import probe
from .scenes import sample_scene
from .sets import save_set

__all__ = ["COMPARISON_MATCHING", "probe_generations", "comparison_figure"]

#: Matching options for comparisons with keypoint matchers: one match per token (head-averaged
#: similarity), so native match counts are comparable with SIFT's; everything else the probe default.
COMPARISON_MATCHING = {"heads": "mean"}


def probe_generations(
    pipe,
    seeds: Iterable[int],
    out_root,
    layers: Sequence[str] | None = None,
    steps: Sequence[int] | None = None,
    num_views: int = 4,
    num_inference_steps: int | None = None,
    guidance_scale: float | None = None,
    progress: bool = True,
    **matching,
) -> list[Path]:
    """Generate and probe one set per seed; returns the set directories (each with ``record.nc``)."""
    from .model import DEFAULT_GUIDANCE, DEFAULT_STEPS

    out_root = Path(out_root)
    matching = {**COMPARISON_MATCHING, **matching}
    dirs = []
    for seed in tqdm(list(seeds), desc="probing generations", disable=not progress):
        prompt = sample_scene(seed).prompt
        with probe(pipe, layers=layers, steps=steps, **matching) as rec:
            mvs = pipe(
                prompt,
                num_views=num_views,
                num_inference_steps=num_inference_steps or DEFAULT_STEPS,
                guidance_scale=DEFAULT_GUIDANCE if guidance_scale is None else guidance_scale,
                seed=seed,
                progress=False,
            )
        rec.set_meta(prompt=mvs.prompt, seed=mvs.seed, cameras=mvs.cameras)
        d = save_set(mvs, out_root / f"seed_{seed}")
        rec.save(d / "record.nc")
        dirs.append(d)
    return dirs


def comparison_figure(table: pd.DataFrame, title: str | None = None) -> Figure:
    """Precision and correct matches per view pair vs epipolar threshold, one line per method.

    ``table`` is the output of :func:`corrlab.probing.comparison_table`; methods without matches
    (unavailable baselines) are left out and named under the plot.
    """
    import seaborn as sns

    data = table[table["n_matches"] > 0].copy()
    missing = sorted(set(table["method"]) - set(data["method"]))
    n_pairs = table.groupby("method")["n_sets"].first()
    data["correct_per_set"] = data["n_correct"] / data["method"].map(n_pairs)
    label = {m: m for m in data["method"].unique()}
    for m, lay, st in data[["method", "layer", "step"]].drop_duplicates("method").itertuples(index=False):
        if isinstance(lay, str):
            label[m] = f"{m} ({lay} @ step {st})"
    data["method"] = data["method"].map(label)
    fig = Figure(figsize=(11, 4), layout="constrained")
    ax_p, ax_n = fig.subplots(1, 2)
    sns.lineplot(data=data, x="threshold", y="precision", hue="method", marker="o", ax=ax_p)
    sns.lineplot(data=data, x="threshold", y="correct_per_set", hue="method", marker="o", ax=ax_n, legend=False)
    ax_p.set(xlabel="symmetric epipolar threshold (px)", ylabel="precision", ylim=(0, 1.02))
    ax_n.set(xlabel="symmetric epipolar threshold (px)", ylabel="correct matches per generated set")
    for ax in (ax_p, ax_n):
        ax.grid(alpha=0.3)
    handles, labels = ax_p.get_legend_handles_labels()
    ax_p.get_legend().remove()
    fig.legend(handles, labels, loc="outside right upper", fontsize=8, frameon=False)
    if missing:
        fig.supxlabel(f"not shown (unavailable or no matches): {', '.join(missing)}", fontsize=8, color="dimgray")
    if title:
        fig.suptitle(title, fontsize=10)
    return fig
