"""Write complete tiny diffusers pipelines with random weights (offline): DIR/wan, DIR/flux, DIR/sd, DIR/unet_mv.

    python scripts/make_tiny_pipelines.py --out DIR [--kinds wan flux] [--seed 0]

Load one back as a user would: ``corrlab.load_pipeline("DIR/wan")``. See :mod:`corrlab.tiny_pipelines`.
"""
from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    from corrlab.tiny_pipelines import TINY_KINDS, build_tiny_pipelines

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="output folder (one sub-folder per pipeline)")
    p.add_argument("--kinds", nargs="+", choices=TINY_KINDS, default=list(TINY_KINDS))
    p.add_argument("--seed", type=int, default=0, help="weight seed")
    args = p.parse_args(argv)
    for kind, path in build_tiny_pipelines(args.out, args.kinds, args.seed).items():
        print(f"{kind}\t{path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
