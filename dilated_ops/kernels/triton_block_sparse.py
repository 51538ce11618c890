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
BLOCK_SIZES = (16, 32, 64, 128)
HEAD_DIMS = (16, 32, 64, 128)


def supported(q: torch.Tensor, block_size: int) -> bool:
    return (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and block_size in BLOCK_SIZES
            and q.shape[-1] in HEAD_DIMS)


# (num_warps, num_stages) of the forward and backward kernels per (block_size, head_dim): the
# fastest of a sweep on an H200 at block 128, head_dim 64 and 128 (benchmarks/RESULTS.md); the
# backward's larger tiles ran out of shared memory with more stages at head_dim 128.
OPTIONS = {"fwd": lambda bs, d: (8, 3) if bs * d >= 128 * 128 else (4, 2),
           "bwd": lambda bs, d: (8, 1) if bs * d >= 128 * 128 else (8 if bs >= 64 else 4, 3)}


def _options(block_size: int, head_dim: int, kind: str = "fwd") -> dict:
    warps, stages = OPTIONS[kind](block_size, head_dim)
    return {"num_warps": warps, "num_stages": stages}


@triton.jit
def _rows(P, b, h, pos, sb, sn, sh, offs_d, N):
    """The ``(len(pos), HEAD_DIM)`` tile of positions ``pos`` of (batch b, head h); 0 past N."""
    return tl.load(P + b * sb + h * sh + pos[:, None] * sn + offs_d[None, :], mask=(pos < N)[:, None], other=0.0)


@triton.jit
def _put(P, b, h, pos, sb, sn, sh, offs_d, N, x):
    tl.store(P + b * sb + h * sh + pos[:, None] * sn + offs_d[None, :], x.to(P.dtype.element_ty),
             mask=(pos < N)[:, None])


@triton.jit
def _program(H, BS: tl.constexpr, HEAD_DIM: tl.constexpr):
    """(block, batch, head, the block's positions, head_dim offsets) of this program."""
    blk = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    return blk, bh // H, bh % H, blk * BS + tl.arange(0, BS), tl.arange(0, HEAD_DIM)


@triton.jit
def _fwd(Q, K, V, O, LSE, IDX, CNT,
         sqb, sqn, sqh, skb, skn, skh, svb, svn, svh, sob, son, soh, slb, sln, slh,
         s_idx_h, s_idx_i, s_cnt_h, N, H, qk_scale,
         HEAD_DIM: tl.constexpr, BS: tl.constexpr, IS_CAUSAL: tl.constexpr, EVEN: tl.constexpr):
    i, b, h, rows, offs_d = _program(H, BS, HEAD_DIM)
    row_ok = rows < N
    q = _rows(Q, b, h, rows, sqb, sqn, sqh, offs_d, N)
    cnt = tl.load(CNT + h * s_cnt_h + i)
    m_i = tl.full([BS], float("-inf"), tl.float32)
    l_i = tl.zeros([BS], tl.float32)
    acc = tl.zeros([BS, HEAD_DIM], tl.float32)
    for t in range(cnt):
        j = tl.load(IDX + h * s_idx_h + i * s_idx_i + t)
        cols = j * BS + tl.arange(0, BS)
        col_ok = cols < N
        k = tl.load(K + b * skb + h * skh + cols[None, :] * skn + offs_d[:, None], mask=col_ok[None, :], other=0.0)
        v = _rows(V, b, h, cols, svb, svn, svh, offs_d, N)
        qk = tl.dot(q, k) * qk_scale
        # Only a partial last block and, when causal, the diagonal block need a mask; with
        # neither possible (EVEN, not causal) there is no branch at all.
        if IS_CAUSAL or not EVEN:
            if ((j + 1) * BS > N) | (IS_CAUSAL & (j == i)):
                keep = col_ok[None, :]
                if IS_CAUSAL:
                    keep = keep & (cols[None, :] <= rows[:, None])
                qk = tl.where(keep, qk, float("-inf"))
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
    _put(O, b, h, rows, sob, son, soh, offs_d, N, out)
    tl.store(LSE + b * slb + h * slh + rows * sln, lse, mask=row_ok)


@triton.jit
def _probs(q, k, i, j, rows, cols, lse2, qk_scale, N, BS: tl.constexpr, IS_CAUSAL: tl.constexpr,
           EVEN: tl.constexpr):
    """Softmax weights of the tile of query block ``i`` and key block ``j``:
    ``exp2(q k^T qk_scale - lse2)``, 0 where masked (lse2: the rows' lse in log2 units, 0 for
    rows that see no key). Rows past the sequence need no mask: their q, dO and delta are 0."""
    p = tl.math.exp2(tl.dot(q, tl.trans(k)) * qk_scale - lse2[:, None])
    if IS_CAUSAL or not EVEN:
        if ((j + 1) * BS > N) | (IS_CAUSAL & (j == i)):
            keep = cols[None, :] < N
            if IS_CAUSAL:
                keep = keep & (cols[None, :] <= rows[:, None])
            p = tl.where(keep, p, 0.0)
    return p


@triton.jit
def _rows_lse2(LSE, b, h, rows, slb, sln, slh, N):
    lse = tl.load(LSE + b * slb + h * slh + rows * sln, mask=rows < N, other=0.0)
    return tl.where(lse == float("-inf"), 0.0, lse * 1.4426950408889634)


@triton.jit
def _query_side(Q, DO, LSE, DELTA, b, h, rows, sqb, sqn, sqh, sdb, sdn, sdh, slb, sln, slh, offs_d, N):
    """What the backward reads of a query block: q, dO, delta = rowsum(dO * O), lse in log2."""
    q = _rows(Q, b, h, rows, sqb, sqn, sqh, offs_d, N)
    do = _rows(DO, b, h, rows, sdb, sdn, sdh, offs_d, N)
    delta = tl.load(DELTA + b * slb + h * slh + rows * sln, mask=rows < N, other=0.0)
    return q, do, delta, _rows_lse2(LSE, b, h, rows, slb, sln, slh, N)


@triton.jit
def _bwd_dkdv(Q, K, V, DO, LSE, DELTA, DK, DV, QIDX, QCNT,
              sqb, sqn, sqh, skb, skn, skh, svb, svn, svh, sdb, sdn, sdh, slb, sln, slh,
              s_idx_h, s_idx_i, s_cnt_h, N, H, scale, qk_scale,
              HEAD_DIM: tl.constexpr, BS: tl.constexpr, IS_CAUSAL: tl.constexpr, EVEN: tl.constexpr):
    """One key block: dK, dV over the query blocks that read it (``QIDX``: the transposed
    layout's plan). dK/dV share k/v's strides; DO shares q's."""
    j, b, h, cols, offs_d = _program(H, BS, HEAD_DIM)
    k = _rows(K, b, h, cols, skb, skn, skh, offs_d, N)
    v = _rows(V, b, h, cols, svb, svn, svh, offs_d, N)
    dk = tl.zeros([BS, HEAD_DIM], tl.float32)
    dv = tl.zeros([BS, HEAD_DIM], tl.float32)
    cnt = tl.load(QCNT + h * s_cnt_h + j)
    for t in range(cnt):
        i = tl.load(QIDX + h * s_idx_h + j * s_idx_i + t)
        rows = i * BS + tl.arange(0, BS)
        q, do, delta, lse2 = _query_side(Q, DO, LSE, DELTA, b, h, rows, sqb, sqn, sqh, sdb, sdn, sdh, slb, sln, slh,
                                         offs_d, N)
        p = _probs(q, k, i, j, rows, cols, lse2, qk_scale, N, BS, IS_CAUSAL, EVEN)
        dv += tl.dot(tl.trans(p.to(do.dtype)), do)
        ds = p * (tl.dot(do, tl.trans(v)) - delta[:, None])
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q)
    _put(DK, b, h, cols, skb, skn, skh, offs_d, N, dk * scale)
    _put(DV, b, h, cols, svb, svn, svh, offs_d, N, dv)


@triton.jit
def _bwd_dq(Q, K, V, DO, LSE, DELTA, DQ, IDX, CNT,
            sqb, sqn, sqh, skb, skn, skh, svb, svn, svh, sdb, sdn, sdh, slb, sln, slh,
            s_idx_h, s_idx_i, s_cnt_h, N, H, scale, qk_scale,
            HEAD_DIM: tl.constexpr, BS: tl.constexpr, IS_CAUSAL: tl.constexpr, EVEN: tl.constexpr):
    """One query block: dQ over its active key blocks. DQ shares q's strides."""
    i, b, h, rows, offs_d = _program(H, BS, HEAD_DIM)
    q, do, delta, lse2 = _query_side(Q, DO, LSE, DELTA, b, h, rows, sqb, sqn, sqh, sdb, sdn, sdh, slb, sln, slh,
                                     offs_d, N)
    dq = tl.zeros([BS, HEAD_DIM], tl.float32)
    cnt = tl.load(CNT + h * s_cnt_h + i)
    for t in range(cnt):
        j = tl.load(IDX + h * s_idx_h + i * s_idx_i + t)
        cols = j * BS + tl.arange(0, BS)
        k = _rows(K, b, h, cols, skb, skn, skh, offs_d, N)
        v = _rows(V, b, h, cols, svb, svn, svh, offs_d, N)
        p = _probs(q, k, i, j, rows, cols, lse2, qk_scale, N, BS, IS_CAUSAL, EVEN)
        ds = p * (tl.dot(do, tl.trans(v)) - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k)
    _put(DQ, b, h, rows, sqb, sqn, sqh, offs_d, N, dq * scale)


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
                   n, h, scale * _LOG2E, HEAD_DIM=d, BS=block_size, IS_CAUSAL=is_causal, EVEN=n % block_size == 0,
                   **_options(block_size, d))
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
    opts = dict(HEAD_DIM=d, BS=block_size, IS_CAUSAL=is_causal, EVEN=n % block_size == 0,
                **_options(block_size, d, "bwd"))
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
