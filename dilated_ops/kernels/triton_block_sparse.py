"""Triton kernels of block-sparse attention (SPEC section 4) for CUDA float16/bfloat16: the
forward and the backward (one kernel for dK/dV per key block, one for dQ per query block), each
program walking only the active blocks of its row or column of the layout, FlashAttention-2
style (online softmax, scores never stored).

q, k, v, out ``(batch, seq, heads, head_dim)`` with a unit stride on head_dim, lse and delta
``(batch, seq, heads)`` float32. A plan (:class:`dilated_ops.kernels.block_sparse.Plan`) gives,
per (layout head, block), the count and the indices of the active blocks, int32. Imported only
where it applies (:func:`supported`), so CPU installs need no Triton.
"""
from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453
BLOCK_SIZES = (16, 32, 64, 128)
HEAD_DIMS = (16, 32, 64, 128)


def supported(q: torch.Tensor, block_size: int) -> bool:
    return (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and block_size in BLOCK_SIZES
            and q.shape[-1] in HEAD_DIMS)


def _options(block_size: int, head_dim: int) -> dict:
    return {"num_warps": 8 if block_size * head_dim >= 128 * 128 else 4, "num_stages": 2}


@triton.jit
def _fwd(Q, K, V, O, LSE, IDX, CNT,
         sqb, sqn, sqh, skb, skn, skh, svb, svn, svh, sob, son, soh, slb, sln, slh,
         s_idx_h, s_idx_i, s_cnt_h, N, H, qk_scale,
         HEAD_DIM: tl.constexpr, BS: tl.constexpr, IS_CAUSAL: tl.constexpr):
    i = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    rows = i * BS + tl.arange(0, BS)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = rows < N
    q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sqn + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    cnt = tl.load(CNT + h * s_cnt_h + i)
    m_i = tl.full([BS], float("-inf"), tl.float32)
    l_i = tl.zeros([BS], tl.float32)
    acc = tl.zeros([BS, HEAD_DIM], tl.float32)
    for t in range(cnt):
        j = tl.load(IDX + h * s_idx_h + i * s_idx_i + t)
        cols = j * BS + tl.arange(0, BS)
        col_ok = cols < N
        k = tl.load(K + b * skb + h * skh + cols[None, :] * skn + offs_d[:, None], mask=col_ok[None, :], other=0.0)
        v = tl.load(V + b * svb + h * svh + cols[:, None] * svn + offs_d[None, :], mask=col_ok[:, None], other=0.0)
        keep = col_ok[None, :]
        if IS_CAUSAL:
            keep = keep & (cols[None, :] <= rows[:, None])
        qk = tl.where(keep, tl.dot(q, k) * qk_scale, float("-inf"))
        m_ij = tl.maximum(m_i, tl.max(qk, 1))
        # A row that has seen no key yet keeps m = -inf: subtract 0 there, not -inf (NaN).
        m_safe = tl.where(m_ij == float("-inf"), 0.0, m_ij)
        p = tl.math.exp2(qk - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_ij
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453)
    tl.store(O + b * sob + h * soh + rows[:, None] * son + offs_d[None, :], out.to(O.dtype.element_ty),
             mask=row_ok[:, None])
    tl.store(LSE + b * slb + h * slh + rows * sln, lse, mask=row_ok)


@triton.jit
def _probs(q, k, rows, cols, lse2, qk_scale, N, IS_CAUSAL: tl.constexpr):
    """Softmax weights of one (query block, key block) tile: ``exp2(q k^T qk_scale - lse2)``,
    0 where masked (lse2: the rows' lse in log2 units, 0 for rows that see no key)."""
    keep = (cols[None, :] < N) & (rows[:, None] < N)
    if IS_CAUSAL:
        keep = keep & (cols[None, :] <= rows[:, None])
    return tl.where(keep, tl.math.exp2(tl.dot(q, tl.trans(k)) * qk_scale - lse2[:, None]), 0.0)


@triton.jit
def _rows_lse2(LSE, b, h, rows, slb, sln, slh, N):
    lse = tl.load(LSE + b * slb + h * slh + rows * sln, mask=rows < N, other=0.0)
    return tl.where(lse == float("-inf"), 0.0, lse * 1.4426950408889634)


@triton.jit
def _bwd_dkdv(Q, K, V, DO, LSE, DELTA, DK, DV, QIDX, QCNT,
              sqb, sqn, sqh, skb, skn, skh, svb, svn, svh, sdb, sdn, sdh, slb, sln, slh,
              s_idx_h, s_idx_i, s_cnt_h, N, H, scale, qk_scale,
              HEAD_DIM: tl.constexpr, BS: tl.constexpr, IS_CAUSAL: tl.constexpr):
    """One key block: dK, dV over the query blocks that read it (``QIDX``: the transposed
    layout's plan). dK/dV share k/v's strides; DO shares q's."""
    j = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    cols = j * BS + tl.arange(0, BS)
    offs_d = tl.arange(0, HEAD_DIM)
    col_ok = cols < N
    k = tl.load(K + b * skb + h * skh + cols[:, None] * skn + offs_d[None, :], mask=col_ok[:, None], other=0.0)
    v = tl.load(V + b * svb + h * svh + cols[:, None] * svn + offs_d[None, :], mask=col_ok[:, None], other=0.0)
    dk = tl.zeros([BS, HEAD_DIM], tl.float32)
    dv = tl.zeros([BS, HEAD_DIM], tl.float32)
    cnt = tl.load(QCNT + h * s_cnt_h + j)
    for t in range(cnt):
        i = tl.load(QIDX + h * s_idx_h + j * s_idx_i + t)
        rows = i * BS + tl.arange(0, BS)
        row_ok = rows < N
        q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sqn + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        do = tl.load(DO + b * sdb + h * sdh + rows[:, None] * sdn + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        delta = tl.load(DELTA + b * slb + h * slh + rows * sln, mask=row_ok, other=0.0)
        p = _probs(q, k, rows, cols, _rows_lse2(LSE, b, h, rows, slb, sln, slh, N), qk_scale, N, IS_CAUSAL)
        dv += tl.dot(tl.trans(p.to(do.dtype)), do)
        ds = p * (tl.dot(do, tl.trans(v)) - delta[:, None])
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q)
    tl.store(DK + b * skb + h * skh + cols[:, None] * skn + offs_d[None, :], (dk * scale).to(DK.dtype.element_ty),
             mask=col_ok[:, None])
    tl.store(DV + b * svb + h * svh + cols[:, None] * svn + offs_d[None, :], dv.to(DV.dtype.element_ty),
             mask=col_ok[:, None])


@triton.jit
def _bwd_dq(Q, K, V, DO, LSE, DELTA, DQ, IDX, CNT,
            sqb, sqn, sqh, skb, skn, skh, svb, svn, svh, sdb, sdn, sdh, slb, sln, slh,
            s_idx_h, s_idx_i, s_cnt_h, N, H, scale, qk_scale,
            HEAD_DIM: tl.constexpr, BS: tl.constexpr, IS_CAUSAL: tl.constexpr):
    """One query block: dQ over its active key blocks. DQ shares q's strides."""
    i = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    rows = i * BS + tl.arange(0, BS)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = rows < N
    q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sqn + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + b * sdb + h * sdh + rows[:, None] * sdn + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    delta = tl.load(DELTA + b * slb + h * slh + rows * sln, mask=row_ok, other=0.0)
    lse2 = _rows_lse2(LSE, b, h, rows, slb, sln, slh, N)
    dq = tl.zeros([BS, HEAD_DIM], tl.float32)
    cnt = tl.load(CNT + h * s_cnt_h + i)
    for t in range(cnt):
        j = tl.load(IDX + h * s_idx_h + i * s_idx_i + t)
        cols = j * BS + tl.arange(0, BS)
        col_ok = cols < N
        k = tl.load(K + b * skb + h * skh + cols[:, None] * skn + offs_d[None, :], mask=col_ok[:, None], other=0.0)
        v = tl.load(V + b * svb + h * svh + cols[:, None] * svn + offs_d[None, :], mask=col_ok[:, None], other=0.0)
        p = _probs(q, k, rows, cols, lse2, qk_scale, N, IS_CAUSAL)
        ds = p * (tl.dot(do, tl.trans(v)) - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k)
    tl.store(DQ + b * sqb + h * sqh + rows[:, None] * sqn + offs_d[None, :], (dq * scale).to(DQ.dtype.element_ty),
             mask=row_ok[:, None])


def _plan_args(index: torch.Tensor, counts: torch.Tensor):
    """The plan's tensors and strides; a layout shared by every head has head stride 0."""
    shared = index.shape[0] == 1
    return index, counts, (0 if shared else index.stride(0)), index.stride(1), (0 if shared else counts.stride(0))


def forward(q, k, v, plan, block_size: int, is_causal: bool, scale: float):
    """``(out, lse)`` as :func:`dilated_ops.kernels.block_sparse.forward`."""
    b, n, h, d = q.shape
    out = torch.empty(b, n, h, d, dtype=q.dtype, device=q.device)
    lse = torch.empty(b, n, h, dtype=torch.float32, device=q.device)
    idx, cnt, s_h, s_i, s_c = _plan_args(plan.index32, plan.counts)
    grid = (plan.num_blocks, b * h)
    with _on(q):
        _fwd[grid](q, k, v, out, lse, idx, cnt, *_s(q), *_s(k), *_s(v), *_s(out), *lse.stride(), s_h, s_i, s_c,
                   n, h, scale * _LOG2E, HEAD_DIM=d, BS=block_size, IS_CAUSAL=is_causal, **_options(block_size, d))
    return out, lse


def backward(grad_out, q, k, v, out, lse, plan, block_size: int, is_causal: bool, scale: float):
    """``(dq, dk, dv)`` as :func:`dilated_ops.kernels.block_sparse.backward`."""
    b, n, h, d = q.shape
    grad_out = grad_out if grad_out.stride(-1) == 1 else grad_out.contiguous()
    delta = (grad_out.float() * out.float()).sum(-1)  # rowsum(dO * O), (b, n, h)
    lse = lse.contiguous()
    dq = torch.empty(b, n, h, d, dtype=q.dtype, device=q.device)
    dk = torch.empty(b, n, h, d, dtype=k.dtype, device=k.device)
    dv = torch.empty(b, n, h, d, dtype=v.dtype, device=v.device)
    # dk/dv are written with k's/v's strides, dq with q's: pass contiguous q, k, v alike.
    q, k, v = (t.contiguous() for t in (q, k, v))
    opts = dict(HEAD_DIM=d, BS=block_size, IS_CAUSAL=is_causal, **_options(block_size, d))
    grid = (plan.num_blocks, b * h)
    common = (*_s(q), *_s(k), *_s(v), *_s(grad_out), *lse.stride())
    with _on(q):
        qidx, qcnt, s_h, s_i, s_c = _plan_args(*plan.transposed())
        _bwd_dkdv[grid](q, k, v, grad_out, lse, delta, dk, dv, qidx, qcnt, *common, s_h, s_i, s_c, n, h, scale,
                        scale * _LOG2E, **opts)
        idx, cnt, s_h, s_i, s_c = _plan_args(plan.index32, plan.counts)
        _bwd_dq[grid](q, k, v, grad_out, lse, delta, dq, idx, cnt, *common, s_h, s_i, s_c, n, h, scale,
                      scale * _LOG2E, **opts)
    return dq, dk, dv


def _on(t: torch.Tensor):
    # Triton launches on the current CUDA device; the interpreter (tests on CPU) has none.
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _s(t: torch.Tensor):
    """(batch, seq, heads) strides of a ``(batch, seq, heads, head_dim)`` tensor."""
    return t.stride(0), t.stride(1), t.stride(2)
