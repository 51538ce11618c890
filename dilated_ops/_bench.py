"""Timing shared by ``benchmarks/bench_dilated.py`` and ``dilated-ops bench``: one way to time
things. CUDA: median of CUDA-event timings after warm-up, peak memory from the caching
allocator. CPU: median of ``time.perf_counter`` timings after warm-up; no peak memory (PyTorch
keeps no allocator statistics on the CPU)."""
from __future__ import annotations

import statistics
import time
from typing import Callable, Optional, Sequence, Tuple

import torch

from .kernels.segments import head_groups


def set_triton(enabled: bool) -> None:
    """Turns our Triton forward on or off for the whole process (same as ``backend="sdpa"``)."""
    try:
        from .kernels import triton_forward
    except ImportError:
        return
    triton_forward.ENABLED = enabled


def useful_flops(n, h, d, segs, rates, mode, is_causal) -> float:
    """Useful forward FLOPs of the dilated op: per branch ``4 * heads_used * n * (w / r^2) * d``
    (halved when causal); the backward is counted as 2.5x the forward."""
    heads = [hi - lo for lo, hi in head_groups(h, len(segs))] if mode == "groups" else [h] * len(segs)
    fwd = sum(4 * hh * n * (w / r**2) * d for hh, w, r in zip(heads, segs, rates))
    return fwd / (2 if is_causal else 1)


def dense_flops(n, h, d, is_causal) -> float:
    """Forward FLOPs of dense attention over the whole sequence."""
    return 4 * h * n * n * d / (2 if is_causal else 1)


def _is_cuda(device) -> bool:
    return torch.device(device).type == "cuda"


def time_ms(fn: Callable[[], object], warmup: int, reps: int, device="cuda") -> float:
    """Median milliseconds of ``fn()`` over ``reps`` runs after ``warmup`` runs."""
    cuda = _is_cuda(device)
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def measure(make_out: Callable[[], Sequence[torch.Tensor]], params, warmup: int, reps: int,
            device="cuda") -> Tuple[float, float, Optional[float]]:
    """(forward ms, forward+backward ms, peak GiB or None on CPU) of ``make_out()`` -> list of
    outputs. Peak: max allocated during one forward+backward, inputs included."""
    def fwd():
        with torch.no_grad():
            make_out()

    grads = None

    def fwd_bwd():
        outs = make_out()
        nonlocal grads
        if grads is None:
            grads = [torch.randn_like(o) for o in outs]
        torch.autograd.backward(outs, grads)
        for p in params:
            p.grad = None

    f = time_ms(fwd, warmup, reps, device)
    fb = time_ms(fwd_bwd, warmup, reps, device)
    if not _is_cuda(device):
        return f, fb, None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fwd_bwd()
    torch.cuda.synchronize()
    return f, fb, torch.cuda.max_memory_allocated() / 2**30
