"""Triton forward of the decode op (SPEC section 9): the keys a query at the end of the cache may
read are loaded in place, through the cache's strides, with no gathered copy of K/V.

A query at position ``t`` reads, per branch ``(w, r)``, the keys ``s + c + r j`` (``s`` its
segment's start, ``c = (t - s) % r``, ``j < w / r``, each inside the cache and, when causal,
``<= t``)::

    cache  |....segment s....|....segment s + w ....|...t      (branch w, r = 2, t odd)
    keys    .................|  x . x . x . x . x . x . t       read: the x's of t's class

Two launches (the split-K layout of flash-decoding, because one (query, KV head) has too little
work for a GPU): ``_decode_partial`` over (query row, KV head, chunk), where a chunk is up to
``BLOCK_N`` keys of one branch, writes each chunk's running max, sum and weighted values for the
KV head's query heads (grouped-query attention: the keys are loaded once for the group);
``_decode_reduce`` over (query row, head) merges the chunks into the output and lse. Both modes
are one softmax over the union of the head's branches (SPEC section 3): in longnet mode every
branch's chunks merge into it, and in groups mode only the head's own branch selects any key (the
others' chunks are empty) and the output is divided by the number of branches.

CUDA only (float16, bfloat16, float32), head_dim a power of two in 16..256: :func:`supported`.
Imported only when a CUDA call may use it, so CPU installs need no Triton. The backward stays
with :func:`.decode.decode_backward`.
"""
from __future__ import annotations

import os
from typing import Dict, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from .attention import default_scale, device_capability, lse_dtype
from .dilated import empty_output
from .segments import head_groups

ENABLED = os.environ.get("DILATED_OPS_TRITON", "1") != "0"
BLOCK_N = 64  # keys per chunk
MAX_QUERIES = 64  # longer query blocks (chunked prefill) take the gather path: it batches better
_LOG2E = 1.4426950408889634


def supported(q: torch.Tensor, k: torch.Tensor) -> bool:
    d = q.shape[-1]
    return (
        ENABLED
        and q.is_cuda
        and q.dtype in (torch.float16, torch.bfloat16, torch.float32)
        and k.dtype == q.dtype
        and 16 <= d <= 256 and d & (d - 1) == 0
        and 0 < q.shape[1] <= MAX_QUERIES
        and q.shape[0] * k.shape[1] * k.shape[2] > 0
        and device_capability(q.device) >= (8, 0)
    )


# The chunk tables, per (segment_lengths, dilation_rates, mode, heads, device): a few hundred
# int32s each, built on the first call and reused, so a step (and a CUDA graph of it) copies
# nothing from the host. Reported by dilated_ops.get_memory_pool_info.
_TABLES: Dict[tuple, torch.Tensor] = {}


def cache_entries() -> int:
    return len(_TABLES)


def cache_bytes() -> int:
    return sum(t.numel() * t.element_size() for t in _TABLES.values())


def cache_clear() -> None:
    _TABLES.clear()


def _table(segment_lengths: Sequence[int], dilation_rates: Sequence[int], mode: str, heads: int,
           device: torch.device) -> torch.Tensor:
    """``(chunks, 8)`` int32: per chunk its branch's ``w, r``, the heads ``[g0, g1)`` that may
    select it and their ``offset`` (-1: each head's own ``head % r``, longnet), the chunk's first
    key index ``j0`` and the branch's ``w / r``."""
    key = (tuple(segment_lengths), tuple(dilation_rates), mode, heads, device)
    table = _TABLES.get(key)
    if table is None:
        groups = head_groups(heads, len(segment_lengths)) if mode == "groups" else None
        rows = []
        for i, (w, r) in enumerate(zip(segment_lengths, dilation_rates)):
            g0, g1 = groups[i] if groups is not None else (0, heads)
            offset = i % r if groups is not None else -1
            if g0 == g1:
                continue
            rows += [[w, r, g0, g1, offset, j0, w // r, 0] for j0 in range(0, w // r, BLOCK_N)]
        table = _TABLES[key] = torch.tensor(rows, dtype=torch.int32, device=device)
    return table


@triton.jit
def _decode_partial(
    Q, K, V, KM, TAB, M_OUT, L_OUT, ACC_OUT,
    sqb, sqs, sqh, skb, skn, skh, svb, svn, svh, skmb, skmn,
    SQ, SKV, H, C, qk_scale,
    GROUP: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
    IS_CAUSAL: tl.constexpr, HAS_KM: tl.constexpr, PRECISION: tl.constexpr,
):
    # int64 from here: a long cache's offsets (batch * its stride, position * its stride) pass 2^31
    row = tl.program_id(0).to(tl.int64)  # batch * SQ + query
    kvh = tl.program_id(1)
    c = tl.program_id(2)
    b = row // SQ
    t = SKV - SQ + row % SQ  # the query's position in the cache
    tab = TAB + c * 8
    w = tl.load(tab)
    r = tl.load(tab + 1)
    g0 = tl.load(tab + 2)
    g1 = tl.load(tab + 3)
    offset = tl.load(tab + 4)
    j0 = tl.load(tab + 5)
    m = tl.load(tab + 6)
    start = t - t % w
    cls = (t - start) % r

    g = tl.arange(0, BLOCK_H)
    heads = kvh * GROUP + g
    head_ok = g < GROUP
    head_cls = tl.where(offset >= 0, offset, heads % r)
    sel = head_ok & (heads >= g0) & (heads < g1) & (head_cls == cls)

    j = j0 + tl.arange(0, BLOCK_N)
    pos = start + cls + r * j
    valid = (j < m) & (pos < tl.minimum(start + w, SKV))
    if IS_CAUSAL:
        valid = valid & (pos <= t)
    if HAS_KM:
        valid = valid & (tl.load(KM + b * skmb + pos * skmn, mask=valid, other=0) != 0)

    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + b * sqb + (row % SQ) * sqs + heads[:, None] * sqh + offs_d[None, :],
                mask=head_ok[:, None], other=0.0)
    k = tl.load(K + b * skb + pos[:, None] * skn + kvh * skh + offs_d[None, :], mask=valid[:, None], other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    s = tl.where(sel[:, None] & valid[None, :], s, float("-inf"))
    mx = tl.max(s, 1)
    p = tl.exp2(s - tl.where(mx == float("-inf"), 0.0, mx)[:, None])  # -inf scores give 0
    v = tl.load(V + b * svb + pos[:, None] * svn + kvh * svh + offs_d[None, :], mask=valid[:, None], other=0.0)
    acc = tl.dot(p.to(v.dtype), v, input_precision=PRECISION)

    part = (row * H + heads) * C + c
    tl.store(M_OUT + part, mx, mask=head_ok)
    tl.store(L_OUT + part, tl.sum(p, 1), mask=head_ok)
    tl.store(ACC_OUT + part[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=head_ok[:, None])


@triton.jit
def _decode_reduce(
    M_IN, L_IN, ACC_IN, O, LSE,
    sob, sos, soh, slb, sls, slh,
    SQ, H, out_scale,
    C: tl.constexpr, BLOCK_C: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # One program per (query row, head, BLOCK_D slice of head_dim): a decode step has few rows
    # and heads, and a program per (row, head) alone left most of the GPU idle.
    row = tl.program_id(0)
    h = tl.program_id(1)
    dpart = tl.program_id(2)
    b = row // SQ
    i = row % SQ
    base = (row * H + h) * C
    offs_d = dpart * BLOCK_D + tl.arange(0, BLOCK_D)
    m_run = tl.full([1], float("-inf"), tl.float32)
    l_run = tl.zeros([1], tl.float32)
    acc = tl.zeros([BLOCK_D], tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cs = c0 + tl.arange(0, BLOCK_C)
        live = cs < C
        m = tl.load(M_IN + base + cs, mask=live, other=float("-inf"))
        seen = m > float("-inf")  # an empty chunk's sums are 0; its -inf max must not make NaNs
        l = tl.load(L_IN + base + cs, mask=seen, other=0.0)
        a = tl.load(ACC_IN + (base + cs)[:, None] * HEAD_DIM + offs_d[None, :], mask=seen[:, None], other=0.0)
        m_new = tl.maximum(m_run, tl.max(m, 0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_run - m_safe)
        wt = tl.where(seen, tl.exp2(m - m_safe), 0.0)
        l_run = l_run * alpha + tl.sum(l * wt, 0)
        acc = acc * alpha + tl.sum(a * wt[:, None], 0)
        m_run = m_new
    seen_any = l_run > 0.0
    out = acc * tl.where(seen_any, out_scale / tl.where(seen_any, l_run, 1.0), 0.0)
    tl.store(O + b * sob + i * sos + h * soh + offs_d, out.to(O.dtype.element_ty))
    lse = tl.where(seen_any, (m_run + tl.math.log2(tl.where(seen_any, l_run, 1.0))) * 0.6931471805599453,
                   float("-inf"))
    tl.store(LSE + b * slb + i * sls + h * slh + tl.arange(0, 1), lse.to(LSE.dtype.element_ty), mask=dpart == 0)


def launches(q, k, v, out, lse, table, parts, is_causal: bool, scale: float, out_scale: float,
             key_padding_mask: Optional[torch.Tensor] = None):
    """The two launches, ``[(kernel, grid, args, constexprs, options)]``, over q, k, v (unit
    stride on head_dim), ``out``, ``lse``, the chunk ``table`` (:func:`_table`) and ``parts``
    (the chunks' max, sum and weighted values: ``(b * sq, h, chunks)`` twice and ``(b * sq, h,
    chunks, d)``, float32). Kept apart from :func:`forward` so tests compile them on a CPU."""
    b, sq, h, d = q.shape
    skv, h_kv = k.shape[1], k.shape[2]
    chunks, group = table.shape[0], h // h_kv
    km = key_padding_mask.view(torch.uint8) if key_padding_mask is not None else table
    km_strides = key_padding_mask.stride() if key_padding_mask is not None else (0, 0)
    partial = (
        _decode_partial, (b * sq, h_kv, chunks),
        (q, k, v, km, table, *parts, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *km_strides,
         sq, skv, h, chunks, scale * _LOG2E),
        dict(GROUP=group, BLOCK_H=max(16, triton.next_power_of_2(group)), BLOCK_N=BLOCK_N, HEAD_DIM=d,
             IS_CAUSAL=is_causal, HAS_KM=key_padding_mask is not None,
             PRECISION="ieee" if q.dtype == torch.float32 else "tf32"),
        dict(num_warps=4),
    )
    block_d = min(d, 32)
    reduce = (
        _decode_reduce, (b * sq, h, d // block_d),
        (*parts, out, lse, *out.stride()[:3], *lse.stride(), sq, h, out_scale),
        # the chunk count as a constant: one compile per segment configuration, a loop it unrolls
        dict(C=chunks, BLOCK_C=64, HEAD_DIM=d, BLOCK_D=block_d),
        dict(num_warps=4),
    )
    return [partial, reduce]


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segment_lengths: Sequence[int],
            dilation_rates: Sequence[int], mode: str, is_causal: bool, scale: Optional[float],
            key_padding_mask: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)`` as :func:`.decode.decode_forward` returns them, for validated arguments
    that :func:`supported` accepts."""
    if q.device.index != torch.cuda.current_device():
        with torch.cuda.device(q.device):  # Triton launches on the current device
            return forward(q, k, v, segment_lengths, dilation_rates, mode, is_causal, scale, key_padding_mask)
    b, sq, h, d = q.shape
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    table = _table(segment_lengths, dilation_rates, mode, h, q.device)
    m_part = torch.empty(b * sq, h, table.shape[0], dtype=torch.float32, device=q.device)
    parts = (m_part, torch.empty_like(m_part), m_part.new_empty(*m_part.shape, d))
    out = empty_output(q)
    lse = torch.empty(b, sq, h, dtype=lse_dtype(q.dtype), device=q.device)
    out_scale = 1.0 / len(segment_lengths) if mode == "groups" else 1.0
    for kernel, grid, args, constexprs, options in launches(q, k, v, out, lse, table, parts, is_causal,
                                                            default_scale(d, scale), out_scale, key_padding_mask):
        kernel[grid](*args, **constexprs, **options)
    return out, lse
