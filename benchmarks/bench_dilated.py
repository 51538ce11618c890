"""Time the dilated op against the baselines; prints a table.

    python benchmarks/bench_dilated.py                       # the standard config (H100)
    python benchmarks/bench_dilated.py --seq-lens 262144 524288 1048576 --impls op --modes groups
    python benchmarks/bench_dilated.py --spread   # + the forward's spread and GPU-only time

Median of CUDA-event timings after warm-up; forward, and forward+backward. TFLOP/s counts
useful FLOPs only: per branch 4 * heads_used * n * (w / r^2) * head_dim for the forward
(halved when causal), 2.5x that for the backward. Peak memory: max allocated during the
forward+backward, inputs included.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import baselines  # noqa: E402

import dilated_ops  # noqa: E402
from dilated_ops._bench import forward_spread, measure, set_triton, useful_flops  # noqa: E402  (shared with `dilated-ops bench`)


def profile(n, b, h, d, segs, rates, dtype, causal):
    q, k, v = (torch.randn(b, n, h, d, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
    g = torch.randn(b, n, h, d, device="cuda", dtype=dtype)
    step = lambda: dilated_ops.dilated_attention(q, k, v, segs, rates, is_causal=causal).backward(g)
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=70))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq-lens", type=int, nargs="+", default=[16384, 65536, 262144])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--segments", type=int, nargs="+", default=[2048, 4096, 8192])
    ap.add_argument("--rates", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--modes", nargs="+", default=["groups", "longnet"])
    ap.add_argument("--impls", nargs="+", default=["op", "op-sdpa", "naive", "pregathered", "dense"],
                    help="op: the dilated op as shipped; op-sdpa: the op with its Triton forward off "
                    "(SDPA on views + copy into place)")
    ap.add_argument("--dense-max", type=int, default=65536, help="largest n for dense SDPA")
    ap.add_argument("--causal", action="store_true")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--profile", action="store_true", help="print the op's kernels (groups, first n)")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--spread", action="store_true",
                    help="also the forward's p10 / median / p90 per call and its GPU-only median (the GPU "
                         "held busy while the host enqueues), measured first in each row")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_dilated.py needs a CUDA GPU")
    dtype = getattr(torch, args.dtype)
    b, h, d, segs, rates = args.batch, args.heads, args.head_dim, args.segments, args.rates
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, {args.dtype}, batch {b}, heads {h}, "
          f"head_dim {d}, segments {segs}, rates {rates}, causal {args.causal}")
    header = f"| {'n':>8} | {'impl':<22} | {'fwd ms':>8} | {'fwd TF/s':>8} | {'fwd+bwd ms':>10} | {'f+b TF/s':>8} | {'peak GiB':>8} |"
    if args.spread:
        header += f" {'fwd p10':>8} | {'fwd p50':>8} | {'fwd p90':>8} | {'fwd GPU':>8} |"
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    if args.profile:
        profile(args.seq_lens[0], b, h, d, segs, rates, dtype, args.causal)
    # Dense rows run after all others: on the H100 the first timings after dense's long
    # full-load calls ran up to 0.5 ms slower per call at 256K (GPU-only time unchanged), which
    # charged whatever row came next (benchmarks/RESULTS.md, 2026-11-27 sixth session).
    others = [i for i in args.impls if i != "dense"]
    jobs = [(n, others) for n in args.seq_lens] + [
        (n, ["dense"]) for n in args.seq_lens if "dense" in args.impls and n <= args.dense_max]
    for n, impls in jobs:
        if not impls:
            continue
        torch.manual_seed(0)
        q, k, v = (torch.randn(b, n, h, d, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
        for impl in impls:
            for mode in args.modes:
                if not impl.startswith("op") and mode != "groups":
                    continue
                if impl == "dense" and (n > args.dense_max or mode != "groups"):
                    continue
                if impl == "op-sdpa" and mode != "groups":
                    continue  # longnet runs on SDPA either way
                name = f"{impl} ({mode})" if impl.startswith("op") else impl
                flops = useful_flops(n, h, d, segs, rates, mode, args.causal)
                if impl.startswith("op"):
                    make, params = (lambda mode=mode: [dilated_ops.dilated_attention(q, k, v, segs, rates, mode=mode, is_causal=args.causal)]), (q, k, v)
                elif impl == "naive":
                    make, params = (lambda: [baselines.naive(q, k, v, segs, rates, args.causal)]), (q, k, v)
                elif impl == "pregathered":
                    batches = baselines.pregather(q, k, v, segs, rates)
                    params = [t for bt in batches for t in bt]
                    make = lambda batches=batches: baselines.pregathered(batches, args.causal)
                else:
                    flops = 4 * h * n * n * d / (2 if args.causal else 1)
                    make, params = (lambda: [baselines.dense(q, k, v, args.causal)]), (q, k, v)
                set_triton(impl != "op-sdpa")  # (same as backend="sdpa")
                spread = forward_spread(make, args.warmup, args.reps) if args.spread else ()
                f, fb, peak = measure(make, params, args.warmup, args.reps)
                set_triton(True)
                row = f"| {n:>8} | {name:<22} | {f:8.3f} | {flops / f / 1e9:8.1f} | {fb:10.3f} | {3.5 * flops / fb / 1e9:8.1f} | {peak:8.2f} |"
                print(row + "".join(f" {t:8.3f} |" for t in spread), flush=True)
                del make, params
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
