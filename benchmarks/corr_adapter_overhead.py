"""CorrAdapter cost: wall time and peak memory of a generation with vs without it, in one process.

Same prompt, seed, cameras and steps. Time: plain and adapted generations alternate (after one warm-up
each), so both see the same machine load; reported are the medians and the median of the per-round
ratios, of the process's CPU time (``time.process_time``: the primary number, as it hardly depends on
other processes loading a shared machine) and of wall time. Peak memory (CPU): torch's profiler reports every tensor allocation with the running total of
live profiled bytes; the peak of a generation is the largest running total above the total at its
start (activations and temporaries), plus the bytes of the model's parameters and buffers (what a GPU's
``max_memory_allocated`` would also count). Both ratios are printed: ``mem_ratio`` (with the weights)
and ``activation_mem_ratio`` (without). On CUDA, ``torch.cuda.max_memory_allocated`` is used instead.
Goal: <= 1.10x time and <= 1.10x memory (the paper's cost on MVAdapter: 1.19x time, 1.37x memory).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/corr_adapter_overhead.py                    # shipped model
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/corr_adapter_overhead.py --model runs/mvdit-s/ema/step_0000500
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/corr_adapter_overhead.py --tiny --steps 4   # smoke test

Adapter parameters: the defaults of ``CorrAdapterConfig`` unless given (--eta, --radius, --active-steps,
--refresh, --layers, --no-fused-refresh). Ends with one line of key=value pairs.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from corrlab.interventions import CorrAdapterHandle
from corrlab.model import DEFAULT_GUIDANCE, DEFAULT_STEPS, load_default
from corrlab.scenes import sample_cameras

from corr_adapter_effect import tiny_pipeline  # noqa: E402 (same folder; python benchmarks/... puts it on sys.path)


def model_bytes(model: torch.nn.Module) -> int:
    """Bytes of a model's parameters and buffers."""
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


def peak_cpu_bytes(fn) -> int:
    """Peak live bytes of CPU tensors allocated while ``fn()`` runs, above those live when it starts."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = []

    def walk(node) -> None:
        extra = node.extra_fields
        if type(extra).__name__ == "_ExtraFields_Allocation" and extra.device.type == "cpu":
            events.append((node.start_time_ns, int(extra.alloc_size), int(extra.total_allocated)))
        for child in node.children:
            walk(child)

    for root in prof.profiler.kineto_results.experimental_event_tree():
        walk(root)
    if not events:
        return 0
    events.sort()
    start = events[0][2] - events[0][1]  # running total just before the first allocation
    return max(total for _, _, total in events) - start


def peak_bytes(fn, device: torch.device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return int(torch.cuda.max_memory_allocated())
    return peak_cpu_bytes(fn)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="model folder or name under data/ (default: the shipped model)")
    ap.add_argument("--tiny", action="store_true", help="use a small random-init model (smoke test)")
    ap.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    ap.add_argument("--views", type=int, default=4)
    ap.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE)
    ap.add_argument("--repeats", type=int, default=5, help="timed rounds (each: one plain, one adapted)")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--prompt", default="red striped box")
    ap.add_argument("--eta", type=float)
    ap.add_argument("--radius", type=int)
    ap.add_argument("--active-steps", type=int, help="adapt the first K steps (0 = every step)")
    ap.add_argument("--refresh", type=int)
    ap.add_argument("--layers", nargs="+", help="layer names (default: the adapter's default layers)")
    ap.add_argument("--no-fused-refresh", action="store_true",
                    help="run the model's kernel and then the matcher at refresh steps (fused_refresh=False)")
    args = ap.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    pipe = tiny_pipeline() if args.tiny else load_default(args.model)
    size = pipe.sample_size
    cams = sample_cameras(args.seed, args.views, size, layout="train")
    params = {k: v for k, v in (("eta", args.eta), ("window_radius", args.radius), ("active_steps", args.active_steps),
                                ("refresh_every", args.refresh), ("layers", args.layers)) if v is not None}
    if params.get("active_steps") == 0:
        params["active_steps"] = None
    if args.no_fused_refresh:
        params["fused_refresh"] = False
    handle = CorrAdapterHandle(pipe, **params)

    def generate():
        return pipe(args.prompt, cameras=cams, num_inference_steps=args.steps, guidance_scale=args.guidance,
                    seed=args.seed, progress=False)

    def adapted():
        with handle:
            return generate()

    device = pipe.device
    generate(), adapted()  # warm-up
    t_plain, t_adapt, c_plain, c_adapt = [], [], [], []
    for _ in range(args.repeats):
        for fn, wall, cpu in ((generate, t_plain, c_plain), (adapted, t_adapt, c_adapt)):
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            cpu.append(time.process_time() - c0)
            wall.append(time.perf_counter() - t0)
    weights = model_bytes(pipe.model) if device.type != "cuda" else 0
    act_plain, act_adapt = peak_bytes(generate, device), peak_bytes(adapted, device)
    mem_plain, mem_adapt = weights + act_plain, weights + act_adapt
    with handle:
        generate()
        stats = handle.stats
    med_plain, med_adapt = statistics.median(t_plain), statistics.median(t_adapt)
    wall_ratio = statistics.median(a / p for a, p in zip(t_adapt, t_plain))
    time_ratio = statistics.median(a / p for a, p in zip(c_adapt, c_plain))
    cfg = handle.config
    print(f"model: {'tiny random-init' if args.tiny else (args.model or 'shipped')}, {args.views} views x {size}px, "
          f"{args.steps} steps, guidance {args.guidance}, torch threads {torch.get_num_threads()}, device {device}")
    print(f"adapter: layers {handle.layers}, eta {cfg.eta}, r {cfg.radius}, active_steps {cfg.active_steps}, "
          f"refresh_every {cfg.refresh_every}; kept {stats['kept'] / max(stats['total'], 1):.3f} of match slots, "
          f"{stats['matcher_refreshes']} matcher refreshes ({stats['fused_refreshes']} from the attention's own pass), "
          f"{stats['adapted_calls']} adapted calls")
    print(f"cpu time  plain {', '.join(f'{t:.3f}' for t in c_plain)} s; adapted {', '.join(f'{t:.3f}' for t in c_adapt)} s")
    print(f"wall time plain median {med_plain:.3f} s ({', '.join(f'{t:.3f}' for t in t_plain)})")
    print(f"wall time adapted median {med_adapt:.3f} s ({', '.join(f'{t:.3f}' for t in t_adapt)})")
    print(f"memory plain {mem_plain / 2**20:.2f} MiB (weights {weights / 2**20:.2f} + peak {act_plain / 2**20:.2f}), "
          f"adapted {mem_adapt / 2**20:.2f} MiB (peak {act_adapt / 2**20:.2f})")
    summary = {
        "steps": args.steps, "views": args.views, "size": size, "layers": len(handle.layers),
        "eta": cfg.eta, "radius": cfg.radius, "active_steps": cfg.active_steps, "refresh_every": cfg.refresh_every,
        "fused_refresh": cfg.fused_refresh, "fused_refreshes": stats["fused_refreshes"],
        "cpu_plain_s": round(statistics.median(c_plain), 4), "cpu_adapter_s": round(statistics.median(c_adapt), 4),
        "time_ratio": round(time_ratio, 3), "t_plain_s": round(med_plain, 4), "t_adapter_s": round(med_adapt, 4),
        "wall_ratio": round(wall_ratio, 3),
        "mem_plain_mib": round(mem_plain / 2**20, 3), "mem_adapter_mib": round(mem_adapt / 2**20, 3),
        "mem_ratio": round(mem_adapt / mem_plain, 3),
        "activation_mem_ratio": round(act_adapt / act_plain, 3) if act_plain else float("nan"),
        "kept_fraction": round(stats["kept"] / max(stats["total"], 1), 4),
        "within_goal": time_ratio <= 1.10 and mem_adapt / mem_plain <= 1.10, "tiny": args.tiny,
    }
    print(" ".join(f"{k}={v}" for k, v in summary.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
