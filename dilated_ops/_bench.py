"""Timing shared by ``benchmarks/bench_dilated.py`` and ``dilated-ops bench``: one way to time
things. CUDA: median of CUDA-event timings after warm-up, peak memory from the caching
allocator. CPU: median of ``time.perf_counter`` timings after warm-up; no peak memory (PyTorch
keeps no allocator statistics on the CPU)."""
from __future__ import annotations

import statistics
import time
from typing import Callable, List, Optional, Sequence, Tuple

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


# About 20 ms of GPU sleep: longer than any call's host work, so the call's kernels are all
# queued before the GPU reaches them.
_SLEEP_CYCLES = 40_000_000


def times_ms(fn: Callable[[], object], warmup: int, reps: int, device="cuda", gpu_only: bool = False) -> List[float]:
    """Milliseconds of each of ``reps`` runs of ``fn()`` after ``warmup`` runs. ``gpu_only``
    (CUDA): the GPU is held busy by a sleep kernel while the host enqueues ``fn``, so the time
    the GPU would wait for the host's first launch drops out and only the kernels' time is left."""
    cuda = _is_cuda(device)
    if gpu_only and not cuda:
        raise ValueError(f"gpu_only needs a CUDA device, got device={device!r}")
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            if gpu_only:
                torch.cuda._sleep(_SLEEP_CYCLES)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def time_ms(fn: Callable[[], object], warmup: int, reps: int, device="cuda") -> float:
    """Median milliseconds of ``fn()`` over ``reps`` runs after ``warmup`` runs."""
    return statistics.median(times_ms(fn, warmup, reps, device))


def _no_grad(make_out: Callable[[], Sequence[torch.Tensor]]) -> Callable[[], None]:
    def fwd():
        with torch.no_grad():
            make_out()
    return fwd


def forward_spread(make_out: Callable[[], Sequence[torch.Tensor]], warmup: int, reps: int,
                   device="cuda") -> Tuple[float, float, float, Optional[float]]:
    """(p10, median, p90 ms, median GPU-only ms or None on CPU) of ``make_out()`` without grad:
    whether a slow median is the host (per call up, GPU-only not) or the GPU (both up)."""
    if reps < 2:
        raise ValueError(f"reps must be at least 2 for a spread, got reps={reps}")
    fwd = _no_grad(make_out)
    deciles = statistics.quantiles(times_ms(fwd, warmup, reps, device), n=10, method="inclusive")
    gpu = statistics.median(times_ms(fwd, 1, reps, device, gpu_only=True)) if _is_cuda(device) else None
    return deciles[0], deciles[4], deciles[8], gpu


def measure(make_out: Callable[[], Sequence[torch.Tensor]], params, warmup: int, reps: int,
            device="cuda") -> Tuple[float, float, Optional[float]]:
    """(forward ms, forward+backward ms, peak GiB or None on CPU) of ``make_out()`` -> list of
    outputs. Peak: max allocated during one forward+backward, inputs included."""
    fwd = _no_grad(make_out)
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
