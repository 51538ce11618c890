"""Host time per call of the op's forward (CUDA, tiny inputs, so the GPU waits on the host):
how much Python and launch work one call costs, and where it goes (cProfile, top entries).

    python benchmarks/host_overhead.py
"""
from __future__ import annotations

import cProfile
import pstats
import time

import torch

import dilated_ops
from dilated_ops import _checks
from dilated_ops.kernels.dilated import dilated_attention_forward


def per_call_us(fn, reps=300):
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    host = (time.perf_counter() - start) / reps * 1e6
    torch.cuda.synchronize()
    return host


def main():
    segs, rates = [2048, 4096, 8192], [1, 2, 4]
    q, k, v = (torch.randn(1, 8192, 12, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    with torch.no_grad():
        rows = {
            "op, backend auto (Triton)": lambda: dilated_ops.dilated_attention(q, k, v, segs, rates),
            "torch.ops.dilated.dilated_attention": lambda: torch.ops.dilated.dilated_attention(
                q, k, v, segs, rates, "groups", False),
            "kernel function only": lambda: dilated_attention_forward(q, k, v, segs, rates),
            "argument checks only": lambda: _checks.check_dilated_args(
                q, k, v, segs, rates, "groups", None, 0.0, "auto"),
            "op, backend sdpa": lambda: dilated_ops.dilated_attention(q, k, v, segs, rates, backend="sdpa"),
            "one SDPA call (reference point)": lambda: torch.nn.functional.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)),
        }
        print("host us per call (n=8192, 12 heads, d=64, bf16, no grad)")
        for name, fn in rows.items():
            print(f"  {name:34s} {per_call_us(fn):8.1f}")
        for n in (2048, 8192, 65536):
            qq, kk, vv = (torch.randn(1, n, 12, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
            fn = lambda: dilated_ops.dilated_attention(qq, kk, vv, [min(w, n) for w in segs], rates)
            for _ in range(10):
                fn()
            torch.cuda.synchronize()
            gpu = []
            for _ in range(30):
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                s.record(); fn(); e.record(); torch.cuda.synchronize()
                gpu.append(s.elapsed_time(e) * 1e3)
            t0 = time.perf_counter()
            for _ in range(30):
                fn(); torch.cuda.synchronize()
            synced = (time.perf_counter() - t0) / 30 * 1e6
            print(f"n={n}: per call, synchronized: wall {synced:.0f} us; event-timed {sorted(gpu)[15]:.0f} us")
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
            for _ in range(20):
                rows["op, backend auto (Triton)"]()
            torch.cuda.synchronize()
        print(p.key_averages().table(sort_by="cpu_time_total", row_limit=25, max_name_column_width=60))
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(200):
            rows["op, backend auto (Triton)"]()
        prof.disable()
        torch.cuda.synchronize()
        pstats.Stats(prof).sort_stats("tottime").print_stats(15)
    # forward+backward at a short sequence: host-bound, so wall time per call is host time
    qg, kg, vg = (t[:, :2048].clone().requires_grad_() for t in (q, k, v))
    grad = torch.randn_like(qg)

    def fwd_bwd():
        dilated_ops.dilated_attention(qg, kg, vg, [512, 1024, 2048], rates).backward(grad)

    for _ in range(10):
        fwd_bwd()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(50):
        fwd_bwd()
    torch.cuda.synchronize()
    print(f"fwd+bwd n=2048: {(time.perf_counter() - t0) / 50 * 1e6:.0f} us per call")
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(50):
        fwd_bwd()
    torch.cuda.synchronize()
    prof.disable()
    pstats.Stats(prof).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
