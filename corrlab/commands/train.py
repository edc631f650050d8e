"""``corrlab train``: train the embedded multi-view model on rendered scenes."""
from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train",
        help="train the embedded multi-view model (DiT or UNet) on corrlab's scenes",
        description="Train MultiViewDiT or MultiViewUNet (config key arch) with the rectified-flow objective on scenes rendered on the fly. "
        "Writes config.json, loss.jsonl, eval.jsonl (tracking figures), samples/ (a reference | generated | truth sheet per evaluation, reference-conditioned runs) and checkpoints/ under --out.",
    )
    p.add_argument("--config", help="TrainConfig JSON file (defaults for missing keys; none = all defaults)")
    p.add_argument("--out", required=True, help="run folder, e.g. runs/NAME")
    p.add_argument("--steps", type=int, help="train up to this total step count (overrides the config)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest checkpoint in --out, under the run's config.json, or under --config "
                   "when given (same model; a new schedule, e.g. configs/mvunet_s_cooldown.json)")
    p.add_argument("--init-from", metavar="MODEL_DIR",
                   help="start from shipped weights (e.g. data/corrlab-mvunet-s): model and EMA weights and the step "
                   "count come from the folder (its checkpoint.json), the optimiser starts fresh (warm-up again); "
                   "how a new machine continues a run whose run folder is gone")
    p.add_argument("--no-eval", action="store_true", help="skip the native-correspondence tracking figure")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from ..errors import CorrlabError
    from ..model.native import quick_native_eval
    from ..model.train import TrainConfig, Trainer

    out = Path(args.out)
    run_config = TrainConfig.from_json(out / "config.json") if args.resume and (out / "config.json").is_file() else None
    if args.config:
        config = TrainConfig.from_json(args.config)
        if run_config is not None:  # resuming under a new schedule (e.g. a cool-down): the model must stay the same
            for key in ("arch", "model", "image_size"):
                if getattr(config, key) != getattr(run_config, key):
                    raise CorrlabError(f"--config: {key} is {getattr(config, key)!r} but the run in {str(out)!r} was "
                                       f"trained with {getattr(run_config, key)!r}; a resumed run keeps its model")
            print(f"resuming with the schedule of {args.config} (the run's config.json is replaced)")
    elif run_config is not None:
        config = run_config
    else:
        config = TrainConfig()
    if args.steps is not None:
        if args.steps < 1:
            raise CorrlabError(f"--steps: expected a positive step count, got {args.steps}")
        config.steps = args.steps
    if not args.resume and any((out / "checkpoints").glob("step_*")):
        raise CorrlabError(f"--out: {str(out)!r} already holds checkpoints; pass --resume or choose a new folder")

    def eval_fn(model, cfg):
        if len(cfg.reference_probs) > 1:  # reference-conditioned: the image-conditioned tracking figures
            from ..model.conditioned import tracking_figures

            # the sample sheet of the tracking generations, one PNG per evaluation: samples/step_XXXXXXX.png
            return tracking_figures(model, cfg, n_sets=cfg.eval_sets,
                                    sheet=out / "samples" / f"step_{trainer.step:07d}.png")
        return quick_native_eval(model, cfg, n_sets=cfg.eval_sets)

    trainer = Trainer(config, out, eval_fn=None if args.no_eval else eval_fn)
    if args.init_from:
        if args.resume and trainer.checkpoint_dirs():
            raise CorrlabError("--init-from: expected a run folder without checkpoints, got --resume with checkpoints")
        trainer.init_from(args.init_from)
        print(f"initialised from {args.init_from} at step {trainer.step}")
    elif args.resume:
        resumed = trainer.resume()
        print(f"resumed at step {trainer.step}" if resumed else "no checkpoint found: starting from step 0")
    trainer.run(progress=not args.no_progress)
    print(json.dumps({"out": str(out), "step": trainer.step, "wall_s": round(trainer.wall, 1)}))
    return 0
