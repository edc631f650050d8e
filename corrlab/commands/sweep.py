"""``corrlab sweep``: run a sweep spec (TOML) locally or on Ray into one resumable, labelled store."""
from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "sweep",
        help="run a sweep spec (models x prompts x seeds x views x interventions) into one store, locally or on Ray",
        description="Expand a TOML sweep spec into items (one generation run each: all probed layers and steps "
        "from one pass), compute each into STORE/items/<key>/ (a set + record.nc) with its scores in "
        "STORE/manifest/<key>.parquet. The spec is validated before any work starts. Open the result with "
        "corrlab.open_sweep(STORE). See examples/sweep_small.toml.",
    )
    p.add_argument("spec", help="sweep spec (.toml)")
    p.add_argument("--out", required=True, help="store folder (new or empty; an existing store needs --resume)")
    p.add_argument("--engine", choices=("local", "ray"), default="local",
                   help="local: this process (default); ray: actors (pip install corrlab[ray])")
    p.add_argument("--address", help="ray: cluster address (e.g. auto, ray://head:10001); default: start a local one")
    p.add_argument("--workers", type=int, help="ray: number of actors (default: as many as the resources hold)")
    p.add_argument("--gpus-per-worker", type=float, default=0.0,
                   help="ray: num_gpus per actor, fractions share a GPU (default 0: CPU)")
    p.add_argument("--cpus-per-worker", type=float, default=1.0, help="ray: num_cpus (and torch threads) per actor")
    p.add_argument("--max-retries", type=int, default=2, help="retries per item after a failure or a lost worker (2)")
    p.add_argument("--resume", action="store_true",
                   help="continue an existing store: skip complete items, redo half-written or corrupted ones")
    p.add_argument("--device", help="local: cpu or cuda (default: cuda when available)")
    p.add_argument("--threads", type=int, help="local: torch CPU threads (default: unchanged)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import sys

    from ..sweeps import sweep

    ray_only = {"--address": args.address, "--workers": args.workers}
    if args.engine == "local":
        used = [k for k, v in ray_only.items() if v is not None]
        used += ["--gpus-per-worker"] if args.gpus_per_worker else []
        if used:
            from ..errors import CorrlabError

            raise CorrlabError(f"{', '.join(used)}: expected only with --engine ray, got them with --engine local")
    h = sweep(args.spec, args.out, engine=args.engine, resume=args.resume, address=args.address,
              workers=args.workers, gpus_per_worker=args.gpus_per_worker, cpus_per_worker=args.cpus_per_worker,
              max_retries=args.max_retries, device=args.device, threads=args.threads,
              progress=not args.no_progress)
    st = h.stats
    print(f"{h.store.root}: {st['total']} items: {st['skipped']} already complete, {st['computed']} computed "
          f"({st['redone']} redone), {st['retried']} retries, {st['failed']} failed, {h.seconds:.1f} s")
    for key, err in h.failures.items():
        print(f"failed {key}: {err}", file=sys.stderr)
    return 1 if st["failed"] else 0
