"""``corrlab render``: render one procedural multi-view set to a directory."""
from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "render",
        help="render a procedural multi-view set (images, depth, masks, cameras.json)",
        description="Render one procedural object from several cameras and write it as a corrlab set.",
    )
    p.add_argument("--seed", type=int, default=0, help="scene and camera seed (default 0)")
    p.add_argument("--views", type=int, default=4, help="number of views (default 4)")
    p.add_argument("--size", type=int, default=128, help="image side in pixels (default 128)")
    p.add_argument("--layout", default="even", help="camera layout: even, random or train (default even)")
    p.add_argument("--out", required=True, help="output directory (replaced if it is a corrlab set)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..scenes import render_scene
    from ..sets import save_set

    mv = render_scene(args.seed, views=args.views, size=args.size, layout=args.layout)
    path = save_set(mv, args.out)
    print(mv.prompt)
    print(path)
    return 0
