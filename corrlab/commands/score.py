"""``corrlab score``: epipolar precision of a probed set's native matches, controls and baselines."""
from __future__ import annotations

import argparse

ROW_KEYS = ("method", "layer", "step", "threshold", "precision", "n_correct", "n_matches", "note")
#: rows of a probed video (``corrlab probe --model WAN_PIPELINE``): per frame pair, scored against optical flow
FLOW_ROW_KEYS = ("method", "layer", "step", "src", "tgt", "threshold", "precision", "n_correct", "n_matches",
                 "n_flow_valid", "kind")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "score",
        help="score a probed set (from `corrlab probe`): native matches vs controls and baselines",
        description="Epipolar precision and correct-match counts, pooled over the ordered view pairs of the "
        "set, for every probed (layer, step), the trivial matchers (chance, identity, appearance) and the "
        "baselines, under the set's cameras. Prints a table, or with --json a list of rows "
        '{"method", "layer", "step", "threshold", "precision", "n_correct", "n_matches", "note"} '
        "(layer and step null except for method \"native\").",
    )
    p.add_argument("dir", help="a set directory written by `corrlab probe` (holds record.nc); for a video probed "
                   "through a diffusers pipeline (pipeline.json) the rows are frame-to-frame, scored against "
                   "optical flow (keys method, layer, step, src, tgt, threshold, precision, n_correct, n_matches, "
                   "n_flow_valid, kind)")
    p.add_argument("--record", help="record file (default: DIR/record.nc)")
    p.add_argument("--thresholds", nargs="+", type=float, default=None, metavar="PX",
                   help="pixel thresholds (default: corrlab.evaluation.DEFAULT_THRESHOLDS, 1 2 5 10)")
    p.add_argument("--kind", default="symmetric",
                   help="epipolar distance: one of corrlab.evaluation.DISTANCE_KINDS, symmetric (default), line "
                   "or sampson (checked when scoring, so the CLI starts without importing torch)")
    p.add_argument("--all-matches", action="store_true", help="score every native match, not only kept ones")
    p.add_argument("--controls", nargs="*", default=["chance", "identity", "appearance"], metavar="NAME",
                   help="trivial matchers (default chance identity appearance; none with an empty list)")
    p.add_argument("--baselines", nargs="*", default=["sift", "superpoint", "disk+lightglue"], metavar="NAME",
                   help="baseline matchers (default sift superpoint disk+lightglue; none with an empty list)")
    p.add_argument("--json", action="store_true", help="print a JSON list of rows")
    p.add_argument("--top", type=int, default=10,
                   help="table only: show the N best native (layer, step) by precision at the middle threshold "
                   "(default 10, 0 = all)")
    p.set_defaults(func=run)


def score_dir(directory, record=None, thresholds=None, kind="symmetric", kept_only=True,
              controls=("chance", "identity", "appearance"), baselines=("sift", "superpoint", "disk+lightglue")):
    """Pooled rows (DataFrame with :data:`ROW_KEYS`) for one probed set directory (``thresholds`` None:
    :data:`corrlab.evaluation.DEFAULT_THRESHOLDS`)."""
    from pathlib import Path

    from ..evaluation import DEFAULT_THRESHOLDS, pool_scores, score_set
    from ..probing import ProbeRecord
    from ..sets import load_set

    mvset = load_set(directory)
    rec = ProbeRecord.load(record or Path(directory) / "record.nc")
    thresholds = DEFAULT_THRESHOLDS if thresholds is None else thresholds
    rows = score_set(rec, mvset, thresholds, kind, kept_only, list(controls or ()), list(baselines or ()))
    return pool_scores(rows, ("method", "layer", "step", "threshold", "note"))[list(ROW_KEYS)]


def score_pipeline_dir(directory, record=None, thresholds=None, kept_only=True):
    """Frame-to-frame rows (:data:`FLOW_ROW_KEYS`) of a video probed through a diffusers pipeline: every
    recorded (layer, step, src frame, tgt frame) against DIS optical flow between the frames the record's
    latent frames stand for (see :func:`corrlab.video_consistency.score_record_flow`)."""
    from pathlib import Path

    from ..errors import CorrlabError
    from ..evaluation import DEFAULT_THRESHOLDS
    from ..pipelines import load_pipeline_output
    from ..probing import ProbeRecord
    from ..video_consistency import score_record_flow

    frames, header = load_pipeline_output(directory)
    if header.get("kind") != "video":
        raise CorrlabError(
            f"dir: {str(directory)!r} holds images of a {header.get('pipeline')} with no cameras; scoring needs "
            f"cameras (a multi-view set) or a video (scored against optical flow)"
        )
    rec = ProbeRecord.load(record or Path(directory) / "record.nc")
    picks = header.get("record_frames") or list(range(rec.num_images))
    df = score_record_flow(rec, frames[picks], DEFAULT_THRESHOLDS if thresholds is None else thresholds,
                           kept_only=kept_only)
    df["src"] = [picks[i] for i in df["src"]]  # video frame numbers
    df["tgt"] = [picks[i] for i in df["tgt"]]
    return df[list(FLOW_ROW_KEYS)]


def _json_rows(df, keys=ROW_KEYS) -> list[dict]:
    import math

    rows = []
    for r in df.to_dict("records"):
        out = {}
        for k in keys:
            v = r[k]
            if v is None or (isinstance(v, float) and math.isnan(v)):
                out[k] = None
            elif k in ("step", "n_correct", "n_matches", "src", "tgt", "n_flow_valid"):
                out[k] = int(v)
            elif k in ("threshold", "precision"):
                out[k] = float(v)
            else:
                out[k] = str(v)
        rows.append(out)
    return rows


def format_table(df, top: int = 10) -> str:
    """Readable table: one line per method (native: per layer/step), ``precision (n_correct/n_matches)``
    per threshold. Native rows: the ``top`` best by precision at the middle threshold (0 = all)."""
    import pandas as pd

    ths = sorted(df["threshold"].unique())
    key_th = ths[len(ths) // 2]
    native = df[df["method"] == "native"]
    ranked = native[native["threshold"] == key_th].sort_values(["precision", "n_correct"], ascending=False,
                                                               na_position="last")
    keep = ranked[["layer", "step"]].drop_duplicates()
    n_total = len(keep)
    if top > 0:
        keep = keep.head(top)
    lines = []
    header = f"{'method':<16} {'layer':<28} {'step':>4}  " + "  ".join(f"{f'@{t:g}px':>16}" for t in ths)
    lines.append(header)
    lines.append("-" * len(header))

    def cells(sub) -> str:
        by = sub.set_index("threshold")
        out = []
        for t in ths:
            r = by.loc[t]
            p = "  n/a" if pd.isna(r["precision"]) else f"{100 * r['precision']:5.1f}%"
            out.append(f"{p} ({int(r['n_correct'])}/{int(r['n_matches'])})".rjust(16))
        return "  ".join(out)

    for _, (layer, step) in keep.iterrows():
        sub = native[(native["layer"] == layer) & (native["step"] == step)]
        lines.append(f"{'native':<16} {str(layer):<28} {int(step):>4}  " + cells(sub))
    notes = []
    for method, sub in df[df["method"] != "native"].groupby("method", sort=False):
        note = sub["note"].iloc[0]
        if note:
            notes.append(f"{method}: {note}")
            lines.append(f"{method:<16} {'-':<28} {'-':>4}  {'unavailable (see below)':>16}")
            continue
        lines.append(f"{method:<16} {'-':<28} {'-':>4}  " + cells(sub))
    lines.append("")
    lines.append(f"native: {len(keep)} of {n_total} (layer, step) shown, best first by precision at {key_th:g} px. "
                 "Precision = correct / matches over all ordered view pairs.")
    lines.append("identity = same token position in the other view: with cameras at similar elevation it lies "
                 "near the epipolar line, so read native precision against it.")
    lines += [n[:300] for n in notes]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    if (Path(args.dir) / "pipeline.json").is_file():
        df = score_pipeline_dir(args.dir, args.record, args.thresholds, not args.all_matches)
        if args.json:
            print(json.dumps(_json_rows(df, FLOW_ROW_KEYS), indent=1))
        else:
            from ..evaluation import pool_scores

            pooled = pool_scores(df).drop(columns=["n_pairs"])
            print(pooled.to_string(index=False))
            print("\nnative frame-to-frame matches vs DIS optical flow (forward-backward consistent tokens), "
                  "pooled over frame pairs; --json gives one row per frame pair")
        return 0
    df = score_dir(args.dir, args.record, args.thresholds, args.kind, not args.all_matches, args.controls,
                   args.baselines)
    if args.json:
        print(json.dumps(_json_rows(df), indent=1))
    else:
        print(format_table(df, args.top))
    return 0
