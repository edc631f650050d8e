"""Write an init folder for ``corrlab train --init-from`` whose new attention block starts with a learned epipolar prior.

    python scripts/seed_epipolar_gain.py --weights data/corrlab-mvunet-s \
        --config configs/mvunet_s_fine_attention_gain_init.json --out RUN_INIT [--target blocks.5 --source blocks.4]

The weights are loaded into the model the train config describes by ``Trainer.init_from`` (blocks that config
adds, e.g. ``decoder_attention_levels``, start neutral); then every head
of the target block's ``epipolar_gain`` is set to the LARGEST gain of the source block (the shipped weights:
``blocks.4`` head 0, 0.0705, i.e. ``lambda`` = 70.5 at scale 1000). The target block's output projections are
still zero, so the folder computes the same function as the weights it came from; training then starts the new
level with the epipolar prior the model learned elsewhere instead of growing it from 0. The folder is a
:class:`~corrlab.model.CorrlabPipeline` with the weights' ``checkpoint.json`` (step, CPU seconds), written
atomically (``corrlab.model.train.write_pipeline_folder``, as ``export_pipeline`` writes).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def seed_epipolar_gain(weights: str | Path, config: str | Path, out: str | Path,
                       target: str = "blocks.5", source: str = "blocks.4") -> Path:
    """Write ``out`` (see the module docstring); returns its path."""
    import torch

    from corrlab.errors import CorrlabError
    from corrlab.model.train import TrainConfig, Trainer, write_pipeline_folder

    weights = Path(weights)
    # the run's own model (seeded as a run seeds it) with the weights loaded and checked as --init-from does
    trainer = Trainer(TrainConfig.from_json(config), out)  # only init_from is used: nothing is written there
    trainer.init_from(weights)
    model = trainer.model
    params = dict(model.named_parameters())
    for name in (target, source):
        if params.get(f"{name}.epipolar_gain") is None:
            blocks = sorted(k.rsplit(".", 1)[0] for k in params if k.endswith(".epipolar_gain"))
            raise CorrlabError(f"{'target' if name == target else 'source'}: {name!r} has no epipolar_gain; "
                               f"expected one of {blocks}")
    with torch.no_grad():
        params[f"{target}.epipolar_gain"].fill_(float(params[f"{source}.epipolar_gain"].max()))
    info = weights / "checkpoint.json"
    return write_pipeline_folder(model, out, {info.name: info.read_text()} if info.is_file() else {}, keep=())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--weights", required=True, help="a pipeline folder (e.g. data/corrlab-mvunet-s)")
    p.add_argument("--config", required=True, help="the train config whose model the folder is for")
    p.add_argument("--out", required=True, help="the init folder to write")
    p.add_argument("--target", default="blocks.5", help="the block whose gains are seeded")
    p.add_argument("--source", default="blocks.4", help="the block whose largest gain seeds them")
    args = p.parse_args(argv)
    print(seed_epipolar_gain(args.weights, args.config, args.out, args.target, args.source))
    return 0


if __name__ == "__main__":
    sys.exit(main())
