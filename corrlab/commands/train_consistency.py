"""``corrlab train-consistency``: CorrAdapter* — a LoRA on the multi-view attention, trained with the flow loss
plus lambda x a consistency loss at exact (depth-derived) correspondences."""
from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train-consistency",
        help="train a CorrAdapter* LoRA (flow + lambda x consistency loss at true correspondences) on a base model",
        description="Fine-tune the multi-view attention of a base model (blocks.*.attn to_q/to_k/to_v/to_out) with a "
        "peft LoRA under L = L_flow + lambda * L_consistency at ground-truth correspondences from the renderer's "
        "depth (eq14: the paper's feature consistency at the attention block's input; attention-ce: cross-entropy "
        "of the attention towards the true token). Writes config.json, loss.jsonl, checkpoints/ and lora/ under --out; "
        "load the result with corrlab.model.lora.load_lora(pipe, OUT/lora).",
    )
    p.add_argument("--base", default="corrlab-mvunet-s", help="base model folder or name under data/")
    p.add_argument("--loss", choices=["eq14", "attention-ce"], default="eq14")
    p.add_argument("--lambda", dest="lam", type=float, default=0.1, help="weight of the consistency loss (0.1)")
    p.add_argument("--steps", type=int, help="train up to this total step count (default 500)")
    p.add_argument("--out", required=True, help="run folder (keep it out of the repository)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--layers", nargs="+", help="attention layers the consistency loss reads (default: per loss)")
    p.add_argument("--sets-per-step", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest on a shared 2-core CPU)")
    p.add_argument("--checkpoint-every", type=int, default=50)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from ..errors import CorrlabError
    from ..model.consistency_training import ConsistencyConfig, ConsistencyTrainer

    out = Path(args.out)
    has_ck = any((out / "checkpoints").glob("step_*"))
    if args.resume and (out / "config.json").is_file():
        config = ConsistencyConfig.from_json(out / "config.json")
    else:
        config = ConsistencyConfig(base=args.base, loss=args.loss, lam=args.lam, rank=args.rank, lr=args.lr,
                                   layers=args.layers, sets_per_step=args.sets_per_step, seed=args.seed,
                                   threads=args.threads, checkpoint_every=args.checkpoint_every)
    if args.steps is not None:
        if args.steps < 1:
            raise CorrlabError(f"--steps: expected a positive step count, got {args.steps}")
        config.steps = args.steps
    if has_ck and not args.resume:
        raise CorrlabError(f"--out: {str(out)!r} already holds checkpoints; pass --resume or choose a new folder")
    trainer = ConsistencyTrainer(config, out)
    if args.resume:
        print(f"resumed at step {trainer.step}" if trainer.resume() else "no checkpoint found: starting from step 0")
    lora = trainer.run(progress=not args.no_progress)
    print(json.dumps({"out": str(out), "lora": str(lora), "step": trainer.step, "loss": config.loss,
                      "wall_s": round(trainer.wall, 1), "cpu_s": round(trainer.cpu, 1)}))
    return 0
