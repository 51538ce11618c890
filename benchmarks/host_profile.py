"""Where the host time of one forward goes on the GPU machine (standard config, no grad):
cProfile of many calls (sorted by own time) and a torch.profiler trace of a few calls, saved
for chrome://tracing, with the time from the call's start to the first kernel launch and to the
first kernel's start on the GPU.

    python benchmarks/host_profile.py [--n 262144] [--backward] [--out DIR]
"""
from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import statistics
import sys

import torch

import dilated_ops

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import baselines  # noqa: E402

SEGS, RATES = [2048, 4096, 8192], [1, 2, 4]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=262144)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--backward", action="store_true", help="forward+backward instead of forward")
    args = ap.parse_args()
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, args.n, 12, 64, device="cuda", dtype=torch.bfloat16, requires_grad=args.backward)
               for _ in range(3))
    grad = torch.randn(1, args.n, 12, 64, device="cuda", dtype=torch.bfloat16)

    def call():
        if args.backward:
            dilated_ops.dilated_attention(q, k, v, SEGS, RATES).backward(grad)
            q.grad = k.grad = v.grad = None
            return
        with torch.no_grad():
            return dilated_ops.dilated_attention(q, k, v, SEGS, RATES)

    for _ in range(5):
        call()
    torch.cuda.synchronize()
    prof = cProfile.Profile()
    for _ in range(200):
        prof.enable()
        call()
        prof.disable()
        torch.cuda.synchronize()
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(30)
    print(s.getvalue())

    trace = os.path.join(args.out, "host_profile_trace" + ("_bwd" if args.backward else "") + ".json")
    first_kernel("op", call, trace)
    if not args.backward:
        batches = baselines.pregather(q, k, v, SEGS, RATES)
        with torch.no_grad():
            first_kernel("SDPA, pre-gathered (floor)", lambda: baselines.pregathered(batches), None)


def first_kernel(name, call, trace):
    """Prints the time from the call's start to its first launch API call and to its first
    kernel on the GPU (torch.profiler, which adds its own per-op cost to both)."""
    from torch.profiler import ProfilerActivity, profile, record_function
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
        for _ in range(20):
            torch.cuda.synchronize()
            with record_function("dilated_call"):
                call()
            torch.cuda.synchronize()
    if trace:
        p.export_chrome_trace(trace)
    ev = p.events()
    cpu, cuda = torch.autograd.DeviceType.CPU, torch.autograd.DeviceType.CUDA
    calls = sorted(e.time_range.start for e in ev if e.name == "dilated_call" and e.device_type == cpu)
    launches = sorted(e.time_range.start for e in ev if "LaunchKernel" in e.name)
    kernels = sorted(e.time_range.start for e in ev if e.device_type == cuda and e.name != "dilated_call")
    to_launch, to_kernel = [], []
    for c in calls:
        to_launch.append(min(t for t in launches if t >= c) - c)
        to_kernel.append(min(t for t in kernels if t >= c) - c)
    print(f"{name}: call start -> first launch API: median {statistics.median(to_launch):.1f} us, "
          f"-> first kernel on GPU: median {statistics.median(to_kernel):.1f} us (of {len(calls)} calls)")


if __name__ == "__main__":
    main()
