"""Triton forward of dilated attention that reads the strided segment views and writes the
output (scaled by the combine weight) and the log-sum-exp in place: no gather, no copy of the
attention output, which is what separates views + SDPA from the pre-gathered floor.

Takes the pieces of :func:`segments.segment_views` directly: q, k, v, out
``(batch, segments, len, heads, head_dim)`` and lse ``(batch, segments, len, heads)``, any
strides with a unit stride on head_dim. One program per (query tile, batch, segment, head).
CUDA only, float16/bfloat16, head_dim 16..128 (power of two), no dropout: :func:`supported`.
Imported only when those hold, so CPU installs need no Triton.

A call's launches are recorded per input layout (:func:`layout_key`) and replayed on later calls
(:func:`replay`) through the compiled kernel's C launcher: the GPU idles until the host issues the
first launch, and Triton's JIT and Python launch paths and the strided views were most of that
host time.
"""
from __future__ import annotations

import os
import threading
from typing import Callable, Dict, NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl

from .attention import device_capability

# Tile configuration per head_dim: (BLOCK_M, BLOCK_N, num_warps, num_stages), from
# benchmarks/sweep_triton.py on the H100 (64x64, 4 warps, 3 stages was best at d=64).
CONFIGS = {16: (64, 64, 4, 3), 32: (64, 64, 4, 3), 64: (64, 64, 4, 3), 128: (128, 128, 8, 3)}
# Where the op uses it: head dims where it measured faster than SDPA on views + copy
# (d=64: 2.44 vs 2.74 ms; d=128: 4.46 vs 3.88 ms, so not there).
FASTER_HEAD_DIMS = (64,)
ENABLED = os.environ.get("DILATED_OPS_TRITON", "1") != "0"

# Load q, k, v through host-built 5-D TMA descriptors on Hopper when the views are 16-byte
# aligned (measured 2.45 vs 2.65 ms with pointer loads at 256K, same run), else pointer loads.
USE_TMA = (
    os.environ.get("DILATED_OPS_TMA", "1") != "0"
    and torch.cuda.is_available()
    and torch.cuda.get_device_capability() >= (9, 0)
)

_LOG2E = 1.4426950408889634


def supported(q: torch.Tensor, dropout_p: float, scale: float) -> bool:
    # scale > 0: the running max is taken on the unscaled scores (one FMA per score).
    return (
        ENABLED
        and scale > 0
        and q.is_cuda
        and q.dtype in (torch.float16, torch.bfloat16)
        and q.shape[-1] in FASTER_HEAD_DIMS
        and dropout_p == 0.0
        and device_capability(q.device) >= (8, 0)
    )


@triton.jit
def _update(acc, l_i, m_i, qk, cols, offs_m, L, v, qk_scale, IS_CAUSAL: tl.constexpr, MASKED: tl.constexpr):
    """One online-softmax step over a key tile: ``qk`` raw scores (scaled here by ``qk_scale``,
    which includes log2(e), folded into one FMA with the max subtraction), ``v`` the tile's
    values; masks keys past ``L`` and, when causal, after the query."""
    if MASKED:
        keep = cols[None, :] < L
        if IS_CAUSAL:
            keep = keep & (cols[None, :] <= offs_m[:, None])
        qk = tl.where(keep, qk, float("-inf"))
    m_ij = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
    p32 = tl.math.exp2(qk * qk_scale - m_ij[:, None])
    l_ij = tl.sum(p32, 1)
    p = p32.to(v.dtype)
    alpha = tl.math.exp2(m_i - m_ij)
    l_i = l_i * alpha + l_ij
    acc = tl.dot(p, v, acc * alpha[:, None])
    return acc, l_i, m_ij


@triton.jit
def _tile(acc, l_i, m_i, q, k_base, v_base, stride_kl, stride_vl, offs_m, offs_n, offs_d,
          start_n, L, qk_scale, IS_CAUSAL: tl.constexpr, MASKED: tl.constexpr):
    cols = start_n + offs_n
    if MASKED:
        k = tl.load(k_base + cols[None, :] * stride_kl + offs_d[:, None], mask=cols[None, :] < L, other=0.0)
        v = tl.load(v_base + cols[:, None] * stride_vl + offs_d[None, :], mask=cols[:, None] < L, other=0.0)
    else:
        k = tl.load(k_base + cols[None, :] * stride_kl + offs_d[:, None])
        v = tl.load(v_base + cols[:, None] * stride_vl + offs_d[None, :])
    qk = tl.dot(q, k)
    return _update(acc, l_i, m_i, qk, cols, offs_m, L, v, qk_scale, IS_CAUSAL, MASKED)


@triton.jit
def _tile_tma(acc, l_i, m_i, q, k_desc, v_desc, b, s, h, offs_m, offs_n, start_n, L, qk_scale,
              HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, IS_CAUSAL: tl.constexpr, MASKED: tl.constexpr):
    # TMA zero-fills rows past L, so only the scores need masking.
    k = k_desc.load([b, s, start_n, h, 0]).reshape(BLOCK_N, HEAD_DIM)
    v = v_desc.load([b, s, start_n, h, 0]).reshape(BLOCK_N, HEAD_DIM)
    qk = tl.dot(q, k.T)
    return _update(acc, l_i, m_i, qk, start_n + offs_n, offs_m, L, v, qk_scale, IS_CAUSAL, MASKED)


@triton.jit
def _dilated_fwd(
    Q, K, V, O, LSE,
    sqb, sqs, sql, sqh,
    skb, sks, skl, skh,
    svb, svs, svl, svh,
    sob, sos, sol, soh,
    slb, sls, sll, slh,
    S, H, L, qk_scale, out_scale, R, OFF, son, sln,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IS_CAUSAL: tl.constexpr,
    USE_TMA: tl.constexpr, FILL: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_z = tl.program_id(1).to(tl.int64)
    h = pid_z % H
    bs = pid_z // H
    s = bs % S
    b = bs // S
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    # Tiles wholly inside the sequence (and, when causal, wholly below the diagonal) need no
    # mask; the rest (the ragged end, the diagonal) do.
    full_end = (L // BLOCK_N) * BLOCK_N
    if IS_CAUSAL:
        full_end = tl.minimum(full_end, m0)
        hi = tl.minimum(L, m0 + BLOCK_M)
    else:
        hi = L
    if USE_TMA:
        # Host-built 5-D descriptors over the (batch, segments, len, heads, head_dim) views.
        bi, si, hi32 = b.to(tl.int32), s.to(tl.int32), h.to(tl.int32)
        q = Q.load([bi, si, m0, hi32, 0]).reshape(BLOCK_M, HEAD_DIM)
        for start_n in range(0, full_end, BLOCK_N):
            acc, l_i, m_i = _tile_tma(acc, l_i, m_i, q, K, V, bi, si, hi32, offs_m, offs_n, start_n, L,
                                      qk_scale, HEAD_DIM, BLOCK_N, IS_CAUSAL, False)
        for start_n in range(full_end, hi, BLOCK_N):
            acc, l_i, m_i = _tile_tma(acc, l_i, m_i, q, K, V, bi, si, hi32, offs_m, offs_n, start_n, L,
                                      qk_scale, HEAD_DIM, BLOCK_N, IS_CAUSAL, True)
    else:
        q_base = Q + b * sqb + s * sqs + h * sqh
        k_base = K + b * skb + s * sks + h * skh
        v_base = V + b * svb + s * svs + h * svh
        q = tl.load(q_base + offs_m[:, None] * sql + offs_d[None, :], mask=offs_m[:, None] < L, other=0.0)
        for start_n in range(0, full_end, BLOCK_N):
            acc, l_i, m_i = _tile(acc, l_i, m_i, q, k_base, v_base, skl, svl, offs_m, offs_n, offs_d,
                                  start_n, L, qk_scale, IS_CAUSAL, False)
        for start_n in range(full_end, hi, BLOCK_N):
            acc, l_i, m_i = _tile(acc, l_i, m_i, q, k_base, v_base, skl, svl, offs_m, offs_n, offs_d,
                                  start_n, L, qk_scale, IS_CAUSAL, True)

    acc = acc * (out_scale / l_i)[:, None]
    row_ok = offs_m < L
    o_base = O + b * sob + s * sos + h * soh
    tl.store(o_base + offs_m[:, None] * sol + offs_d[None, :], acc.to(O.dtype.element_ty), mask=row_ok[:, None])
    lse = (m_i + tl.math.log2(l_i)) * 0.6931471805599453
    l_base = LSE + b * slb + s * sls + h * slh
    tl.store(l_base + offs_m * sll, lse, mask=row_ok)
    if FILL:
        # The same rows at the segment's other R - 1 offsets belong to no branch of these heads
        # (groups mode): zero and -inf them here instead of a fill pass over out and lse before
        # the launches (one fewer kernel; son, sln: out's and lse's stride of one position).
        zeros = tl.zeros([BLOCK_M, HEAD_DIM], O.dtype.element_ty)
        ninf = tl.full([BLOCK_M], float("-inf"), LSE.dtype.element_ty)
        for t in range(1, R):
            delta = (OFF + t) % R - OFF
            tl.store(o_base + delta * son + offs_m[:, None] * sol + offs_d[None, :], zeros, mask=row_ok[:, None])
            tl.store(l_base + delta * sln + offs_m * sll, ninf, mask=row_ok)


def _launch_args(q, k, v, out, lse, is_causal: bool, scale: float, out_scale: float,
                 fill: Optional[Tuple[int, int]]):
    """``(grid, kernel arguments after the five tensors, keyword options, use_tma)`` of one
    launch over the pieces q, k, v, out, lse (see :func:`forward_into`)."""
    b, s, length, h, d = q.shape
    block_m, block_n, warps, stages = CONFIGS[d]
    rate, offset = fill if fill is not None else (1, 0)
    grid = (triton.cdiv(length, block_m), b * s * h, 1)
    use_tma = USE_TMA and all(
        t.data_ptr() % 16 == 0 and all(st * t.element_size() % 16 == 0 for st in t.stride()[:4])
        for t in (q, k, v)
    )
    rest = (
        *q.stride()[:4], *k.stride()[:4], *v.stride()[:4], *out.stride()[:4], *lse.stride(),
        s, h, length, scale * _LOG2E, out_scale, rate, offset, out.stride(2) // rate, lse.stride(2) // rate,
    )
    constexprs = dict(HEAD_DIM=d, BLOCK_M=block_m, BLOCK_N=block_n, IS_CAUSAL=is_causal, USE_TMA=use_tma,
                      FILL=rate > 1)
    return grid, rest, constexprs, dict(num_warps=warps, num_stages=stages), use_tma


def forward_into(q, k, v, out, lse, is_causal: bool, scale: float, out_scale: float,
                 fill: Optional[Tuple[int, int]] = None, bases=None):
    """Attention over each (batch, segment, head) of the 5-D pieces q, k, v; writes
    ``out_scale * softmax(q k^T scale) v`` into ``out`` and the natural-log lse into ``lse``.

    ``fill = (rate, offset)``: the pieces are full segments of a branch with that rate and
    offset (out and lse views of the whole sequence); also write 0 / -inf at every other offset
    of those segments, the positions no branch selects for these heads in groups mode.

    ``bases``: the tensors ``(q, k, v, out, lse)`` the pieces are views of; then the launch is
    returned as a :class:`Launch` that :func:`replay` repeats on other tensors of the same
    layout (None when nothing was launched)."""
    b, s, length, h, d = q.shape
    if length == 0 or b * s * h == 0:
        return None
    grid, rest, constexprs, options, use_tma = _launch_args(q, k, v, out, lse, is_causal, scale, out_scale, fill)
    if use_tma:
        from triton.tools.tensor_descriptor import TensorDescriptor

        block_m, block_n = constexprs["BLOCK_M"], constexprs["BLOCK_N"]
        descs = (
            TensorDescriptor.from_tensor(q, [1, 1, block_m, 1, d]),
            TensorDescriptor.from_tensor(k, [1, 1, block_n, 1, d]),
            TensorDescriptor.from_tensor(v, [1, 1, block_n, 1, d]),
        )
    else:
        descs = (q, k, v)
    kernel = _dilated_fwd[grid](*descs, out, lse, *rest, **constexprs, **options)
    if bases is None or not REPLAY:
        return None
    offsets = tuple(t.data_ptr() - base.data_ptr() for t, base in zip((q, k, v, out, lse), bases))
    tma = tuple((tuple(x.shape), tuple(x.strides), tuple(x.block_shape)) for x in descs) if use_tma else None
    return Launch(kernel, grid, offsets, tma, rest + tuple(constexprs.values()))


# Replaying recorded launches: the host work of a launch through Triton's JIT (binding and
# specializing 40 arguments, building descriptors, the cache lookup) and of the strided views is
# done once per input layout. Each launch then goes straight to the compiled kernel's C launcher
# with its final arguments, built once per set of base pointers (and stream): Triton's Python
# launch path (launch metadata, scratch closures, one cuTensorMapEncode per TMA descriptor) cost
# 23 us per launch on the H100 machine's host, and the GPU waits for the first. Checked against
# Triton 3.6's launcher (pointers as ints, host descriptors read through .base.data_ptr(), .shape,
# .strides, .padding; the C launcher's leading arguments); other versions take the plain path every
# call, as does DILATED_OPS_TRITON_REPLAY=0. With a launch hook set (a profiler such as proton),
# replays go through Triton's launch path, which calls it.
REPLAY = (
    os.environ.get("DILATED_OPS_TRITON_REPLAY", "1") != "0"
    and tuple(int(x) for x in triton.__version__.split(".")[:2]) == (3, 6)
)
_MAX_LAYOUTS = 256
_MAX_POINTER_SETS = 16  # per layout: the argument tuples of the last few calls' base pointers
_LAUNCHES: Dict[tuple, "Recorded"] = {}
_RECORD_LOCK = threading.Lock()  # lookups need none: a dict read is atomic


class Launch(NamedTuple):
    """One recorded launch: the compiled kernel, its grid, the byte offsets of the q, k, v, out,
    lse pieces from their base tensors, the q, k, v descriptors' (shape, strides, block) when
    it loads through TMA, and the remaining arguments (constexprs last, as Triton passes them)."""

    kernel: object
    grid: Tuple[int, int, int]
    offsets: Tuple[int, ...]
    tma: Optional[tuple]
    rest: tuple


class Direct(NamedTuple):
    """A compiled kernel's C launcher and what it takes besides the stream and the kernel's own
    arguments; ``expand`` turns those into the C launcher's (host descriptors into CUtensorMaps)."""

    launch: Callable
    expand: Callable
    head: tuple  # (grid x, y, z)
    tail: tuple  # function .. launch exit hook: the C launcher's arguments after the stream


class Recorded:
    """The launches of one layout, their direct launchers (None where Triton's launcher is not
    the one this module knows) and the C launchers' argument tuples per (stream, base pointers)."""

    __slots__ = ("launches", "direct", "ready")

    def __init__(self, launches: Tuple[Launch, ...]):
        self.launches = launches
        direct = tuple(_direct(x.kernel, x.grid) for x in launches)
        self.direct = direct if all(d is not None for d in direct) else None
        self.ready: Dict[tuple, tuple] = {}


def _direct(kernel, grid) -> Optional[Direct]:
    """The C launcher behind ``kernel[grid](...)`` (Triton 3.6's ``CudaLauncher``), or None."""
    try:
        from triton.backends.nvidia import driver as nvidia

        launcher = kernel.run
        if launcher.global_scratch_size or launcher.profile_scratch_size:
            return None  # scratch is allocated per launch
        expand = nvidia.wrap_handle_tensordesc(_identity, kernel.src.signature,
                                               getattr(kernel.metadata, "tensordesc_meta", None))
        c_launch = launcher.launch
        if expand is not _identity:  # Triton wrapped its C launcher to expand the descriptors
            cells = dict(zip(c_launch.__code__.co_freevars, (c.cell_contents for c in c_launch.__closure__)))
            c_launch = cells["launcher"]
        tail = (kernel.function, launcher.launch_cooperative_grid, launcher.launch_pdl, None, None,
                kernel.packed_metadata, None, None, None)
        return Direct(c_launch, expand, tuple(grid), tail)
    except (AttributeError, KeyError, TypeError, ImportError):
        return None


def _identity(*args):
    return args


class _Address:
    __slots__ = ("ptr",)

    def __init__(self, ptr: int):
        self.ptr = ptr

    def data_ptr(self) -> int:
        return self.ptr


class _Descriptor:
    """A host TMA descriptor as Triton's launcher reads it, without TensorDescriptor's checks
    (made on the recorded launch)."""

    __slots__ = ("base", "shape", "strides", "block_shape")
    padding = "zero"

    def __init__(self, ptr: int, shape, strides, block_shape):
        self.base = _Address(ptr)
        self.shape, self.strides, self.block_shape = shape, strides, block_shape


def layout_key(q, k, v, out, lse, *config) -> tuple:
    """What fixes the launches of a call: shapes, strides, dtype, device, the 16-byte alignment
    of every base pointer (Triton specializes on it), the tile configuration and ``config``."""
    d = q.shape[-1]
    return (
        q.shape, q.stride(), k.stride(), v.stride(), out.stride(), lse.stride(), q.dtype, q.device.index,
        q.data_ptr() % 16, k.data_ptr() % 16, v.data_ptr() % 16, out.data_ptr() % 16, lse.data_ptr() % 16,
        USE_TMA, CONFIGS.get(d), *config,
    )


def recorded(key: tuple) -> Optional[Recorded]:
    """The launches recorded for ``key``; None if none are, or replay is off."""
    return _LAUNCHES.get(key) if REPLAY else None


def record(key: tuple, launches) -> None:
    """Keep the launches of one call (:func:`forward_into`'s results) for ``key``; the oldest
    layout goes once ``_MAX_LAYOUTS`` are kept."""
    launches = tuple(x for x in launches if x is not None)  # None: an empty piece, no launch
    if not REPLAY or any(x.kernel is None for x in launches):
        return
    rec = Recorded(launches)
    with _RECORD_LOCK:
        if len(_LAUNCHES) >= _MAX_LAYOUTS:
            _LAUNCHES.pop(next(iter(_LAUNCHES)))
        _LAUNCHES[key] = rec


def clear_recorded() -> None:
    with _RECORD_LOCK:
        _LAUNCHES.clear()


def num_recorded() -> int:
    return len(_LAUNCHES)


def _kernel_args(launch: Launch, ptrs) -> list:
    """``launch``'s kernel arguments for base pointers ``ptrs`` (q, k, v, out, lse)."""
    p = [base + off for base, off in zip(ptrs, launch.offsets)]
    if launch.tma is not None:
        for i, (shape, strides, block) in enumerate(launch.tma):
            p[i] = _Descriptor(p[i], shape, strides, block)
    return [*p, *launch.rest]


def _hook_set(hook) -> bool:
    # Triton 3.6 keeps each launch hook as a HookChain (its ``calls`` empty when none is added);
    # a plain callable assigned in its place counts as set.
    calls = getattr(hook, "calls", None)
    return bool(calls) if isinstance(calls, list) else hook is not None


def _hooked() -> bool:
    rt = triton.knobs.runtime
    return _hook_set(rt.launch_enter_hook) or _hook_set(rt.launch_exit_hook)


def replay(rec: Recorded, q, k, v, out, lse) -> None:
    """Repeat the launches of ``rec`` (recorded by :func:`forward_into` for tensors of this
    layout) on q, k, v, out, lse ``(batch, seq, heads, ...)``."""
    ptrs = (q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), lse.data_ptr())
    stream = triton.runtime.driver.active.get_current_stream(q.device.index)
    if rec.direct is None or _hooked():
        for launch in rec.launches:
            launch.kernel[launch.grid](*_kernel_args(launch, ptrs), stream=stream)
        return
    ready = rec.ready.get((stream, ptrs))
    if ready is None:
        # A descriptor encodes its base pointer, shape and strides; the layout fixes the latter
        # two, so the arguments built here hold for any later call with these pointers.
        ready = tuple(
            (d.launch, d.expand(*d.head, stream, *d.tail, *_kernel_args(launch, ptrs)))
            for launch, d in zip(rec.launches, rec.direct)
        )
        if len(rec.ready) >= _MAX_POINTER_SETS:
            rec.ready.pop(next(iter(rec.ready)), None)
        rec.ready[(stream, ptrs)] = ready
    for c_launch, args in ready:
        c_launch(*args)
