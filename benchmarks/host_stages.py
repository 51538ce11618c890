"""Host microseconds of each stage of one no-grad forward on the GPU machine (standard config,
n = 262144), the GPU held busy so no launch waits: which part of the host path before the first
kernel costs what. Median of 2000 calls per stage.

    python benchmarks/host_stages.py
"""
from __future__ import annotations

import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import baselines  # noqa: E402

import dilated_ops  # noqa: E402
from dilated_ops import _checks  # noqa: E402
from dilated_ops.kernels import dilated, triton_forward  # noqa: E402

SEGS, RATES = [2048, 4096, 8192], [1, 2, 4]


def us(fn, reps=2000):
    times = []
    for i in range(reps):
        if i % 100 == 0:
            torch.cuda.synchronize()
            torch.cuda._sleep(100_000_000)
        t0 = time.perf_counter_ns()
        fn()
        times.append((time.perf_counter_ns() - t0) / 1e3)
    torch.cuda.synchronize()
    return statistics.median(times)


def main():
    reg = sys.modules["dilated_ops.registrations.dilated_attention"]
    n = 262144
    q, k, v = (torch.randn(1, n, 12, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    out, lse = dilated.dilated_attention_forward(q, k, v, SEGS, RATES)
    calls = dilated.plan(12, tuple(SEGS), tuple(RATES), "groups")
    scale = 0.125
    config = (tuple(SEGS), tuple(RATES))
    key = triton_forward.layout_key(q, k, v, out, lse, False, scale, *config)
    rec = triton_forward.recorded(key)
    assert rec is not None
    batches = baselines.pregather(q, k, v, SEGS, RATES)
    L = rec.launches[0]
    stream = triton_forward.triton.runtime.driver.active.get_current_stream(0)
    ptrs = [q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), lse.data_ptr()]
    p0 = [b + o for b, o in zip(ptrs, L.offsets)]
    if L.tma is not None:
        for i, (shape, strides, block) in enumerate(L.tma):
            p0[i] = triton_forward._Descriptor(p0[i], shape, strides, block)
    triton_forward.replay(rec, q, k, v, out, lse)
    direct_launch, direct_args = next(iter(rec.ready.values()))[0] if rec.ready else (lambda: None, ())
    stages = {
        "check_dilated_args": lambda: _checks.check_dilated_args(q, k, v, SEGS, RATES, "groups", None, 0.0, "auto"),
        "_plain_eager": lambda: reg._plain_eager(q, k, v),
        "_has_tangent": lambda: reg._has_tangent(q, k, v),
        "torch.is_grad_enabled": torch.is_grad_enabled,
        "plan": lambda: dilated.plan(12, tuple(SEGS), tuple(RATES), "groups"),
        "_dense_last x3": lambda: (dilated._dense_last(q), dilated._dense_last(k), dilated._dense_last(v)),
        "_triton_forward": lambda: dilated._triton_forward(q, 0.0, scale),
        "empty_output + empty lse": lambda: (dilated.empty_output(q), torch.empty((1, n, 12), dtype=torch.float32, device=q.device)),
        "layout_key": lambda: triton_forward.layout_key(q, k, v, out, lse, False, scale, *config),
        "get_current_stream": lambda: triton_forward.triton.runtime.driver.active.get_current_stream(0),
        "one launch, Triton's path (kernel[grid](...))": lambda: L.kernel[L.grid](*p0, *L.rest, stream=stream),
        "one launch, its C launcher (argument set built)": lambda: direct_launch(*direct_args),
        "replay (3 launches)": lambda: triton_forward.replay(rec, q, k, v, out, lse),
        "_groups_triton": lambda: dilated._groups_triton(triton_forward, q, k, v, calls, False, scale, torch.float32, config),
        "dilated_attention_forward": lambda: dilated.dilated_attention_forward(q, k, v, SEGS, RATES),
        "dilated_ops.dilated_attention (no grad)": lambda: dilated_ops.dilated_attention(q, k, v, SEGS, RATES),
        "floor: F.sdpa on pre-gathered": lambda: baselines.pregathered(batches),
    }
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, host us per call (median of 2000)")
    with torch.no_grad():
        for _ in range(2):  # the second pass is the one to read (warm caches)
            res = {name: us(fn) for name, fn in stages.items()}
        for name, t in res.items():
            print(f"| {name:<42} | {t:8.1f} |")


if __name__ == "__main__":
    main()
