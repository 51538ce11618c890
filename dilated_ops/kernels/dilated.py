"""Dilated attention (SPEC sections 2-3), forward and backward, on PyTorch's attention kernels
(and, for the groups forward, our Triton kernel that writes in place: triton_forward.py, its
launches recorded and replayed by triton_replay.py).

Every tensor is ``(batch, seq, heads, head_dim)``; the log-sum-exp is ``(batch, seq, heads)``.
Each branch runs as one attention launch per piece of :func:`segments.segment_views` (the full
segments, then the trailing partial one), on strided views: no gather, no index tensor, no
Python loop over segments. Outputs and gradients are written into their buffers through the
same views.

The returned ``lse`` is what the backward needs:
- groups: the branch's own log-sum-exp at the (position, head) it covers, ``-inf`` elsewhere;
- longnet: ``logsumexp_i lse_i`` over the branches that select the (position, head).
With it the longnet backward is, per branch, the plain attention backward fed with the combined
output and the combined lse (``exp(s - LSE) = a_i * P_i``: SPEC section 3's union softmax), and
the groups backward is the plain backward of each branch scaled by ``1 / G``.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence, Tuple

import torch

from . import attention
from .segments import bhld_views, from_bhld, gqa_plan, segment_views, to_bhld


def _dense_last(x: torch.Tensor) -> torch.Tensor:
    """Attention kernels need a unit stride on head_dim and no broadcast (stride 0) dims; other
    strides (e.g. q sliced out of a fused qkv projection) go through as views."""
    strides = x.stride()
    if strides[-1] == 1 and (0 not in strides or all(s != 0 or n == 1 for s, n in zip(strides, x.shape))):
        return x
    return x.contiguous()


def _triton_forward(q: torch.Tensor, dropout_p: float, scale: float):
    """``(triton_forward, triton_replay)``, the Triton in-place forward module and its launch
    replay, when the forward applies to q, else None (CPU installs without Triton included).
    Imported here, on first use, so that the package never loads Triton where it cannot apply."""
    if not q.is_cuda or q.dtype not in (torch.float16, torch.bfloat16) or dropout_p > 0.0:
        return None
    try:
        from . import triton_forward, triton_replay
    except ImportError:
        return None
    return (triton_forward, triton_replay) if triton_forward.supported(q, dropout_p, scale) else None


def empty_output(q: torch.Tensor) -> torch.Tensor:
    """The op's ``out`` buffer: q's shape and memory order, as SDPA's output follows its query
    (graphs rewritten from SDPA may ``view`` the result assuming that order). Shared with the
    fake kernel so that both report the same strides."""
    return torch.empty_like(_dense_last(q))


def _pieces(pairs):
    return zip(*(segment_views(t, call) for t, call in pairs))


def _bhld_pieces(reads, writes):
    """Per piece: ``(reads, writes)``, the ``reads`` tensors as ``(batch*segments, heads, len,
    *tail)`` views (the layout SDPA takes) and the destinations in ``writes``; each of them a
    ``(tensor, call)`` pair (q-shaped tensors with the launch's query call, k/v-shaped ones with
    its KV call: :func:`segments.gqa_plan`). Straight views (:func:`segments.bhld_views`) when
    every piece's batch and segment dims merge; else the reads come through :func:`to_bhld`
    (copies) and the destinations as 5-D pieces, which :func:`_into` writes through."""
    direct = [bhld_views(t, call) for t, call in (*reads, *writes)]
    if all(views is not None for views in direct):
        per_piece = zip(*direct)
    else:
        per_piece = ((*(to_bhld(p) for p in ps[: len(reads)]), *ps[len(reads):]) for ps in _pieces((*reads, *writes)))
    for ps in per_piece:
        yield ps[: len(reads)], ps[len(reads):]


def _mask_reads(key_padding_mask, call):
    """The ``(tensor, call)`` read of a key padding mask ``(batch, seq)`` for the launch of query
    call ``call``, whose pieces are ``(batch*segments, 1, len)`` key masks; none without one."""
    if key_padding_mask is None:
        return ()
    return ((key_padding_mask.unsqueeze(-1), dataclasses.replace(call, heads=slice(0, 1, 1))),)


def _into(g: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """A ``(batch*segments, heads, len, *tail)`` result in the shape of ``dst``, a destination
    from :func:`_bhld_pieces` (a view of that layout already, or a 5-D piece)."""
    return g if g.dim() == dst.dim() else from_bhld(g, dst)


def _groups_triton(triton_mods, q, k, v, pairs, is_causal: bool, scale: float, lse_dtype: torch.dtype,
                   num_branches: int, config, key_padding_mask=None):
    """Groups-mode forward on the Triton kernel (``triton_mods``: :func:`_triton_forward`'s pair
    of modules). No fill pass before it: the kernel also writes 0 / -inf at the positions of a
    branch's segments that no branch selects for its heads (``fill``), so the GPU starts on
    attention sooner after the call; only the trailing partial segments of branches with
    rate > 1 get a (small) fill first. ``pairs``: :func:`segments.gqa_plan`'s (query call, K/V
    call) launches; ``key_padding_mask`` ``(batch, seq)`` bool, True = keep, or None.

    The launches are recorded per input layout (``config``: what else fixes them) and replayed
    on later calls, without building the views again: the GPU waits for the host's first
    launch, so the host work before it is part of every call's time."""
    if q.device.index != torch.cuda.current_device():
        # Triton launches on the current device (its stream, its loaded kernel).
        with torch.cuda.device(q.device):
            return _groups_triton(triton_mods, q, k, v, pairs, is_causal, scale, lse_dtype, num_branches, config,
                                  key_padding_mask)
    triton_fwd, triton_rep = triton_mods
    b, n, h, d = q.shape
    out = empty_output(q)
    lse = torch.empty((b, n, h), dtype=lse_dtype, device=q.device)
    for call, _ in pairs:
        tail = n - n % call.seg_len
        if call.rate > 1 and tail < n:
            out[:, tail:, call.heads].zero_()
            lse[:, tail:, call.heads].fill_(float("-inf"))
    # The kernel reads the mask as bytes (a view, no copy); without one lse stands in for it.
    mask = lse if key_padding_mask is None else key_padding_mask.view(torch.uint8)
    bases = (q, k, v, out, lse, mask)
    key = triton_rep.layout_key(bases, "dilated", *triton_fwd.launch_config(d), is_causal, scale, *config)
    recorded = triton_rep.recorded(key)
    if recorded is not None:
        triton_rep.replay(recorded, *bases)
        return out, lse
    launches = []
    for qc, kc in pairs:
        fill = (qc.rate, qc.offset) if qc.rate > 1 else None
        reads = ((q, qc), (k, kc), (v, kc), (out, qc), (lse, qc), *_mask_reads(key_padding_mask, qc))
        for pi, (qp, kp, vp, outp, lsep, *kmp) in enumerate(_pieces(reads)):
            full_segments = pi == 0 and n >= qc.seg_len
            km = kmp[0].view(torch.uint8) if kmp else None
            launches.append(triton_fwd.forward_into(qp, kp, vp, outp, lsep, is_causal, scale, 1.0 / num_branches,
                                                    fill if full_segments else None, bases, km))
    triton_rep.record(key, launches)
    return out, lse


def dilated_attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    mode: str = "groups",
    is_causal: bool = False,
    scale: Optional[float] = None,
    dropout_p: float = 0.0,
    seed: int = 0,
    backend: str = "auto",
    head_start: int = 0,
    total_heads: int = 0,
    key_padding_mask: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)`` of dilated attention; q ``(batch, seq, heads, head_dim)``, k, v ``(batch,
    seq, heads_kv, head_dim)`` (``heads_kv`` dividing ``heads``: grouped-query attention),
    already validated. ``seed`` drives the dropout masks (used only when ``dropout_p > 0``);
    ``backend`` "sdpa" keeps to PyTorch's attention kernels, "auto" may use our Triton one.
    ``head_start``, ``total_heads``: the heads are a window of a larger call's (:func:`plan`).
    ``key_padding_mask`` ``(batch, seq)`` bool, True = keep: a query that sees no key in a
    branch gets nothing from it (SPEC section 8)."""
    q, k, v = _dense_last(q), _dense_last(k), _dense_last(v)
    b, n, h, d = q.shape
    scale = attention.default_scale(d, scale)
    num_branches = len(segment_lengths)
    config = (tuple(segment_lengths), tuple(dilation_rates), mode, head_start, total_heads)
    pairs = gqa_plan(h, k.shape[2], *config)
    lse_dtype = attention.lse_dtype(q.dtype)
    masked = key_padding_mask is not None

    if mode == "groups":
        triton_mods = _triton_forward(q, dropout_p, scale) if backend == "auto" else None
        if triton_mods is not None:
            return _groups_triton(triton_mods, q, k, v, pairs, is_causal, scale, lse_dtype, num_branches,
                                  (tuple(segment_lengths), tuple(dilation_rates), head_start, total_heads),
                                  key_padding_mask)
        # One contiguous fill each: it measured faster than a strided fill of only the heads of
        # rate > 1 branches, though that writes fewer bytes (benchmarks/RESULTS.md).
        out = empty_output(q).zero_()
        lse = torch.empty((b, n, h), dtype=lse_dtype, device=q.device).fill_(float("-inf"))
        for ci, (qc, kc) in enumerate(pairs):
            reads = ((q, qc), (k, kc), (v, kc), *_mask_reads(key_padding_mask, qc))
            for pi, ((qp, kp, vp, *keep), (outp, lsep)) in enumerate(_bhld_pieces(reads, ((out, qc), (lse, qc)))):
                o_b, l_b = attention.forward(qp, kp, vp, is_causal, scale, dropout_p, seed + 2 * ci + pi, *keep)
                torch.div(_into(o_b, outp), num_branches, out=outp)
                lsep.copy_(_into(l_b, lsep))
        return out, lse

    # longnet: every branch's output and lse first, then the softmax-weighted sum.
    out = empty_output(q).zero_()
    branch_lse = q.new_full((num_branches, b, n, h), float("-inf"), dtype=lse_dtype)
    results = []
    for ci, (qc, kc) in enumerate(pairs):
        reads = ((q, qc), (k, kc), (v, kc), *_mask_reads(key_padding_mask, qc))
        for pi, ((qp, kp, vp, *keep), (blsep,)) in enumerate(_bhld_pieces(reads, ((branch_lse[qc.branch], qc),))):
            o_b, l_b = attention.forward(qp, kp, vp, is_causal, scale, dropout_p, seed + 2 * ci + pi, *keep)
            blsep.copy_(_into(l_b, blsep))
            results.append((o_b, l_b))
    lse = torch.logsumexp(branch_lse, dim=0)
    results = iter(results)
    for qc, _ in pairs:
        for (lsep,), (outp,) in _bhld_pieces(((lse, qc),), ((out, qc),)):
            o_b, l_b = next(results)
            weight = torch.exp(l_b - lsep)
            if masked:  # a query no branch lets see a key: -inf - -inf; it gets 0
                weight = torch.where(torch.isneginf(l_b), 0.0, weight)
            outp.add_(_into(o_b * weight.unsqueeze(-1), outp))
    return out, lse


def dilated_attention_backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    mode: str = "groups",
    is_causal: bool = False,
    scale: Optional[float] = None,
    dropout_p: float = 0.0,
    seed: int = 0,
    head_start: int = 0,
    total_heads: int = 0,
    key_padding_mask: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv)``, shaped as q, k, v, given the forward's ``out`` and ``lse`` and the
    upstream ``grad_out``; ``head_start``, ``total_heads``, ``key_padding_mask`` as the
    forward's. A KV head's gradients sum over the query heads that read it."""
    q, k, v = _dense_last(q), _dense_last(k), _dense_last(v)
    grad_out = grad_out.contiguous()
    d = q.shape[-1]
    scale = attention.default_scale(d, scale)
    num_branches = len(segment_lengths)
    pairs = gqa_plan(q.shape[2], k.shape[2], tuple(segment_lengths), tuple(dilation_rates), mode, head_start,
                     total_heads)
    groups = mode == "groups"
    # groups mode writes each (position, head) of dq once; dk, dv too unless KV heads are shared
    overwrite = (True, k.shape[2] == q.shape[2], v.shape[2] == q.shape[2]) if groups else (False,) * 3
    dq, dk, dv = (torch.zeros(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))
    for ci, (qc, kc) in enumerate(pairs):
        reads = ((grad_out, qc), (q, qc), (k, kc), (v, kc), (out, qc), (lse, qc), *_mask_reads(key_padding_mask, qc))
        pieces = _bhld_pieces(reads, ((dq, qc), (dk, kc), (dv, kc)))
        for pi, ((gp, qp, kp, vp, outp, lsep, *keep), dsts) in enumerate(pieces):
            # groups: the branch's own output is G * out (its share of the combine is 1/G);
            # longnet: the combined output with the combined lse (see the module docstring).
            o_in = outp * num_branches if groups else outp
            grads = attention.backward(gp, qp, kp, vp, o_in, lsep, is_causal, scale, dropout_p, seed + 2 * ci + pi,
                                       *keep)
            for dst, g, once in zip(dsts, grads, overwrite):
                if once:
                    torch.div(_into(g, dst), num_branches, out=dst)
                elif groups:
                    dst.add_(_into(g / num_branches, dst))
                else:
                    dst.add_(_into(g, dst))
    return dq, dk, dv
