"""Sweep throughput: items per minute of the local engine (1 process) and of Ray (2 workers), and their ratio.

Runs the same sweep spec twice into fresh stores: ``engine="local"`` (this process, one item after
another, ``--local-threads`` torch threads, default 1) and ``engine="ray"`` with ``--workers`` actors
(default 2, one CPU and one torch thread each). The Ray cluster is started first and not timed (in real
use it is already running); actor start-up and model loading are timed, as is the local engine's model
loading: each figure is ``items / wall seconds of sweep() x 60``. The steady-state figures count the
items finished after each engine's first one, over the time between the first and the last (start-up
excluded: what a long sweep approaches). The two stores must hold the same scores
(same computation on the CPU: checked exactly), else the benchmark fails.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/sweep_throughput.py                     # examples/sweep_small.toml
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/sweep_throughput.py --spec my.toml --workers 4

On a 2-core machine two workers can at best double throughput, minus the actors' start-up (Python,
torch and corrlab imports, model load) and whatever else the machine runs. Ends with one line of
key=value pairs.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _steady(handle) -> float:
    """Items per minute between the first and the last finished item (start-up excluded)."""
    times = sorted(e["time"] for e in handle.events if e["status"] == "done")
    return (len(times) - 1) / (times[-1] - times[0]) * 60 if len(times) > 1 and times[-1] > times[0] else float("nan")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--spec", default=str(REPO / "examples" / "sweep_small.toml"))
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--local-threads", type=int, default=1)
    ap.add_argument("--out", help="folder for the two stores (default: a temporary folder)")
    args = ap.parse_args(argv)

    import pandas as pd
    import ray

    import corrlab
    from corrlab.sweeps import load_spec

    spec = load_spec(args.spec)
    n = len(spec.items())
    tmp = tempfile.TemporaryDirectory() if args.out is None else None
    root = Path(args.out or tmp.name)
    print(f"spec {args.spec}: {n} items; stores under {root}", flush=True)

    t = time.perf_counter()
    h_local = corrlab.sweep(spec, root / "local", engine="local", threads=args.local_threads, progress=False)
    local_s = time.perf_counter() - t
    print(f"local (1 process, {args.local_threads} thread): {local_s:.1f} s, {n / local_s * 60:.2f} items/min",
          flush=True)

    t = time.perf_counter()
    for attempt in range(3):  # a loaded machine can miss the raylet's fixed agent start-up wait
        try:
            ray.init(num_cpus=args.workers, include_dashboard=False, log_to_driver=False)
            break
        except Exception:  # noqa: BLE001 - Ray raises a bare Exception
            ray.shutdown()
            if attempt == 2:
                raise
    print(f"ray cluster up in {time.perf_counter() - t:.1f} s (not timed)", flush=True)
    try:
        t = time.perf_counter()
        h_ray = corrlab.sweep(spec, root / "ray", engine="ray", workers=args.workers, progress=False)
        ray_s = time.perf_counter() - t
    finally:
        ray.shutdown()
    print(f"ray ({args.workers} workers): {ray_s:.1f} s, {n / ray_s * 60:.2f} items/min", flush=True)
    failed = h_local.stats["failed"] + h_ray.stats["failed"]
    if failed:
        print(f"failed items: local {h_local.failures}, ray {h_ray.failures}", file=sys.stderr)
        return 1
    cols = ["key", "method", "layer", "step", "src", "tgt", "threshold"]
    a = h_local.open().scores.sort_values(cols).reset_index(drop=True)
    b = h_ray.open().scores.sort_values(cols).reset_index(drop=True)
    pd.testing.assert_frame_equal(a, b)
    print("scores identical between the engines", flush=True)
    steady = {name: _steady(h) for name, h in (("local", h_local), ("ray", h_ray))}
    print(f"steady state (after each engine's first finished item, start-up excluded): local "
          f"{steady['local']:.2f}, ray {steady['ray']:.2f} items/min", flush=True)
    summary = {
        "items": n,
        "local_items_per_min": round(n / local_s * 60, 2),
        "ray_workers": args.workers,
        "ray_items_per_min": round(n / ray_s * 60, 2),
        "ratio": round(local_s / ray_s, 3),
        "steady_local_items_per_min": round(steady["local"], 2),
        "steady_ray_items_per_min": round(steady["ray"], 2),
        "steady_ratio": round(steady["ray"] / steady["local"], 3),
        "local_s": round(local_s, 1),
        "ray_s": round(ray_s, 1),
        "cpus": os.cpu_count(),
        "load1": round(os.getloadavg()[0], 1),
    }
    print(" ".join(f"{k}={v}" for k, v in summary.items()))
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
