"""How much of a call's time is the GPU waiting for the host, the op against SDPA on pre-gathered
segments (the floor), standard config (bf16, 12 heads, head_dim 64, segments [2048, 4096,
8192], rates [1, 2, 4], groups). Three numbers per call, median over rounds:

- per call: CUDA events around the call with the GPU idle before it (what bench_dilated.py
  reports);
- GPU only: the same with the GPU held busy (a sleep kernel) while the host enqueues the call,
  so only the kernels' own time remains;
- host: wall time of the Python call itself.

Variants are interleaved, one call each per round, and the order rotates every round: the card's
clock drifts within a run and the first call after a pause runs slower, so neither fixed blocks
nor a fixed order compare fairly. Also ``torch.compile(mode="reduce-overhead")`` (CUDA graphs
replay the launches) for the forward.

    python benchmarks/host_overhead.py [--seq-lens 16384 65536 262144]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import baselines  # noqa: E402

import dilated_ops  # noqa: E402

SEGS, RATES = [2048, 4096, 8192], [1, 2, 4]

try:
    from dilated_ops.kernels import triton_forward
except ImportError:
    triton_forward = None


def _no_replay(fn):
    """``fn()`` with the Triton forward's recorded-launch replay off (every launch through
    Triton's JIT and fresh views, as before the replay)."""
    triton_forward.REPLAY = False
    try:
        return fn()
    finally:
        triton_forward.REPLAY = True


def _timed(fn):
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    t0 = time.perf_counter()
    fn()
    t1 = time.perf_counter()
    e.record()
    torch.cuda.synchronize()
    return s.elapsed_time(e), (t1 - t0) * 1e3


def compare(variants, rounds):
    """{name: (per call, GPU only, host)} medians in ms."""
    for fn in variants.values():
        fn()
        fn()
    torch.cuda.synchronize()
    res = {name: ([], [], []) for name in variants}
    names = list(variants)
    for i in range(rounds):
        for name in names[i % len(names):] + names[: i % len(names)]:
            per_call, gpu, host = res[name]
            per_call.append(_timed(variants[name])[0])
            torch.cuda._sleep(40_000_000)  # tens of ms of GPU work queued ahead of the call
            t, h = _timed(variants[name])
            gpu.append(t)
            host.append(h)
    return {name: tuple(statistics.median(x) for x in r) for name, r in res.items()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq-lens", type=int, nargs="+", default=[16384, 65536, 262144])
    args = ap.parse_args()
    compiled = torch.compile(lambda q, k, v: dilated_ops.dilated_attention(q, k, v, SEGS, RATES),
                             mode="reduce-overhead", fullgraph=True)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; ms, median over rotated rounds")
    print("| n | pass | call | per call | GPU only | host |")
    print("|---|---|---|---|---|---|")
    for n in args.seq_lens:
        for grad in (False, True):
            torch.manual_seed(0)
            q, k, v = (torch.randn(1, n, 12, 64, device="cuda", dtype=torch.bfloat16, requires_grad=grad)
                       for _ in range(3))
            batches = baselines.pregather(q, k, v, SEGS, RATES)
            calls = {
                "dilated_ops.dilated_attention": lambda: [dilated_ops.dilated_attention(q, k, v, SEGS, RATES)],
                "torch.ops.dilated.dilated_attention": lambda: [
                    torch.ops.dilated.dilated_attention(q, k, v, SEGS, RATES, "groups", False)[0]],
                "SDPA, pre-gathered (floor)": lambda: baselines.pregathered(batches),
            }
            if not grad:
                calls["reduce-overhead compiled op"] = lambda: [compiled(q, k, v)]
            if triton_forward is not None:
                calls["dilated_ops.dilated_attention, no launch replay"] = lambda: _no_replay(
                    lambda: [dilated_ops.dilated_attention(q, k, v, SEGS, RATES)])

            def run(f, grad=grad):
                if not grad:
                    with torch.no_grad():
                        return f()
                outs = f()
                torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
                for t in (q, k, v, *(t for batch in batches for t in batch)):
                    t.grad = None  # else every call after the first adds into .grad (1 ms at 256K)

            res = compare({name: (lambda f=f: run(f)) for name, f in calls.items()}, 40 if n < 262144 or not grad else 20)
            for name, (per_call, gpu, host) in res.items():
                print(f"| {n} | {'fwd+bwd' if grad else 'fwd'} | {name} | {per_call:.3f} | {gpu:.3f} | {host:.3f} |",
                      flush=True)


if __name__ == "__main__":
    main()
