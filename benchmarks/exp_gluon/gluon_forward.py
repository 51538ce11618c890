"""Hopper forward of dilated attention in Gluon (Triton's tile-level language), FlashAttention-3
style: the next key tile's ``Q K^T`` runs on the tensor cores (async wgmma) while the warps
compute the softmax of the current one, which Triton's compiler does not do by itself (it waits
on every wgmma right after issuing it).

Same contract as :mod:`triton_forward`: takes the pieces of :func:`segments.segment_views`
(q, k, v, out ``(batch, segments, len, heads, head_dim)``, lse ``(batch, segments, len,
heads)``), writes the output (times the combine weight) and the log-sum-exp in place. q, k, v
through TMA (16-byte aligned views), out and lse through pointer stores. One program per (query
tile, batch, segment, head), one warpgroup each. Imported only on CUDA with Gluon available.
"""
from __future__ import annotations

import os

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

ENABLED = os.environ.get("DILATED_OPS_GLUON", "1") != "0"
BLOCK_M, BLOCK_N, STAGES = 64, 64, 3
_LOG2E = 1.4426950408889634


@gluon.jit
def _softmax_step(s, m_i, l_i, qk_scale, cols, rows, L, MASK: gl.constexpr, IS_CAUSAL: gl.constexpr):
    """Online softmax of one score tile ``s`` (raw ``q k^T``): returns p (unnormalised, fp32),
    the new running max (log2 units), the factor that rescales the old accumulator, and l."""
    if MASK:
        keep = gl.expand_dims(cols, 0) < L
        if IS_CAUSAL:
            keep = keep & (gl.expand_dims(cols, 0) <= gl.expand_dims(rows, 1))
        s = gl.where(keep, s, float("-inf"))
    m_new = gl.maximum(m_i, gl.max(s, 1) * qk_scale)
    p = gl.exp2(s * qk_scale - gl.expand_dims(m_new, 1))
    alpha = gl.exp2(m_i - m_new)
    l_i = l_i * alpha + gl.sum(p, 1)
    return p, m_new, alpha, l_i


@gluon.jit
def _load_kv(k_desc, v_desc, k_smem, v_smem, bars, tile, b, s, h, BLOCK_N: gl.constexpr, STAGES: gl.constexpr):
    stage = tile % STAGES
    bar = bars.index(stage)
    mbarrier.expect(bar, k_desc.block_type.nbytes + v_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(k_desc, [b, s, tile * BLOCK_N, h, 0], bar, k_smem.index(stage))
    tma.async_copy_global_to_shared(v_desc, [b, s, tile * BLOCK_N, h, 0], bar, v_smem.index(stage))


@gluon.jit
def _dilated_fwd(
    q_desc, k_desc, v_desc, O, LSE,
    sob, sos, sol, soh, slb, sls, sll, slh,
    S, H, L, qk_scale, out_scale,
    HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
    IS_CAUSAL: gl.constexpr,
):
    gl.static_assert(BLOCK_N == HEAD_DIM)  # one accumulator layout for scores and output
    dtype: gl.constexpr = q_desc.dtype
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK_N, 16])
    p_op: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
    rows_l: gl.constexpr = gl.SliceLayout(1, mma)
    cols_l: gl.constexpr = gl.SliceLayout(0, mma)

    pid_m = gl.program_id(0)
    pid_z = gl.program_id(1)
    h = pid_z % H
    bs = pid_z // H
    s = bs % S
    b = bs // S
    m0 = pid_m * BLOCK_M
    hi = L
    if IS_CAUSAL:
        hi = gl.minimum(L, m0 + BLOCK_M)
    n_tiles = gl.cdiv(hi, BLOCK_N)
    # Key tiles from full_tiles on need masking (ragged end, causal diagonal).
    full_tiles = L // BLOCK_N
    if IS_CAUSAL:
        full_tiles = gl.minimum(full_tiles, m0 // BLOCK_N)

    q_smem = gl.allocate_shared_memory(dtype, q_desc.block_type.shape, q_desc.layout)
    k_smem = gl.allocate_shared_memory(dtype, [STAGES] + k_desc.block_type.shape, k_desc.layout)
    v_smem = gl.allocate_shared_memory(dtype, [STAGES] + v_desc.block_type.shape, v_desc.layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    kv_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(kv_bars.index(i), count=1)

    mbarrier.expect(q_bar, q_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(q_desc, [b, s, m0, h, 0], q_bar, q_smem)
    for i in gl.static_range(STAGES):
        if i < n_tiles:
            _load_kv(k_desc, v_desc, k_smem, v_smem, kv_bars, i, b, s, h, BLOCK_N, STAGES)

    q2 = q_smem.reshape([BLOCK_M, HEAD_DIM])
    rows = m0 + gl.arange(0, BLOCK_M, layout=rows_l)
    cols0 = gl.arange(0, BLOCK_N, layout=cols_l)
    zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=mma)

    # Tile 0: scores and softmax, nothing to overlap with yet.
    mbarrier.wait(q_bar, 0)
    mbarrier.wait(kv_bars.index(0), 0)
    sc = warpgroup_mma(q2, k_smem.index(0).reshape([BLOCK_N, HEAD_DIM]).permute((1, 0)), zero,
                       use_acc=False, is_async=True)
    sc = warpgroup_mma_wait(num_outstanding=0, deps=(sc,))
    m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, layout=rows_l)
    l_i = gl.zeros([BLOCK_M], gl.float32, layout=rows_l)
    if full_tiles > 0:
        p, m_i, alpha, l_i = _softmax_step(sc, m_i, l_i, qk_scale, cols0, rows, L, False, IS_CAUSAL)
    else:
        p, m_i, alpha, l_i = _softmax_step(sc, m_i, l_i, qk_scale, cols0, rows, L, True, IS_CAUSAL)
    acc = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, layout=mma)

    for j in range(1, n_tiles):
        stage = j % STAGES
        prev = (j - 1) % STAGES
        mbarrier.wait(kv_bars.index(stage), (j // STAGES) & 1)
        # Issue S_j = Q K_j^T and O += P_{j-1} V_{j-1}; the softmax of S_j then overlaps the
        # second one.
        sc = warpgroup_mma(q2, k_smem.index(stage).reshape([BLOCK_N, HEAD_DIM]).permute((1, 0)), zero,
                           use_acc=False, is_async=True)
        acc = warpgroup_mma(gl.convert_layout(p.to(dtype), p_op), v_smem.index(prev).reshape([BLOCK_N, HEAD_DIM]),
                            acc, is_async=True)
        sc = warpgroup_mma_wait(num_outstanding=1, deps=(sc,))
        if j < full_tiles:
            p, m_i, alpha, l_i = _softmax_step(sc, m_i, l_i, qk_scale, cols0, rows, L, False, IS_CAUSAL)
        else:
            p, m_i, alpha, l_i = _softmax_step(sc, m_i, l_i, qk_scale, j * BLOCK_N + cols0, rows, L, True,
                                               IS_CAUSAL)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
        # Stage prev is free (its K and V have been read): refill it.
        if j - 1 + STAGES < n_tiles:
            _load_kv(k_desc, v_desc, k_smem, v_smem, kv_bars, j - 1 + STAGES, b, s, h, BLOCK_N, STAGES)
        acc = acc * gl.expand_dims(alpha, 1)

    last = (n_tiles - 1) % STAGES
    acc = warpgroup_mma(gl.convert_layout(p.to(dtype), p_op), v_smem.index(last).reshape([BLOCK_N, HEAD_DIM]),
                        acc, is_async=True)
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
    mbarrier.invalidate(q_bar)
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(kv_bars.index(i))

    acc = acc * gl.expand_dims(out_scale / l_i, 1)
    store_l: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
    o = gl.convert_layout(acc.to(dtype), store_l)
    o_rows = m0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, store_l))
    o_cols = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, store_l))
    b64, s64, h64 = b.to(gl.int64), s.to(gl.int64), h.to(gl.int64)
    o_ptrs = (O + b64 * sob + s64 * sos + h64 * soh
              + gl.expand_dims(o_rows.to(gl.int64) * sol, 1) + gl.expand_dims(o_cols, 0))
    gl.store(o_ptrs, o, mask=gl.expand_dims(o_rows < L, 1))
    lse = (m_i + gl.log2(l_i)) * 0.6931471805599453
    gl.store(LSE + b64 * slb + s64 * sls + h64 * slh + rows.to(gl.int64) * sll, lse, mask=rows < L)


def supported(q: torch.Tensor, dropout_p: float, scale: float) -> bool:
    return (
        ENABLED
        and scale > 0
        and q.is_cuda
        and q.dtype in (torch.float16, torch.bfloat16)
        and q.shape[-1] == BLOCK_N
        and dropout_p == 0.0
        and torch.cuda.get_device_capability(q.device)[0] == 9
    )


def aligned(t: torch.Tensor) -> bool:
    return t.data_ptr() % 16 == 0 and all(st * t.element_size() % 16 == 0 for st in t.stride()[:4])


def forward_into(q, k, v, out, lse, is_causal: bool, scale: float, out_scale: float) -> None:
    """Attention over each (batch, segment, head) of the 5-D pieces q, k, v (16-byte aligned:
    :func:`aligned`); writes ``out_scale * softmax(q k^T scale) v`` into ``out`` and the
    natural-log lse into ``lse``."""
    b, s, length, h, d = q.shape
    if length == 0 or b * s * h == 0:
        return
    gdt = gl.bfloat16 if q.dtype == torch.bfloat16 else gl.float16
    descs = []
    for t, blk in ((q, BLOCK_M), (k, BLOCK_N), (v, BLOCK_N)):
        block = [1, 1, blk, 1, d]
        descs.append(TensorDescriptor.from_tensor(t, block, gl.NVMMASharedLayout.get_default_for(block, gdt)))
    grid = (triton.cdiv(length, BLOCK_M), b * s * h)
    _dilated_fwd[grid](
        *descs, out, lse, *out.stride()[:4], *lse.stride(), s, h, length, scale * _LOG2E, out_scale,
        HEAD_DIM=d, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, STAGES=STAGES, IS_CAUSAL=is_causal, num_warps=4,
    )
