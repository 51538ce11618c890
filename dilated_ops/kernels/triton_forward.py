"""Triton forward of dilated attention that reads the strided segment views and writes the
output (scaled by the combine weight) and the log-sum-exp in place: no gather, no copy of the
attention output, which is what separates views + SDPA from the pre-gathered floor.

Takes the pieces of :func:`segments.segment_views` directly: q, k, v, out
``(batch, segments, len, heads, head_dim)`` and lse ``(batch, segments, len, heads)``, any
strides with a unit stride on head_dim. One program per (query tile, batch, segment, head).
CUDA only, float16/bfloat16, head_dim 16..128 (power of two), no dropout: :func:`supported`.
Imported only when those hold, so CPU installs need no Triton.

:func:`forward_into` returns each launch as a :class:`triton_replay.Launch` for
:mod:`triton_replay`, which records a call's launches per input layout and replays them on later
calls.
"""
from __future__ import annotations

import os
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from . import triton_replay
from .attention import device_capability
from .triton_replay import Launch

# Tile configuration per head_dim: (BLOCK_M, BLOCK_N, num_warps, num_stages), the fastest of a
# tile sweep on Hopper at d=64 and d=128 (benchmarks/RESULTS.md's method paragraph says where).
CONFIGS = {16: (64, 64, 4, 3), 32: (64, 64, 4, 3), 64: (64, 64, 4, 3), 128: (128, 128, 8, 3)}
# Where the op uses it: head dims where it measured faster than SDPA on views + copy; at d=128
# even the best tiles were slower than that, so not there.
FASTER_HEAD_DIMS = (64,)
ENABLED = os.environ.get("DILATED_OPS_TRITON", "1") != "0"

# Load q, k, v through host-built 5-D TMA descriptors on Hopper when the views are 16-byte
# aligned (they measured faster than pointer loads: benchmarks/RESULTS.md, "tile sweep"), else
# pointer loads.
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
def _update(acc, l_i, m_i, qk, cols, offs_m, L, v, qk_scale, kept, IS_CAUSAL: tl.constexpr, MASKED: tl.constexpr,
            HAS_KM: tl.constexpr):
    """One online-softmax step over a key tile: ``qk`` raw scores (scaled here by ``qk_scale``,
    which includes log2(e), folded into one FMA with the max subtraction), ``v`` the tile's
    values; masks keys past ``L`` and, when causal, after the query; with ``HAS_KM`` also the
    keys ``kept`` (``[BLOCK_N]`` bool) says are padding, and a row that has seen no key yet
    (running max -inf) subtracts 0 instead, so that its weights stay 0, not NaN."""
    if MASKED:
        keep = cols[None, :] < L
        if IS_CAUSAL:
            keep = keep & (cols[None, :] <= offs_m[:, None])
        if HAS_KM:
            keep = keep & kept[None, :]
        qk = tl.where(keep, qk, float("-inf"))
    elif HAS_KM:
        qk = tl.where(kept[None, :], qk, float("-inf"))
    m_ij = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
    m_use = m_ij
    if HAS_KM:
        m_use = tl.where(m_ij == float("-inf"), 0.0, m_ij)
    p32 = tl.math.exp2(qk * qk_scale - m_use[:, None])
    l_ij = tl.sum(p32, 1)
    p = p32.to(v.dtype)
    alpha = tl.math.exp2(m_i - m_use)
    l_i = l_i * alpha + l_ij
    acc = tl.dot(p, v, acc * alpha[:, None])
    return acc, l_i, m_ij


@triton.jit
def _kept(km_base, kml, cols, L, HAS_KM: tl.constexpr):
    """The key mask over a tile's keys (``[BLOCK_N]`` bool) with ``HAS_KM``; else the keys
    inside the sequence (unused). One bool type on both paths: Triton refuses a function whose
    returns differ in type, even across a constexpr branch."""
    kept = cols < L
    if HAS_KM:
        kept = tl.load(km_base + cols * kml, mask=kept, other=0) != 0
    return kept


@triton.jit
def _tile(acc, l_i, m_i, q, k_base, v_base, stride_kl, stride_vl, offs_m, offs_n, offs_d,
          start_n, L, qk_scale, km_base, kml, IS_CAUSAL: tl.constexpr, MASKED: tl.constexpr, HAS_KM: tl.constexpr):
    cols = start_n + offs_n
    if MASKED:
        k = tl.load(k_base + cols[None, :] * stride_kl + offs_d[:, None], mask=cols[None, :] < L, other=0.0)
        v = tl.load(v_base + cols[:, None] * stride_vl + offs_d[None, :], mask=cols[:, None] < L, other=0.0)
    else:
        k = tl.load(k_base + cols[None, :] * stride_kl + offs_d[:, None])
        v = tl.load(v_base + cols[:, None] * stride_vl + offs_d[None, :])
    qk = tl.dot(q, k)
    kept = _kept(km_base, kml, cols, L, HAS_KM)
    return _update(acc, l_i, m_i, qk, cols, offs_m, L, v, qk_scale, kept, IS_CAUSAL, MASKED, HAS_KM)


@triton.jit
def _tile_tma(acc, l_i, m_i, q, k_desc, v_desc, b, s, h, offs_m, offs_n, start_n, L, qk_scale, km_base, kml,
              HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, IS_CAUSAL: tl.constexpr, MASKED: tl.constexpr,
              HAS_KM: tl.constexpr):
    # TMA zero-fills rows past L, so only the scores need masking.
    k = k_desc.load([b, s, start_n, h, 0]).reshape(BLOCK_N, HEAD_DIM)
    v = v_desc.load([b, s, start_n, h, 0]).reshape(BLOCK_N, HEAD_DIM)
    qk = tl.dot(q, k.T)
    cols = start_n + offs_n
    kept = _kept(km_base, kml, cols, L, HAS_KM)
    return _update(acc, l_i, m_i, qk, cols, offs_m, L, v, qk_scale, kept, IS_CAUSAL, MASKED, HAS_KM)


@triton.jit
def _dilated_fwd(
    Q, K, V, O, LSE, KM,
    sqb, sqs, sql, sqh,
    skb, sks, skl, skh,
    svb, svs, svl, svh,
    sob, sos, sol, soh,
    slb, sls, sll, slh,
    kmb, kms, kml,
    S, H, L, qk_scale, out_scale, R, OFF, son, sln, GROUP,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IS_CAUSAL: tl.constexpr,
    USE_TMA: tl.constexpr, FILL: tl.constexpr, HAS_KM: tl.constexpr,
):
    # GROUP: query heads per K/V head (grouped-query attention; 1 without), query head h of the
    # pieces reads K/V head h // GROUP. KM: the key mask pieces (batch, segments, len), uint8,
    # 1 = keep (read with HAS_KM only; another pointer stands in without one).
    pid_m = tl.program_id(0)
    pid_z = tl.program_id(1).to(tl.int64)
    h = pid_z % H
    hk = h // GROUP
    bs = pid_z // H
    s = bs % S
    b = bs // S
    km_base = KM + b * kmb + s * kms
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
    if HAS_KM:  # every tile masks (its keys' padding); the ragged end and the diagonal as ever
        full_end = 0
    if IS_CAUSAL:
        full_end = tl.minimum(full_end, m0)
        hi = tl.minimum(L, m0 + BLOCK_M)
    else:
        hi = L
    if USE_TMA:
        # Host-built 5-D descriptors over the (batch, segments, len, heads, head_dim) views.
        bi, si, hi32, hk32 = b.to(tl.int32), s.to(tl.int32), h.to(tl.int32), hk.to(tl.int32)
        q = Q.load([bi, si, m0, hi32, 0]).reshape(BLOCK_M, HEAD_DIM)
        for start_n in range(0, full_end, BLOCK_N):
            acc, l_i, m_i = _tile_tma(acc, l_i, m_i, q, K, V, bi, si, hk32, offs_m, offs_n, start_n, L,
                                      qk_scale, km_base, kml, HEAD_DIM, BLOCK_N, IS_CAUSAL, False, HAS_KM)
        for start_n in range(full_end, hi, BLOCK_N):
            acc, l_i, m_i = _tile_tma(acc, l_i, m_i, q, K, V, bi, si, hk32, offs_m, offs_n, start_n, L,
                                      qk_scale, km_base, kml, HEAD_DIM, BLOCK_N, IS_CAUSAL, True, HAS_KM)
    else:
        q_base = Q + b * sqb + s * sqs + h * sqh
        k_base = K + b * skb + s * sks + hk * skh
        v_base = V + b * svb + s * svs + hk * svh
        q = tl.load(q_base + offs_m[:, None] * sql + offs_d[None, :], mask=offs_m[:, None] < L, other=0.0)
        for start_n in range(0, full_end, BLOCK_N):
            acc, l_i, m_i = _tile(acc, l_i, m_i, q, k_base, v_base, skl, svl, offs_m, offs_n, offs_d,
                                  start_n, L, qk_scale, km_base, kml, IS_CAUSAL, False, HAS_KM)
        for start_n in range(full_end, hi, BLOCK_N):
            acc, l_i, m_i = _tile(acc, l_i, m_i, q, k_base, v_base, skl, svl, offs_m, offs_n, offs_d,
                                  start_n, L, qk_scale, km_base, kml, IS_CAUSAL, True, HAS_KM)

    if HAS_KM:  # a query that saw no key (m_i -inf, l_i 0): output 0, lse -inf
        seen = l_i > 0
        acc = acc * tl.where(seen, out_scale / tl.where(seen, l_i, 1.0), 0.0)[:, None]
        l_i = tl.where(seen, l_i, 1.0)
    else:
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


def launch_config(head_dim: int) -> tuple:
    """This module's settings that fix a launch over ``head_dim`` (TMA on or off, the tile
    configuration): part of :func:`triton_replay.layout_key`'s ``config``."""
    return (USE_TMA, CONFIGS.get(head_dim))


def _launch_args(q, k, v, out, lse, is_causal: bool, scale: float, out_scale: float,
                 fill: Optional[Tuple[int, int]], km: Optional[torch.Tensor]):
    """``(grid, kernel arguments after the six pointers, keyword options, use_tma)`` of one
    launch over the pieces q, k, v, out, lse and the key mask ``km`` (see :func:`forward_into`)."""
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
        *(km.stride()[:3] if km is not None else (0, 0, 0)),
        s, h, length, scale * _LOG2E, out_scale, rate, offset, out.stride(2) // rate, lse.stride(2) // rate,
        h // k.shape[3],
    )
    constexprs = dict(HEAD_DIM=d, BLOCK_M=block_m, BLOCK_N=block_n, IS_CAUSAL=is_causal, USE_TMA=use_tma,
                      FILL=rate > 1, HAS_KM=km is not None)
    return grid, rest, constexprs, dict(num_warps=warps, num_stages=stages), use_tma


def forward_into(q, k, v, out, lse, is_causal: bool, scale: float, out_scale: float,
                 fill: Optional[Tuple[int, int]] = None, bases=None, km: Optional[torch.Tensor] = None):
    """Attention over each (batch, segment, head) of the 5-D pieces q, k, v; writes
    ``out_scale * softmax(q k^T scale) v`` into ``out`` and the natural-log lse into ``lse``.
    k, v may have a divisor of q's heads (grouped-query attention: query head ``j`` of the pieces
    reads K/V head ``j // (heads / heads_kv)``); ``km``: the key mask's pieces ``(batch,
    segments, len, 1)`` uint8, 1 = keep (a query that sees no key gets 0 and lse -inf).

    ``fill = (rate, offset)``: the pieces are full segments of a branch with that rate and
    offset (out and lse views of the whole sequence); also write 0 / -inf at every other offset
    of those segments, the positions no branch selects for these heads in groups mode.

    ``bases``: the tensors ``(q, k, v, out, lse, mask)`` the pieces are views of (``mask``: the
    key mask's, or ``lse`` again without one); then the launch is
    returned as a :class:`triton_replay.Launch` that :func:`triton_replay.replay` repeats on
    other tensors of the same layout (None when nothing was launched, or replay is off)."""
    b, s, length, h, d = q.shape
    if length == 0 or b * s * h == 0:
        return None
    grid, rest, constexprs, options, use_tma = _launch_args(q, k, v, out, lse, is_causal, scale, out_scale, fill, km)
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
    kernel = _dilated_fwd[grid](*descs, out, lse, lse if km is None else km, *rest, **constexprs, **options)
    if bases is None or not triton_replay.REPLAY:
        return None
    pieces = (q, k, v, out, lse, lse if km is None else km)
    offsets = tuple(t.data_ptr() - base.data_ptr() for t, base in zip(pieces, bases))
    tma = tuple((tuple(x.shape), tuple(x.strides), tuple(x.block_shape)) for x in descs) if use_tma else None
    return Launch(kernel, grid, offsets, tma, rest + tuple(constexprs.values()))
