"""Triton kernels of block-sparse attention (SPEC section 4) for CUDA float16/bfloat16: the
forward and the backward (one kernel for dK/dV over tiles of key blocks, one for dQ over tiles
of query blocks), each program walking only the active blocks of its row or column of the
layout, FlashAttention-2 style (online softmax, scores never stored). On Hopper and newer the
tiles a program walks come through TMA descriptors (:func:`_use_tma`). Each launch is recorded
per layout and replayed by :mod:`.triton_replay` on later calls (:func:`_launch`).

q, k, v, out ``(batch, seq, heads, head_dim)`` with a unit stride on head_dim, lse and delta
``(batch, seq, heads)`` float32. A plan (:class:`dilated_ops.kernels.block_sparse.Plan`) gives,
per (layout head, block), the count and the indices of the active blocks, int32. Imported only
where it applies (:func:`supported`), so CPU installs need no Triton.
"""
from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl

from . import triton_replay
from .attention import device_capability
from .triton_replay import Launch

try:  # Triton >= 3.4; TMA loads need a Hopper GPU or newer
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover
    TensorDescriptor = None

_LOG2E = 1.4426950408889634
BLOCK_SIZES = (16, 32, 64, 128)
HEAD_DIMS = (16, 32, 64, 128)


def supported(q: torch.Tensor, block_size: int) -> bool:
    return (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and block_size in BLOCK_SIZES
            and q.shape[-1] in HEAD_DIMS)


# Tiles (BLOCK_M queries x BLOCK_N keys, each dividing the layout's block), num_warps and
# num_stages of the kernels per (block_size, head_dim): "fwd" the forward, "dkdv" the backward's
# pass over key tiles (BLOCK_N keys each, query tiles of BLOCK_M), "dq" its pass over query
# tiles. Chosen by a sweep on an H200 (benchmarks/RESULTS.md says which).
OPTIONS = {
    "fwd": lambda bs, d: (64, 64, 4, 3) if d <= 64 else (128, 64, 4, 2),
    "dq": lambda bs, d: (64, 64, 4, 2) if d <= 64 else (128, 128, 8, 2),
    "dkdv": lambda bs, d: (64, 64, 4, 3) if d <= 64 else (64, 64, 4, 2),
}


def _options(block_size: int, head_dim: int, kind: str) -> dict:
    block_m, block_n, warps, stages = OPTIONS[kind](block_size, head_dim)
    return {"BLOCK_M": min(block_m, block_size), "BLOCK_N": min(block_n, block_size), "num_warps": warps,
            "num_stages": stages}


@triton.jit
def _rows(P, b, h, pos, sb, sn, sh, offs_d, N):
    """The ``(len(pos), HEAD_DIM)`` tile of positions ``pos`` of (batch b, head h); 0 past N."""
    return tl.load(P + b * sb + h * sh + pos[:, None] * sn + offs_d[None, :], mask=(pos < N)[:, None], other=0.0)


@triton.jit
def _tile(P, b, h, first, pos, sb, sn, sh, offs_d, N, SIZE: tl.constexpr, HEAD_DIM: tl.constexpr,
          TMA: tl.constexpr):
    """The ``(SIZE, HEAD_DIM)`` tile of positions ``pos`` (``first`` the first of them) of
    (batch b, head h). From pointer ``P``: 0 past N. Where TMA, through descriptor ``P`` over the
    ``(batch * seq, heads * head_dim)`` view: past N come the next batch's first rows (finite;
    the callers mask them) or 0 at the end."""
    if TMA:
        return P.load([(b * N + first).to(tl.int32), (h * HEAD_DIM).to(tl.int32)])
    else:
        return _rows(P, b, h, pos, sb, sn, sh, offs_d, N)


@triton.jit
def _put(P, b, h, pos, sb, sn, sh, offs_d, N, x):
    tl.store(P + b * sb + h * sh + pos[:, None] * sn + offs_d[None, :], x.to(P.dtype.element_ty),
             mask=(pos < N)[:, None])


@triton.jit
def _program(H, BS: tl.constexpr, TILE: tl.constexpr, HEAD_DIM: tl.constexpr):
    """(layout block, batch, head, this program's TILE positions, head_dim offsets): program 0
    walks tiles of TILE positions, program 1 (batch, head) pairs."""
    tile = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    return tile // (BS // TILE), bh // H, bh % H, tile * TILE + tl.arange(0, TILE), tl.arange(0, HEAD_DIM)


@triton.jit
def _masked(i, j, start, SIZE: tl.constexpr, N, IS_CAUSAL: tl.constexpr, EVEN: tl.constexpr):
    """Whether the tile of query block ``i`` and key block ``j`` whose keys start at ``start``
    needs a mask: it runs past N, or it is in the causal diagonal block. Neither can happen when
    EVEN and not causal: no branch then."""
    if IS_CAUSAL or not EVEN:
        return (start + SIZE > N) | (IS_CAUSAL & (j == i))
    return False


@triton.jit
def _fwd(Q, K, V, O, LSE, IDX, CNT,
         sqb, sqn, sqh, skb, skn, skh, svb, svn, svh, sob, son, soh, slb, sln, slh,
         s_idx_h, s_idx_i, s_cnt_h, N, H, qk_scale,
         HEAD_DIM: tl.constexpr, BS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
         IS_CAUSAL: tl.constexpr, EVEN: tl.constexpr, TMA: tl.constexpr, POS_SCALE: tl.constexpr):
    """A tile of BLOCK_M queries of query block i: its active key blocks in tiles of BLOCK_N.
    Q, K, V: TMA descriptors where TMA, else pointers. POS_SCALE: qk_scale > 0."""
    i, b, h, rows, offs_d = _program(H, BS, BLOCK_M, HEAD_DIM)
    SUB: tl.constexpr = BS // BLOCK_N
    q = _tile(Q, b, h, tl.program_id(0) * BLOCK_M, rows, sqb, sqn, sqh, offs_d, N, BLOCK_M, HEAD_DIM, TMA)
    cnt = tl.load(CNT + h * s_cnt_h + i)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for t in range(cnt * SUB):
        j = tl.load(IDX + h * s_idx_h + i * s_idx_i + t // SUB)
        start = j * BS + (t % SUB) * BLOCK_N
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        if TMA:
            qk = tl.dot(q, tl.trans(_tile(K, b, h, start, cols, skb, skn, skh, offs_d, N, BLOCK_N, HEAD_DIM, TMA)))
        else:  # K^T straight from memory
            qk = tl.dot(q, tl.load(K + b * skb + h * skh + cols[None, :] * skn + offs_d[:, None],
                                   mask=col_ok[None, :], other=0.0))
        v = _tile(V, b, h, start, cols, svb, svn, svh, offs_d, N, BLOCK_N, HEAD_DIM, TMA)
        if not POS_SCALE:  # scaled first: the mask's -inf must stay -inf
            qk = qk * qk_scale
        if _masked(i, j, start, BLOCK_N, N, IS_CAUSAL, EVEN):
            keep = col_ok[None, :]
            if IS_CAUSAL:
                keep = keep & (cols[None, :] <= rows[:, None])
            qk = tl.where(keep, qk, float("-inf"))
        if POS_SCALE:
            # The max taken on the raw scores, scaled per row: the scaling and the max's
            # subtraction are one FMA per score.
            m_ij = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            m_safe = tl.where(m_ij == float("-inf"), 0.0, m_ij)  # a row with no key yet: not -inf - -inf
            p = tl.math.exp2(qk * qk_scale - m_safe[:, None])
        else:
            m_ij = tl.maximum(m_i, tl.max(qk, 1))
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
    tl.store(LSE + b * slb + h * slh + rows * sln, lse, mask=rows < N)


@triton.jit
def _probs(q, k, rows, cols, lse2, qk_scale, masked, N, IS_CAUSAL: tl.constexpr):
    """Softmax weights of a (queries ``rows``, keys ``cols``) tile: ``exp2(q k^T qk_scale -
    lse2)``, 0 where masked (lse2: the rows' lse in log2 units, 0 for rows that see no key). Rows
    past the sequence need no mask: their q, dO and delta are 0."""
    p = tl.math.exp2(tl.dot(q, tl.trans(k)) * qk_scale - lse2[:, None])
    if masked:
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
def _bwd_dq(Q, K, V, O, DO, LSE, DELTA, DQ, IDX, CNT,
            sqb, sqn, sqh, skb, skn, skh, svb, svn, svh, sob, son, soh, sdb, sdn, sdh, slb, sln, slh,
            s_idx_h, s_idx_i, s_cnt_h, N, H, scale, qk_scale,
            HEAD_DIM: tl.constexpr, BS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
            IS_CAUSAL: tl.constexpr, EVEN: tl.constexpr, TMA: tl.constexpr):
    """A tile of BLOCK_M queries: delta = rowsum(dO * O), stored for :func:`_bwd_dkdv` (launched
    after), and dQ over the active key blocks in tiles of BLOCK_N. DQ shares q's strides. K, V:
    TMA descriptors where TMA, else pointers."""
    i, b, h, rows, offs_d = _program(H, BS, BLOCK_M, HEAD_DIM)
    SUB: tl.constexpr = BS // BLOCK_N
    q = _rows(Q, b, h, rows, sqb, sqn, sqh, offs_d, N)
    do = _rows(DO, b, h, rows, sdb, sdn, sdh, offs_d, N)
    o = _rows(O, b, h, rows, sob, son, soh, offs_d, N)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    tl.store(DELTA + b * slb + h * slh + rows * sln, delta, mask=rows < N)
    lse2 = _rows_lse2(LSE, b, h, rows, slb, sln, slh, N)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    cnt = tl.load(CNT + h * s_cnt_h + i)
    for t in range(cnt * SUB):
        j = tl.load(IDX + h * s_idx_h + i * s_idx_i + t // SUB)
        start = j * BS + (t % SUB) * BLOCK_N
        cols = start + tl.arange(0, BLOCK_N)
        k = _tile(K, b, h, start, cols, skb, skn, skh, offs_d, N, BLOCK_N, HEAD_DIM, TMA)
        v = _tile(V, b, h, start, cols, svb, svn, svh, offs_d, N, BLOCK_N, HEAD_DIM, TMA)
        p = _probs(q, k, rows, cols, lse2, qk_scale, _masked(i, j, start, BLOCK_N, N, IS_CAUSAL, EVEN), N,
                   IS_CAUSAL)
        ds = p * (tl.dot(do, tl.trans(v)) - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k)
    _put(DQ, b, h, rows, sqb, sqn, sqh, offs_d, N, dq * scale)


@triton.jit
def _bwd_dkdv(Q, K, V, DO, LSE, DELTA, DK, DV, QIDX, QCNT,
              sqb, sqn, sqh, skb, skn, skh, svb, svn, svh, sdb, sdn, sdh, slb, sln, slh,
              s_idx_h, s_idx_i, s_cnt_h, N, H, scale, qk_scale,
              HEAD_DIM: tl.constexpr, BS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              IS_CAUSAL: tl.constexpr, EVEN: tl.constexpr, TMA: tl.constexpr):
    """A tile of BLOCK_N keys of key block j: dK, dV over the query blocks that read it
    (``QIDX``: the transposed layout's plan) in tiles of BLOCK_M. dK/dV share k/v's strides; DO
    shares q's. Q, DO: TMA descriptors where TMA, else pointers."""
    j, b, h, cols, offs_d = _program(H, BS, BLOCK_N, HEAD_DIM)
    SUB: tl.constexpr = BS // BLOCK_M
    k = _rows(K, b, h, cols, skb, skn, skh, offs_d, N)
    v = _rows(V, b, h, cols, svb, svn, svh, offs_d, N)
    start = tl.program_id(0) * BLOCK_N  # of the key tile
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    cnt = tl.load(QCNT + h * s_cnt_h + j)
    for t in range(cnt * SUB):
        i = tl.load(QIDX + h * s_idx_h + j * s_idx_i + t // SUB)
        first = i * BS + (t % SUB) * BLOCK_M
        rows = first + tl.arange(0, BLOCK_M)
        q = _tile(Q, b, h, first, rows, sqb, sqn, sqh, offs_d, N, BLOCK_M, HEAD_DIM, TMA)
        do = _tile(DO, b, h, first, rows, sdb, sdn, sdh, offs_d, N, BLOCK_M, HEAD_DIM, TMA)
        if TMA and not EVEN:  # rows past the sequence must add nothing: zero them as pointer loads do
            q = tl.where((rows < N)[:, None], q, 0.0)
            do = tl.where((rows < N)[:, None], do, 0.0)
        delta = tl.load(DELTA + b * slb + h * slh + rows * sln, mask=rows < N, other=0.0)
        lse2 = _rows_lse2(LSE, b, h, rows, slb, sln, slh, N)
        p = _probs(q, k, rows, cols, lse2, qk_scale, _masked(i, j, start, BLOCK_N, N, IS_CAUSAL, EVEN), N,
                   IS_CAUSAL)
        dv += tl.dot(tl.trans(p.to(do.dtype)), do)
        ds = p * (tl.dot(do, tl.trans(v)) - delta[:, None])
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q)
    _put(DK, b, h, cols, skb, skn, skh, offs_d, N, dk * scale)
    _put(DV, b, h, cols, svb, svn, svh, offs_d, N, dv)


def _plan_args(index: torch.Tensor, counts: torch.Tensor):
    """The plan's tensors and strides; a layout shared by every head has head stride 0."""
    shared = index.shape[0] == 1
    return index, counts, (0 if shared else index.stride(0)), index.stride(1), (0 if shared else counts.stride(0))


def _use_tma(*tensors: torch.Tensor) -> bool:
    """Whether the kernels load these tensors through TMA descriptors: Triton has them, the GPU
    is a Hopper or newer, and each tensor is a ``(batch * seq, heads * head_dim)`` matrix as TMA
    takes it (16-byte aligned, row stride a multiple of 16 bytes). ``DILATED_OPS_TMA=0`` turns
    them off."""
    t = tensors[0]
    if (TensorDescriptor is None or not t.is_cuda or os.environ.get("DILATED_OPS_TMA", "1") == "0"
            or device_capability(t.device) < (9, 0)):
        return False
    return all(x.data_ptr() % 16 == 0 and x.stride(3) == 1 and x.stride(2) == x.shape[3]
               and (x.shape[0] == 1 or x.stride(0) == x.shape[1] * x.stride(1))
               and (x.stride(1) * x.element_size()) % 16 == 0 for x in tensors)


def _desc(t: torch.Tensor, rows: int):
    """A TMA descriptor over the ``(batch * seq, heads * head_dim)`` view of ``t`` whose block
    is ``rows`` positions of one head."""
    b, n, h, d = t.shape
    return TensorDescriptor(t, [b * n, h * d], [t.stride(1), 1], [rows, d])


def _launch(kernel, grid, tensors, rows, scalars, constexprs: dict, options: dict, config: tuple) -> None:
    """``kernel[grid]`` over the pointer arguments ``tensors`` (each loaded through a TMA
    descriptor of ``rows`` positions where ``rows`` gives a number, else a pointer), then
    ``scalars`` and ``constexprs``. The launch is recorded per layout (``config``: the call's
    settings the tensors do not fix) and replayed on later calls through the compiled kernel's C
    launcher (:mod:`.triton_replay`): at short sequences a call's time is mostly the host's."""
    key = triton_replay.layout_key(tensors, kernel.fn.__name__, *config)
    rec = triton_replay.recorded(key)
    if rec is not None:
        triton_replay.replay(rec, *tensors)
        return
    args = [t if r is None else _desc(t, r) for t, r in zip(tensors, rows)]
    compiled = kernel[grid](*args, *scalars, **constexprs, **options)
    if triton_replay.REPLAY:
        tma = tuple(None if r is None else (tuple(a.shape), tuple(a.strides), tuple(a.block_shape))
                    for a, r in zip(args, rows))
        rest = (*scalars, *(constexprs[name] for name in kernel.arg_names[len(tensors) + len(scalars):]))
        triton_replay.record(key, [Launch(compiled, tuple(grid) + (1,) * (3 - len(grid)), (0,) * len(tensors),
                                          tma if any(r is not None for r in rows) else None, rest)])


def _tiles(block_size: int, head_dim: int, kind: str):
    """``(BLOCK_M, BLOCK_N, launch options)`` of a kernel (:data:`OPTIONS`)."""
    opts = _options(block_size, head_dim, kind)
    return opts.pop("BLOCK_M"), opts.pop("BLOCK_N"), opts


def forward(q, k, v, plan, block_size: int, is_causal: bool, scale: float):
    """``(out, lse)`` as :func:`dilated_ops.kernels.block_sparse.forward`."""
    b, n, h, d = q.shape
    out = torch.empty(b, n, h, d, dtype=q.dtype, device=q.device)
    lse = torch.empty(b, n, h, dtype=torch.float32, device=q.device)
    idx, cnt, s_h, s_i, s_c = _plan_args(plan.index32, plan.counts)
    bm, bn, opts = _tiles(block_size, d, "fwd")
    tma = _use_tma(q, k, v)
    with _on(q):
        _launch(_fwd, (triton.cdiv(n, bm), b * h), (q, k, v, out, lse, idx, cnt),
                (bm, bn, bn, None, None, None, None) if tma else (None,) * 7,
                (*_s(q), *_s(k), *_s(v), *_s(out), *lse.stride(), s_h, s_i, s_c, n, h, scale * _LOG2E),
                dict(HEAD_DIM=d, BS=block_size, BLOCK_M=bm, BLOCK_N=bn, IS_CAUSAL=is_causal,
                     EVEN=n % block_size == 0, TMA=tma, POS_SCALE=scale > 0), opts,
                (tma, is_causal, scale, block_size, bm, bn, *opts.values()))
    return out, lse


def backward(grad_out, q, k, v, out, lse, plan, block_size: int, is_causal: bool, scale: float):
    """``(dq, dk, dv)`` as :func:`dilated_ops.kernels.block_sparse.backward`."""
    b, n, h, d = q.shape
    grad_out = grad_out if grad_out.stride(-1) == 1 else grad_out.contiguous()
    out = out if out.stride(-1) == 1 else out.contiguous()
    lse = lse.contiguous()
    delta = torch.empty_like(lse)  # rowsum(dO * O), written by the dq kernel, read by the dk/dv one
    dq = torch.empty(b, n, h, d, dtype=q.dtype, device=q.device)
    dk = torch.empty(b, n, h, d, dtype=k.dtype, device=k.device)
    dv = torch.empty(b, n, h, d, dtype=v.dtype, device=v.device)
    # dk/dv are written with k's/v's strides, dq with q's: pass contiguous q, k, v alike.
    q, k, v = (t.contiguous() for t in (q, k, v))
    tma = _use_tma(q, k, v, grad_out)
    strides = (*_s(q), *_s(k), *_s(v))
    with _on(q):
        bm, bn, opts = _tiles(block_size, d, "dq")  # K, V walked: through TMA where it applies
        idx, cnt, s_h, s_i, s_c = _plan_args(plan.index32, plan.counts)
        walked = bn if tma else None
        _launch(_bwd_dq, (triton.cdiv(n, bm), b * h), (q, k, v, out, grad_out, lse, delta, dq, idx, cnt),
                (None, walked, walked) + (None,) * 7,
                (*strides, *_s(out), *_s(grad_out), *lse.stride(), s_h, s_i, s_c, n, h, scale, scale * _LOG2E),
                dict(HEAD_DIM=d, BS=block_size, BLOCK_M=bm, BLOCK_N=bn, IS_CAUSAL=is_causal,
                     EVEN=n % block_size == 0, TMA=tma), opts, (tma, is_causal, scale, block_size, bm, bn, *opts.values()))
        bm, bn, opts = _tiles(block_size, d, "dkdv")  # Q, dO walked
        qidx, qcnt, s_h, s_i, s_c = _plan_args(*plan.transposed())
        walked = bm if tma else None
        _launch(_bwd_dkdv, (triton.cdiv(n, bn), b * h), (q, k, v, grad_out, lse, delta, dk, dv, qidx, qcnt),
                (walked, None, None, walked) + (None,) * 6,
                (*strides, *_s(grad_out), *lse.stride(), s_h, s_i, s_c, n, h, scale, scale * _LOG2E),
                dict(HEAD_DIM=d, BS=block_size, BLOCK_M=bm, BLOCK_N=bn, IS_CAUSAL=is_causal,
                     EVEN=n % block_size == 0, TMA=tma), opts, (tma, is_causal, scale, block_size, bm, bn, *opts.values()))
    return dq, dk, dv


def _on(t: torch.Tensor):
    # Triton launches on the current CUDA device; the interpreter (tests on CPU) has none.
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _s(t: torch.Tensor):
    """(batch, seq, heads) strides of a ``(batch, seq, heads, head_dim)`` tensor."""
    return t.stride(0), t.stride(1), t.stride(2)
