"""Segment transport cost: wall time per jointly generated pair vs two independent generations.

In one process, on the same prompts, seeds and cameras, times (median over --repeats after a warm-up):
* ``two_independent``: two plain ``pipe(prompt, seed=...)`` calls (the baseline);
* ``sampler_independent``: the sampler's ``independent`` mode (both endpoints in one batched call);
* ``pair``: ``generate_pair`` in --mode (default ``full``) with --k points.
Per step the full method evaluates k points (+1 for the midpoint anchor when 0.5 is not a point and
w_t > 0), against 2 for two generations: the expected time ratio is (k + 1) / 2, or k / 2 when 0.5 is a
point. Goal: ratio <= 1.15 x expected (the batching wastes no time). The measured evaluations per step
(from the sampler's history) are printed next to it.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/segment_transport_cost.py                 # shipped model
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/segment_transport_cost.py --tiny --steps 4 # smoke test

Ends with one line of key=value pairs.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from corrlab.interventions import SegmentTransportConfig, segment_transport
from corrlab.interventions.pair_generation import SamplingOptions, generate_pair
from corrlab.interventions.velocity_adapters import embedded_velocity_fn
from corrlab.model import DEFAULT_GUIDANCE, DEFAULT_STEPS, CorrlabPipeline, MultiViewDiT, load_default
from corrlab.scenes import sample_cameras


def tiny_pipeline(seed: int = 0) -> CorrlabPipeline:
    """A small random-init model (output layers randomised: the DiT zero-initialises them) for smoke runs."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = MultiViewDiT(sample_size=32, patch_size=4, hidden_size=64, num_layers=3, num_heads=2, prompt_dim=16)
    with torch.no_grad():
        for layer in (model.ada_out[1], model.proj_out):
            layer.weight.copy_(0.05 * torch.randn(layer.weight.shape, generator=g))
            layer.bias.copy_(0.05 * torch.randn(layer.bias.shape, generator=g))
    return CorrlabPipeline(model.eval())


def timed(fn, repeats: int) -> list[float]:
    fn()  # warm-up
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="model folder or name under data/ (default: the shipped model)")
    ap.add_argument("--tiny", action="store_true", help="use a small random-init model (smoke test)")
    ap.add_argument("--mode", default="full", choices=["full", "anchor-mean", "endpoints", "hard-cut", "independent"])
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    ap.add_argument("--views", type=int, default=4)
    ap.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--prompt-a", default="red striped box")
    ap.add_argument("--prompt-b", default="blue dotted sphere")
    args = ap.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    pipe = tiny_pipeline() if args.tiny else load_default(args.model)
    size = pipe.sample_size
    cams = sample_cameras(args.seed, args.views, size, layout="train")
    common = dict(cameras=cams, num_inference_steps=args.steps, guidance_scale=args.guidance, progress=False)

    def two_independent():
        pipe(args.prompt_a, seed=args.seed, **common)
        pipe(args.prompt_b, seed=args.seed, **common)

    sampling = SamplingOptions(num_views=len(cams), num_inference_steps=args.steps, guidance_scale=args.guidance)

    def pair(mode):
        transport = SegmentTransportConfig(mode=mode, k=args.k)
        return lambda: generate_pair(pipe, args.prompt_a, args.prompt_b, args.seed, cameras=cams, sampling=sampling,
                                     transport=transport, progress=False)

    t_two = timed(two_independent, args.repeats)
    t_ind = timed(pair("independent"), args.repeats)
    t_pair = timed(pair(args.mode), args.repeats)

    # evaluations per step actually made (the sampler's own count)
    fn = embedded_velocity_fn(pipe, cams, args.guidance, size)
    emb = pipe.encode_prompt([args.prompt_a, args.prompt_b]).float()
    noise = torch.randn((1, len(cams), 3, size, size), generator=torch.Generator().manual_seed(args.seed))[0]
    hist = segment_transport(fn, noise, emb[0], emb[1], pipe.timesteps(args.steps),
                             config=SegmentTransportConfig(mode=args.mode, k=args.k),
                             return_trajectory=True, progress=False).history
    evals_per_step = float(hist["num_evals"].float().mean())

    k_eff = args.k if args.mode in ("full", "anchor-mean") else 2
    has_mid = args.k % 2 == 1 or args.mode != "full"
    expected = (k_eff if has_mid else k_eff + 1) / 2
    med_two, med_ind, med_pair = (statistics.median(t) for t in (t_two, t_ind, t_pair))
    ratio = med_pair / med_two
    goal = 1.15 * expected
    print(f"model: {'tiny random-init' if args.tiny else (args.model or 'shipped')}, {args.views} views x {size}px, "
          f"{args.steps} steps, guidance {args.guidance}, torch threads {torch.get_num_threads()}")
    print(f"two independent generations : median {med_two:.3f} s  ({', '.join(f'{t:.3f}' for t in t_two)})")
    print(f"sampler 'independent' mode  : median {med_ind:.3f} s  ratio {med_ind / med_two:.3f}")
    print(f"pair '{args.mode}' k={args.k}          : median {med_pair:.3f} s  ratio {ratio:.3f}  "
          f"(expected {expected:.2f}, goal <= {goal:.2f}; {evals_per_step:.2f} evaluations per step vs 2)")
    summary = {
        "mode": args.mode, "k": args.k, "steps": args.steps, "views": args.views, "size": size,
        "t_two_independent_s": round(med_two, 4), "t_sampler_independent_s": round(med_ind, 4),
        "t_pair_s": round(med_pair, 4), "ratio": round(ratio, 3), "expected_ratio": expected,
        "goal_ratio": round(goal, 3), "evals_per_step": round(evals_per_step, 3),
        "within_goal": ratio <= goal, "tiny": args.tiny,
    }
    print(" ".join(f"{k}={v}" for k, v in summary.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
