"""Private helpers of ``dilated-ops bench`` (:mod:`dilated_ops.cli.bench`), the one benchmark
command: timing, useful-FLOP counts, the baselines the op is compared with, and the two
profiles. Not package API.

Timing: on CUDA the median of CUDA-event timings after warm-up, peak memory from the caching
allocator; on the CPU the median of ``time.perf_counter`` timings after warm-up and no peak
memory (PyTorch keeps no allocator statistics on the CPU). Everything a table compares is
measured in one process, one row after another, so rows compare with each other and not with
another run's.
"""
from __future__ import annotations

import cProfile
import functools
import io
import pstats
import statistics
import time
from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .kernels.segments import head_groups


def useful_flops(n, h, d, segs, rates, mode, is_causal) -> float:
    """Useful forward FLOPs of the dilated op: per branch ``4 * heads_used * n * (w / r^2) * d``
    (halved when causal); the backward is counted as 2.5x the forward. Only the work the pattern
    needs: padding, fills and copies count for nothing, so implementations compare per FLOP."""
    heads = [hi - lo for lo, hi in head_groups(h, len(segs))] if mode == "groups" else [h] * len(segs)
    fwd = sum(4 * hh * n * (w / r**2) * d for hh, w, r in zip(heads, segs, rates))
    return fwd / (2 if is_causal else 1)


def decode_flops(n, h, d, segs, rates, mode) -> float:
    """Useful FLOPs of one decode step (a query at position ``n - 1`` against the ``n`` cached
    keys): ``4 * d`` per (head, key) pair the pattern reads, counting only the heads whose offset
    is the query's class in each branch; dense: ``4 * d * h * n``."""
    t = n - 1
    groups = head_groups(h, len(segs))
    total = 0
    for i, (w, r) in enumerate(zip(segs, rates)):
        start = t - t % w
        cls = (t - start) % r
        keys = len(range(start + cls, t + 1, r))
        heads = range(*groups[i]) if mode == "groups" else range(h)
        offsets = [i % r] * len(heads) if mode == "groups" else [j % r for j in heads]
        total += keys * sum(1 for o in offsets if o == cls)
    return 4 * d * total


def block_sparse_flops(layout, h, d, block_size, is_causal) -> float:
    """Forward FLOPs of block-sparse attention over ``layout`` ``(heads or 1, nb, nb)``: 4 * d
    per query-key pair of the active blocks (a causal diagonal block counts half)."""
    active = float(layout.expand(h, -1, -1).sum())
    if is_causal:
        active -= 0.5 * float(layout.expand(h, -1, -1).diagonal(dim1=-2, dim2=-1).sum())
    return 4 * d * block_size * block_size * active


def dense_flops(n, h, d, is_causal) -> float:
    """Forward FLOPs of dense attention over the whole sequence."""
    return 4 * h * n * n * d / (2 if is_causal else 1)


# Backward FLOPs per forward FLOP: five matmuls against the forward's two (FlashAttention's count).
BACKWARD_FLOP_FACTOR = 2.5


def _is_cuda(device) -> bool:
    return torch.device(device).type == "cuda"


# Long enough that the GPU is still busy when the host has enqueued any one call's kernels, so
# their launches never wait for the host.
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


def _fwd_bwd(make_out: Callable[[], Sequence[torch.Tensor]], params) -> Callable[[], None]:
    grads = None

    def step():
        nonlocal grads
        outs = make_out()
        if grads is None:
            grads = [torch.randn_like(o) for o in outs]
        torch.autograd.backward(outs, grads)
        for p in params:
            p.grad = None  # else every call after the first also adds into .grad
    return step


def measure(make_out: Callable[[], Sequence[torch.Tensor]], params, warmup: int, reps: int,
            device="cuda") -> Tuple[float, float, Optional[float]]:
    """(forward ms, forward+backward ms, peak GiB or None on CPU) of ``make_out()`` -> list of
    outputs; ``params`` are the leaves whose gradients the backward fills. Peak: max allocated
    during one forward+backward, inputs included."""
    fwd, fwd_bwd = _no_grad(make_out), _fwd_bwd(make_out, params)
    f = time_ms(fwd, warmup, reps, device)
    fb = time_ms(fwd_bwd, warmup, reps, device)
    if not _is_cuda(device):
        return f, fb, None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fwd_bwd()
    torch.cuda.synchronize()
    return f, fb, torch.cuda.max_memory_allocated() / 2**30


# Baselines (groups mode only; every segment length must divide the sequence length). Tensors
# are (batch, seq, heads, head_dim), as the op's.

def baseline_applies(n: int, segs: Sequence[int], mode: str) -> Optional[str]:
    """None if the gather baselines can run this shape, else why not."""
    if mode != "groups":
        return "the gather baselines implement groups mode only"
    bad = [w for w in segs if n % w]
    if bad:
        return f"the gather baselines need every segment length to divide seq_len {n}: {bad} do not"
    return None


@functools.lru_cache(maxsize=64)
def _positions(n: int, w: int, r: int, o: int, device: str) -> torch.Tensor:
    return (torch.arange(0, n, w).unsqueeze(1) + torch.arange(o, w, r).unsqueeze(0)).flatten().to(device)


def naive(q, k, v, segs, rates, is_causal=False):
    """What a straightforward implementation does: gather the dilated positions with an index
    tensor, SDPA, scatter back with ``index_copy``, autograd through the indexing."""
    b, n, h, d = q.shape
    outs = []
    for i, ((h0, h1), w, r) in enumerate(zip(head_groups(h, len(segs)), segs, rates)):
        idx = _positions(n, w, r, i % r, str(q.device))
        qs, ks, vs = (t[:, idx, h0:h1].reshape(b * (n // w), w // r, h1 - h0, d).transpose(1, 2) for t in (q, k, v))
        o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=is_causal)
        o = o.transpose(1, 2).reshape(b, -1, h1 - h0, d)
        outs.append(torch.zeros(b, n, h1 - h0, d, dtype=q.dtype, device=q.device).index_copy(1, idx, o) / len(segs))
    return torch.cat(outs, dim=2)


def pregather(q, k, v, segs, rates):
    """Contiguous ``(segments, heads, len, head_dim)`` q, k, v per branch, branches of one
    (len, heads) shape concatenated into one batch: new leaves (they require grad if q does)."""
    b, n, h, d = q.shape
    by_shape = {}
    for i, ((h0, h1), w, r) in enumerate(zip(head_groups(h, len(segs)), segs, rates)):
        idx = _positions(n, w, r, i % r, str(q.device))
        parts = tuple(t[:, idx, h0:h1].reshape(b * (n // w), w // r, h1 - h0, d).transpose(1, 2).contiguous()
                      for t in (q, k, v))
        by_shape.setdefault((w // r, h1 - h0), []).append(parts)
    return [tuple(torch.cat(p, 0).detach().requires_grad_(q.requires_grad) for p in zip(*group))
            for group in by_shape.values()]


def pregathered(batches, is_causal=False):
    """SDPA on segments gathered beforehand (:func:`pregather`): no gather, no scatter, no
    fill, one attention call per shape; the floor for the views-plus-attention-kernel design."""
    return [F.scaled_dot_product_attention(q, k, v, is_causal=is_causal) for q, k, v in batches]


def dense(q, k, v, is_causal=False, keep=None):
    """Full SDPA over the whole sequence; k, v may have fewer heads (``enable_gqa``); ``keep``
    ``(batch, seq)`` bool: a key padding mask (not with ``is_causal``: SDPA takes one or the other)."""
    mask = None if keep is None else keep[:, None, None, :]
    gqa = {"enable_gqa": True} if k.shape[2] != q.shape[2] else {}
    return F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), attn_mask=mask,
                                          is_causal=is_causal, **gqa).transpose(1, 2)


# Profiles.

def kernel_profile(step: Callable[[], None], device, row_limit: int = 14) -> str:
    """torch.profiler table of one ``step()`` after three warm-up steps: on CUDA the kernels
    sorted by their GPU time, on the CPU the operators sorted by CPU time."""
    from torch.profiler import ProfilerActivity, profile
    cuda = _is_cuda(device)
    for _ in range(3):
        step()
    if cuda:
        torch.cuda.synchronize()
    activities = [ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
    with profile(activities=activities) as prof:
        step()
        if cuda:
            torch.cuda.synchronize()
    sort_by = "device_time_total" if cuda else "cpu_time_total"
    return prof.key_averages().table(sort_by=sort_by, row_limit=row_limit, max_name_column_width=70)


def host_profile(call: Callable[[], None], device, reps: int = 200, row_limit: int = 25) -> str:
    """cProfile of ``reps`` calls of ``call()`` (after three warm-up calls), sorted by each
    function's own time: where the host time of a call goes. On CUDA each call is followed by a
    synchronize outside the profiled region, so the GPU's queue never backs up into the host."""
    cuda = _is_cuda(device)
    for _ in range(3):
        call()
    if cuda:
        torch.cuda.synchronize()
    prof = cProfile.Profile()
    for _ in range(reps):
        prof.enable()
        call()
        prof.disable()
        if cuda:
            torch.cuda.synchronize()
    s = io.StringIO()
    stats = pstats.Stats(prof, stream=s)
    stats.sort_stats("tottime").print_stats(row_limit)
    return s.getvalue()


def flex_block_mask(layout: torch.Tensor, n: int, block_size: int, is_causal: bool):
    """FlexAttention's ``BlockMask`` of a block-sparse layout ``(heads or 1, nb, nb)``, built
    from the block lists (never an n x n mask): blocks wholly visible are "full" (no mask_mod
    call), the causal diagonal the only partial ones. Needs ``n % block_size == 0``."""
    from torch.nn.attention.flex_attention import BlockMask

    nb = layout.shape[-1]
    eye = torch.eye(nb, dtype=torch.bool, device=layout.device)
    partial = layout & eye if is_causal else torch.zeros_like(layout)
    full = layout & ~partial

    def lists(blocks):
        counts = blocks.sum(-1, dtype=torch.int32)
        order = torch.sort(blocks.to(torch.int8), dim=-1, descending=True, stable=True).indices.to(torch.int32)
        return counts[None].contiguous(), order[None].contiguous()

    def causal(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    kv_num, kv_idx = lists(partial)
    full_num, full_idx = lists(full)
    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=block_size,
                                    mask_mod=causal if is_causal else None, seq_lengths=(n, n))


_FLEX = None


def flex(q, k, v, block_mask):
    """Compiled FlexAttention of q, k, v ``(batch, seq, heads, head_dim)`` under ``block_mask``."""
    global _FLEX
    if _FLEX is None:
        from torch.nn.attention.flex_attention import flex_attention
        _FLEX = torch.compile(flex_attention, dynamic=False)
    return _FLEX(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=block_mask).transpose(1, 2)
