"""CorrAdapter's windowed attention: the compiled C kernel and the two torch kernels (dense logits, gathered windows).

Random q / k / v / matches (2 batch entries x 4 views, 4 heads, head size 32, r = 3, about 2/3 of the match
slots kept), one call of ``corr_adapted_output`` per kernel and size, process CPU time (median of the repeats).
Prints, per tokens-per-image, the three times, the ratios gathered / dense (> 1 where dense is faster: the
crossover sets ``corrlab.interventions.aggregation.DENSE_WINDOW_MAX_TOKENS`` for the torch path) and torch's
faster kernel / compiled (the compiled kernel's speed-up; it is what float32 on the CPU runs where a C compiler is
found), and the largest difference of each output from the dense kernel's; ends with one line of key=value pairs.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/window_kernels.py
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/window_kernels.py --sides 8 16 --repeats 1   # smoke test
"""
from __future__ import annotations

import argparse
import importlib
import os
import statistics
import time

import torch

from corrlab.interventions import AggregationOptions, MatchedAttention, corr_adapted_output

aggregation = importlib.import_module("corrlab.interventions.aggregation")


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        c0 = time.process_time()
        fn()
        times.append(time.process_time() - c0)
    return statistics.median(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sides", type=int, nargs="+", default=[16, 32, 45, 64], help="token grid side per image")
    ap.add_argument("--head-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    g = torch.Generator().manual_seed(0)
    B, V, H, d = 2, 4, 4, args.head_size
    summary = {}
    saved = aggregation.DENSE_WINDOW_MAX_TOKENS, aggregation.load_window_kernel
    compiled = saved[1]() is not None
    kernels = (("dense", 10**9, False), ("gathered", 0, False)) + ((("compiled", 0, True),) if compiled else ())
    try:
        for side in args.sides:
            N = side * side
            q, k, v, original = (torch.randn(B, V, H, N, d, generator=g) for _ in range(4))
            index = torch.randint(0, N, (B, V, H, V - 1, N), generator=g)
            kept = torch.rand(B, V, H, V - 1, N, generator=g) < 0.67
            att = MatchedAttention(q, k, v, index, kept, (side, side), d ** -0.5)
            options = AggregationOptions(radius=3, eta=0.1)
            out, secs = {}, {}
            for kernel, limit, use_compiled in kernels:
                aggregation.DENSE_WINDOW_MAX_TOKENS = limit
                aggregation.load_window_kernel = saved[1] if use_compiled else (lambda: None)
                out[kernel] = corr_adapted_output(original, att, options)
                secs[kernel] = timed(lambda: corr_adapted_output(original, att, options), args.repeats)
            ratio = secs["gathered"] / secs["dense"]
            line = (f"{N:5d} tokens per image: dense {secs['dense'] * 1e3:8.1f} ms, gathered {secs['gathered'] * 1e3:8.1f} ms"
                    f", gathered / dense {ratio:.2f}")
            summary[f"ratio_gathered_over_dense@{N}"] = round(ratio, 2)
            if compiled:
                speedup = min(secs["dense"], secs["gathered"]) / secs["compiled"]
                line += f", compiled {secs['compiled'] * 1e3:8.1f} ms, torch's best / compiled {speedup:.2f}"
                summary[f"speedup_compiled@{N}"] = round(speedup, 2)
            diff = max(float((out[kn] - out["dense"]).abs().max()) for kn in out)
            print(f"{line}, max |difference| {diff:.1e}")
            summary[f"max_diff@{N}"] = f"{diff:.1e}"
    finally:
        aggregation.DENSE_WINDOW_MAX_TOKENS, aggregation.load_window_kernel = saved
    summary["compiled"] = compiled
    summary["dense_max_tokens"] = saved[0]
    print(" ".join(f"{k}={v}" for k, v in summary.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
