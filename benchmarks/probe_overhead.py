"""Probe overhead: CPU time, wall time and peak memory of a generation probed at one layer / all layers.

In one process, on the same prompt, seed and cameras, times a full ``pipe(...)`` generation
(--repeats rounds, modes interleaved round-robin after one warm-up each; the headline ratio of a mode is
the median over rounds of its CPU time divided by the same round's unprobed time, so load that drifts on a
shared machine cancels within a round, with a 95 % bootstrap interval over rounds: on a shared 2-core VM single
runs vary by 10-20 %, so use ``--repeats 15`` for a figure to quote), for both kernel modes of the probe (``--kernels``):

* ``none``: no probe (the baseline);
* ``exact_one`` / ``fused_one``: ``probe(pipe, layers=[--layer], kernel=...)``, one layer at every step;
* ``exact_all`` / ``fused_all``: ``probe(pipe, kernel=...)``, every multi-image attention layer.

Goal: CPU-time ratio <= 1.05 (one layer) and <= 1.25 (all layers) for the fused mode. The process CPU
time (``time.process_time``) is the headline measure: on a shared machine it does not count time the
process waits for a core; wall time is reported beside it. Exact mode must stay bit-identical to the
unprobed run (asserted: the benchmark fails otherwise); the fused mode's largest deviation from it is
reported (``fused_max_abs_diff``, pixels in [0, 1], after all steps). Exact is the probe's default
(a probe observes: its record describes the images the same seed gives without it); fused is the
opt-in for cost, see :mod:`corrlab.probing.recording`.

Memory (skip with ``--no-memory``): tracemalloc does not see torch's CPU allocations and ``ru_maxrss`` is
dominated by import-time peaks, so the peak of torch's own allocator is read from the torch profiler
(``profile_memory=True``: the largest "Total Allocated" of its memory events, i.e. the peak of tensor
memory allocated during the generation on top of what existed before, weights excluded), one run per
mode after the timing runs. ``extra_mb`` = probed peak - unprobed peak; ``mem_ratio`` = probed / unprobed
peak. The record itself lives in numpy arrays (not torch): its size is reported as ``record_mb``. On a
GPU (``--device cuda``) ``torch.cuda.max_memory_allocated`` is used instead.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/probe_overhead.py                 # shipped model
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/probe_overhead.py --steps 4 --repeats 1   # quick

Without shipped weights the default architecture is built with random weights (same cost; the
adaLN-zero layers are randomised so activations are not degenerate) and the output says so.
Ends with one line of key=value pairs.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import torch

from corrlab.errors import WeightsNotFoundError
from corrlab.model import DEFAULT_GUIDANCE, DEFAULT_STEPS, CorrlabPipeline, MultiViewDiT, load_default
from corrlab.probing import probe
from corrlab.scenes import sample_cameras

KERNELS = ("exact", "fused")


def build_pipeline(model: str | None, device: str) -> tuple[CorrlabPipeline, str]:
    """The shipped (or named) model, else the default architecture with random weights."""
    try:
        return load_default(model).to(device), f"weights {model or 'shipped'}"
    except WeightsNotFoundError:
        if model is not None:
            raise
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    net = MultiViewDiT()
    with torch.no_grad():
        for layer in [net.ada_out[1], net.proj_out] + [b.ada[1] for b in net.blocks]:
            layer.weight.copy_(0.02 * torch.randn(layer.weight.shape, generator=g))
    return CorrlabPipeline(net.eval()).to(device), "default architecture, random init (no shipped weights)"


def make_run(pipe: CorrlabPipeline, args) -> callable:
    cams = sample_cameras(args.seed, args.views, pipe.sample_size, layout="train")
    layers = [args.layer]

    def run(mode: str):
        kw = dict(cameras=cams, num_inference_steps=args.steps, guidance_scale=args.guidance, seed=args.seed,
                  progress=False)
        if mode == "none":
            return pipe(args.prompt, **kw), None
        kernel, which = mode.split("_")
        steps = None if args.every == 1 else list(range(0, args.steps, args.every))
        with probe(pipe, layers=layers if which == "one" else None, steps=steps, chunk_size=args.chunk_size,
                   heads=args.heads, kernel=kernel) as rec:
            out = pipe(args.prompt, **kw)
        return out, rec

    return run


def bootstrap_median_ci(values: list[float], n: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95 % percentile-bootstrap interval of the median of ``values`` (the rounds' paired ratios)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.tensor(values, dtype=torch.float64)
    idx = torch.randint(0, len(values), (n, len(values)), generator=g)
    meds = x[idx].median(dim=1).values
    return float(meds.quantile(0.025)), float(meds.quantile(0.975))


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def peak_memory_mb(fn, device: str) -> float:
    """Peak tensor memory (MB) allocated while ``fn()`` runs, on top of what was allocated before."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    totals = [e["args"]["Total Allocated"] for e in events
              if e.get("name") == "[memory]" and e.get("args", {}).get("Device Type", 0) == 0]
    return max(totals, default=0) / 2**20


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="model folder or name under data/ (default: shipped, else random init)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    ap.add_argument("--views", type=int, default=4)
    ap.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--prompt", default="red striped box")
    ap.add_argument("--layer", help="the one layer of mode 'one' (default: the last multi-image layer)")
    ap.add_argument("--chunk-size", type=int, default=256)
    ap.add_argument("--heads", choices=("per_head", "mean"), default="per_head", help="matching option (per_head)")
    ap.add_argument("--every", type=int, default=1, help="record every N-th step (default 1: every step)")
    ap.add_argument("--no-memory", action="store_true", help="skip the memory measurement")
    ap.add_argument("--kernels", default="exact,fused", help="probe kernel modes to time (default: both)")
    args = ap.parse_args(argv)
    kernels = [k for k in args.kernels.split(",") if k]
    if not kernels or any(k not in KERNELS for k in kernels):
        ap.error(f"--kernels: expected a comma-separated subset of {KERNELS}, got {args.kernels!r}")
    MODES = ("none",) + tuple(f"{k}_{w}" for k in kernels for w in ("one", "all"))
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    pipe, what = build_pipeline(args.model, args.device)
    if args.layer is None:
        args.layer = [i.name for i in probe.layers(pipe.model)][-1]
    run = make_run(pipe, args)

    # exact mode: outputs must not change under the probe (same computation twice: exact comparison)
    ref = run("none")[0].images
    identical = all(torch.equal(run(m)[0].images, ref) for m in MODES if m.startswith("exact"))
    if not identical:
        raise SystemExit("exact mode is not bit-identical to the unprobed run")
    fused_diff = max((float((run(m)[0].images - ref).abs().max()) for m in MODES if m.startswith("fused")),
                     default=float("nan"))
    times = {m: [] for m in MODES}
    cpu = {m: [] for m in MODES}
    for _ in range(args.repeats):
        for mode in MODES:
            sync(args.device)
            t0, c0 = time.perf_counter(), time.process_time()
            run(mode)
            sync(args.device)
            times[mode].append(time.perf_counter() - t0)
            cpu[mode].append(time.process_time() - c0)
    med = {m: statistics.median(v) for m, v in times.items()}
    med_cpu = {m: statistics.median(v) for m, v in cpu.items()}
    # paired: each round's probed run against the same round's unprobed run, then the median over rounds
    # (load that drifts over minutes on a shared machine cancels within a round)
    ratios = {m: [a / b for a, b in zip(cpu[m], cpu["none"])] for m in MODES}
    paired_cpu = {m: statistics.median(r) for m, r in ratios.items()}
    paired_wall = {m: statistics.median(a / b for a, b in zip(times[m], times["none"])) for m in MODES}
    ci = {m: bootstrap_median_ci(r) for m, r in ratios.items()}
    n_layers = len(probe.layers(pipe.model))
    print(f"model: {what}; {args.views} views x {pipe.sample_size}px, {args.steps} steps, guidance {args.guidance}, "
          f"{n_layers} multi-image layers, device {args.device}, torch threads {torch.get_num_threads()}; "
          f"matching heads={args.heads}, recording every {args.every} step(s)")
    for mode in MODES:
        print(f"{mode:>9}: process CPU time median {med_cpu[mode]:.3f} s ({', '.join(f'{t:.3f}' for t in cpu[mode])});"
              f" paired ratio {paired_cpu[mode]:.3f} [95% CI {ci[mode][0]:.3f}, {ci[mode][1]:.3f}]"
              f" (ratio of medians {med_cpu[mode] / med_cpu['none']:.3f});"
              f" wall median {med[mode]:.3f} s, paired ratio {paired_wall[mode]:.3f}")
    summary = {
        "model": "shipped" if what.startswith("weights") else "random_init", "device": args.device,
        "steps": args.steps, "views": args.views, "size": pipe.sample_size, "layers": n_layers,
        "one_layer": args.layer, "heads": args.heads, "chunk_size": args.chunk_size, "every": args.every, "repeats": args.repeats,
        "threads": torch.get_num_threads(), "default_kernel": "exact", "cpu_none_s": round(med_cpu["none"], 3),
    }
    for mode in MODES[1:]:
        summary[f"cpu_ratio_{mode}"] = round(paired_cpu[mode], 3)
        summary[f"cpu_ratio_{mode}_ci"] = f"{ci[mode][0]:.3f}..{ci[mode][1]:.3f}"
        summary[f"wall_ratio_{mode}"] = round(paired_wall[mode], 3)
    summary.update({"goal_one": 1.05, "goal_all": 1.25, "exact_bit_identical": identical})
    if "fused" in kernels:
        summary["fused_max_abs_diff"] = f"{fused_diff:.2e}"
        summary["fused_goals_met"] = (summary["cpu_ratio_fused_one"] <= 1.05 and summary["cpu_ratio_fused_all"] <= 1.25)
    if "exact" in kernels:
        summary["exact_goals_met"] = (summary["cpu_ratio_exact_one"] <= 1.05 and summary["cpu_ratio_exact_all"] <= 1.25)
    if not args.no_memory:
        unit = "cuda max_memory_allocated" if args.device.startswith("cuda") else "torch profiler peak Total Allocated"
        peaks, records = {}, {}
        for mode in MODES:
            box = {}

            def once(mode=mode, box=box):
                box["rec"] = run(mode)[1]

            peaks[mode] = peak_memory_mb(once, args.device)
            records[mode] = 0.0 if box["rec"] is None else box["rec"].nbytes / 2**20
        for mode in MODES:
            extra, ratio = peaks[mode] - peaks["none"], peaks[mode] / max(peaks["none"], 1e-9)
            print(f"{mode:>9}: peak tensor memory {peaks[mode]:.1f} MB ({unit}), extra {extra:+.1f} MB, ratio "
                  f"{ratio:.3f}; record {records[mode]:.2f} MB (numpy)")
            summary[f"peak_mb_{mode}"] = round(peaks[mode], 1)
            summary[f"extra_mb_{mode}"] = round(extra, 1)
            summary[f"mem_ratio_{mode}"] = round(ratio, 3)
            summary[f"record_mb_{mode}"] = round(records[mode], 2)
        summary["memory_measure"] = unit.replace(" ", "_")
    print(" ".join(f"{k}={v}" for k, v in summary.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
