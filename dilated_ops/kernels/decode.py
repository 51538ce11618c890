"""Dilated attention for queries at the end of a KV cache (SPEC section 9), forward and backward.

q ``(batch, sq, heads, head_dim)`` holds positions ``skv - sq .. skv - 1`` of k, v ``(batch,
skv, heads_kv, head_dim)`` (bottom-right aligned, as Hugging Face's caches are). Row ``i`` of
the result is row ``skv - sq + i`` of the full forward over the ``skv`` positions. Per branch
``(w, r)`` the query at position ``t`` reads only keys of its own segment in its own offset
class: positions ``s + c, s + c + r, ...`` (``s`` the segment's start, ``c = (t - s) % r``),
at most ``w / r`` of them, and only the heads whose offset is ``c`` select it at all. So a step
gathers ``sum_i w_i / r_i`` keys per KV head whatever the context length.

On CUDA the forward is :mod:`.triton_decode`'s kernels, which read those keys in place. Otherwise,
and for the backward, both passes gather them (``k[:, idx]``) and work on them in PyTorch ops: a masked
softmax per branch, SPEC section 3's combine, and the backward of that softmax (the
probabilities recomputed, as a flash backward does), scattered back with ``index_add_``.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

from .attention import default_scale, lse_dtype
from .segments import head_groups


def _branch(q, k, w: int, r: int, head_offsets: torch.Tensor, positions: torch.Tensor, is_causal: bool,
            scale: float, key_padding_mask: Optional[torch.Tensor]):
    """One branch at the query ``positions`` ``(sq,)``: ``(idx, p, lse)``. ``idx`` ``(sq, w / r)``:
    the key positions each query may read (clamped into the cache where there are fewer); ``p``
    ``(b, sq, h, w / r)``: the softmax over them (0 on keys it may not read); ``lse`` ``(b, sq,
    h)``, ``-inf`` where the head does not select the position (``head_offsets`` ``(h,)``: each
    head's offset in this branch, -1 for none) or sees no key."""
    b, sq, h, d = q.shape
    skv, h_kv = k.shape[1], k.shape[2]
    start = positions - positions % w  # the segment's first position
    cls = (positions - start) % r  # the query's offset class
    idx = start[:, None] + cls[:, None] + r * torch.arange(w // r, device=q.device)  # (sq, w / r)
    valid = idx < torch.clamp(start + w, max=skv)[:, None]
    if is_causal:
        valid = valid & (idx <= positions[:, None])
    idx = torch.where(valid, idx, torch.zeros((), dtype=idx.dtype, device=idx.device))
    allowed = valid.unsqueeze(0)  # (1 or b, sq, m)
    if key_padding_mask is not None:
        allowed = allowed & key_padding_mask[:, idx]
    selects = head_offsets[None, :] == cls[:, None]  # (sq, h)
    allowed = allowed[:, :, None, :] & selects[None, :, :, None]  # (b, sq, h, m)
    s = torch.einsum("bqkgd,bqmkd->bqkgm", _grouped(q, h_kv), _gather(k, idx, q.dtype)).reshape(b, sq, h, -1) * scale
    s = s.masked_fill(~allowed, float("-inf"))
    row_ok = allowed.any(-1)  # (b, sq, h)
    s = torch.where(row_ok.unsqueeze(-1), s, torch.zeros((), dtype=s.dtype, device=s.device))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse.unsqueeze(-1)) * allowed
    return idx, p, lse.masked_fill(~row_ok, float("-inf"))


def _gather(x: torch.Tensor, idx: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x[:, idx]`` ``(b, sq, m, h_kv, d)`` in the compute ``dtype``: cast after the gather, so a
    half-precision cache is never converted whole (that would cost O(context) per step)."""
    return x[:, idx].to(dtype)


def _grouped(x: torch.Tensor, h_kv: int) -> torch.Tensor:
    """``(b, sq, h, ...)`` as ``(b, sq, h_kv, h / h_kv, ...)``: query head ``j`` reads KV head
    ``j // (h / h_kv)``."""
    return x.view(x.shape[0], x.shape[1], h_kv, x.shape[2] // h_kv, *x.shape[3:])


def _weighted_values(p: torch.Tensor, v: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``sum_m p[..., m] v[idx[q, m]]``: ``(b, sq, h, d)``."""
    b, sq, h, _ = p.shape
    out = torch.einsum("bqkgm,bqmkd->bqkgd", _grouped(p, v.shape[2]), _gather(v, idx, p.dtype))
    return out.reshape(b, sq, h, v.shape[-1])


def _branches(q, k, segment_lengths, dilation_rates, mode, is_causal, scale, key_padding_mask):
    """Per branch ``(idx, p, lse, in_group)`` (``in_group``: the heads of that branch's group in
    groups mode, None in longnet mode), on q's positions at the end of the cache."""
    sq, h = q.shape[1], q.shape[2]
    positions = torch.arange(k.shape[1] - sq, k.shape[1], device=q.device)
    heads = torch.arange(h, device=q.device)
    if mode == "groups":
        groups = head_groups(h, len(segment_lengths))
    for i, (w, r) in enumerate(zip(segment_lengths, dilation_rates)):
        if mode == "groups":
            in_group = (heads >= groups[i][0]) & (heads < groups[i][1])
            offsets = torch.where(in_group, i % r, -1)
        else:
            in_group, offsets = None, heads % r
        yield (*_branch(q, k, w, r, offsets, positions, is_causal, scale, key_padding_mask), in_group)


def _combine_longnet(lses):
    """``(weights, lse)`` of SPEC section 3's longnet combine: ``weights`` ``(G, b, sq, h)`` the
    branches' shares ``exp(lse_i - lse)``, 0 where a query sees no key at all (lse ``-inf``)."""
    stacked = torch.stack(lses)
    seen = torch.isfinite(stacked).any(0)
    # Rows no branch selects: logsumexp over finite stand-ins (over -inf alone its gradient is NaN).
    zero = torch.zeros((), dtype=stacked.dtype, device=stacked.device)
    total = torch.logsumexp(torch.where(seen, stacked, zero), dim=0)
    weights = torch.where(seen, torch.exp(stacked - total), zero)
    return weights, total.masked_fill(~seen, float("-inf"))


def _triton_decode(q: torch.Tensor, k: torch.Tensor):
    """The Triton decode module when it applies to these inputs (CUDA), else None; imported on
    first use, so CPU installs never load Triton."""
    if not q.is_cuda:
        return None
    try:
        from . import triton_decode
    except ImportError:
        return None
    return triton_decode if triton_decode.supported(q, k) else None


def decode_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    mode: str,
    is_causal: bool,
    scale: Optional[float],
    key_padding_mask: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)``: out ``(batch, sq, heads, head_dim)`` in q's dtype, lse ``(batch, sq,
    heads)`` as :mod:`.dilated` defines it per mode (groups: the head's branch; longnet: the
    log of the summed softmax denominators), ``-inf`` where a query sees no key."""
    triton_decode = _triton_decode(q, k)
    if triton_decode is not None:
        return triton_decode.forward(q, k, v, segment_lengths, dilation_rates, mode, is_causal, scale,
                                     key_padding_mask)
    b, sq, h, d = q.shape
    scale = default_scale(d, scale)
    ct = lse_dtype(q.dtype)  # half types accumulate in float32, as the lse
    qc = q.to(ct)  # k and v are cast as gathered
    branches = list(_branches(qc, k, segment_lengths, dilation_rates, mode, is_causal, scale, key_padding_mask))
    if mode == "groups":
        out = torch.zeros(b, sq, h, d, dtype=ct, device=q.device)
        lse = torch.full((b, sq, h), float("-inf"), dtype=ct, device=q.device)
        for idx, p, lse_i, in_group in branches:
            out = torch.where(in_group[:, None], _weighted_values(p, v, idx) / len(branches), out)
            lse = torch.where(in_group, lse_i, lse)
    else:
        weights, lse = _combine_longnet([lse_i for _, _, lse_i, _ in branches])
        out = sum(_weighted_values(p * wt.unsqueeze(-1), v, idx) for (idx, p, _, _), wt in zip(branches, weights))
    return out.to(q.dtype), lse.to(lse_dtype(q.dtype))


def decode_backward(grad_out, q, k, v, out, segment_lengths, dilation_rates, mode, is_causal, scale,
                    key_padding_mask=None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv)`` for the upstream ``grad_out`` of :func:`decode_forward`'s ``out``.

    Both modes as one softmax per query over the union of its branches' keys (SPEC section 3):
    branch ``i`` has probabilities ``P_i = c_i p_i`` (longnet: ``c_i`` the branch's share;
    groups: ``1 / G`` on its group's heads), and ``dS_i = P_i (dO . v - delta)`` with ``delta =
    rowsum(dO * O)``, ``O`` the output the branch's share is of (longnet: ``out``; groups: the
    branch's own output, ``G * out``)."""
    b, sq, h, d = q.shape
    scale = default_scale(d, scale)
    ct = lse_dtype(q.dtype)  # half types accumulate in float32, as the lse
    qc, go = q.to(ct), grad_out.to(ct)  # k and v are cast as gathered
    branches = list(_branches(qc, k, segment_lengths, dilation_rates, mode, is_causal, scale, key_padding_mask))
    delta = (go * out.to(ct)).sum(-1)  # (b, sq, h)
    if mode == "groups":
        shares = [in_group.to(ct).expand(b, sq, h) / len(branches) for _, _, _, in_group in branches]
        delta = delta * len(branches)
    else:
        shares, _ = _combine_longnet([lse_i for _, _, lse_i, _ in branches])
    h_kv = k.shape[2]
    dq = torch.zeros_like(qc)
    dk, dv = torch.zeros_like(k, dtype=ct), torch.zeros_like(v, dtype=ct)
    for (idx, p, _, _), share in zip(branches, shares):
        probs = _grouped(p * share.unsqueeze(-1), h_kv)  # (b, sq, h_kv, group, m)
        kg, vg = _gather(k, idx, ct), _gather(v, idx, ct)  # (b, sq, m, h_kv, d)
        dp = torch.einsum("bqkgd,bqmkd->bqkgm", _grouped(go, h_kv), vg)
        ds = probs * (dp - _grouped(delta, h_kv).unsqueeze(-1))
        dq = dq + torch.einsum("bqkgm,bqmkd->bqkgd", ds, kg).reshape(b, sq, h, d) * scale
        flat = idx.reshape(-1)
        dk.index_add_(1, flat, torch.einsum("bqkgm,bqkgd->bqmkd", ds, _grouped(qc, h_kv)).reshape(b, -1, h_kv, d)
                      * scale)
        dv.index_add_(1, flat, torch.einsum("bqkgm,bqkgd->bqmkd", probs, _grouped(go, h_kv)).reshape(b, -1, h_kv, d))
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)

