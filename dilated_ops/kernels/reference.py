"""The float64 oracle of SPEC sections 2-3: dense attention under explicit boolean masks.

Slow (O(seq^2) memory per head) and written straight from the SPEC, sharing no code with the
fast paths. Imported by tests and benchmarks only; differentiable by plain autograd.
Layout: q, k, v ``(batch, seq, heads, head_dim)``.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch


def branch_masks(
    n: int, w: int, r: int, offsets: torch.Tensor, is_causal: bool
) -> Tuple[torch.Tensor, torch.Tensor]:
    """For one branch ``(w, r)`` with per-head ``offsets`` ``(heads,)``: ``selected``
    ``(heads, n)`` (the positions the branch selects) and ``allowed`` ``(heads, n, n)``
    (query i may attend key j)."""
    pos = torch.arange(n, device=offsets.device)
    seg = pos // w
    within = pos - seg * w
    selected = (within.unsqueeze(0) % r) == offsets.unsqueeze(1)  # (heads, n)
    same_segment = seg.unsqueeze(1) == seg.unsqueeze(0)  # (n, n)
    allowed = selected.unsqueeze(2) & selected.unsqueeze(1) & same_segment
    if is_causal:
        allowed = allowed & (pos.unsqueeze(0) <= pos.unsqueeze(1))
    return selected, allowed


def _masked_attention(q, k, v, allowed, scale):
    """Per-head masked attention; returns ``out`` (zero on rows with no allowed key) and
    ``lse`` (``-inf`` there). q, k, v ``(b, n, h, d)``, allowed ``(h, n, n)`` or, per batch
    row, ``(b, h, n, n)``."""
    if allowed.dim() == 3:
        allowed = allowed.unsqueeze(0)
    s = torch.einsum("bihd,bjhd->bhij", q, k) * scale
    s = s.masked_fill(~allowed, float("-inf"))
    row_ok = allowed.any(-1)  # (1 or b, h, n)
    s = torch.where(row_ok.unsqueeze(-1), s, torch.zeros((), dtype=s.dtype))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse.unsqueeze(-1))
    out = torch.einsum("bhij,bjhd->bihd", p, v) * row_ok.transpose(1, 2).unsqueeze(-1)
    lse = lse.masked_fill(~row_ok, float("-inf")).transpose(1, 2)  # (b, n, h)
    return out, lse


def dilated_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    mode: str = "groups",
    is_causal: bool = False,
    scale: Optional[float] = None,
    key_padding_mask: Optional[torch.Tensor] = None,
    cu_seqlens: Optional[Sequence[int]] = None,
) -> torch.Tensor:
    """Dilated attention of SPEC sections 2-3 and 8, computed in float64 and returned in q's
    dtype. k, v may have fewer heads than q (grouped-query attention: query head j reads KV head
    ``j // (heads // heads_kv)``); ``key_padding_mask`` ``(batch, seq)`` bool, True = keep;
    ``cu_seqlens`` the packed documents' boundaries ``[0, ..., seq]``: each document on its own."""
    if cu_seqlens is not None:
        bounds = [int(x) for x in cu_seqlens]
        return torch.cat([
            dilated_attention_reference(
                q[:, a:z], k[:, a:z], v[:, a:z], segment_lengths, dilation_rates, mode, is_causal, scale,
                None if key_padding_mask is None else key_padding_mask[:, a:z])
            for a, z in zip(bounds[:-1], bounds[1:])], dim=1)
    dtype = q.dtype
    q, k, v = (t.to(torch.float64) for t in (q, k, v))
    b, n, h, d = q.shape
    if k.shape[2] != h:  # grouped-query attention: each KV head serves h / h_kv query heads
        k, v = (t.repeat_interleave(h // t.shape[2], dim=2) for t in (k, v))
    keep = None if key_padding_mask is None else key_padding_mask.to(q.device).view(b, 1, 1, n)
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    num_branches = len(segment_lengths)
    heads = torch.arange(h, device=q.device)
    if mode == "groups":
        size, extra = divmod(h, num_branches)
        sizes = [size + (1 if i < extra else 0) for i in range(num_branches)]
        group_of_head = torch.repeat_interleave(torch.arange(num_branches), torch.tensor(sizes)).to(q.device)
        out = torch.zeros_like(q)
        for i, (w, r) in enumerate(zip(segment_lengths, dilation_rates)):
            _, allowed = branch_masks(n, w, r, torch.full((h,), i % r, device=q.device), is_causal)
            o_i, _ = _masked_attention(q, k, v, allowed if keep is None else allowed & keep, scale)
            in_group = (group_of_head == i).to(torch.float64).view(1, 1, h, 1)
            out = out + o_i * in_group / num_branches
    elif mode == "longnet":
        outs, lses = [], []
        for w, r in zip(segment_lengths, dilation_rates):
            _, allowed = branch_masks(n, w, r, heads % r, is_causal)
            o_i, lse_i = _masked_attention(q, k, v, allowed if keep is None else allowed & keep, scale)
            outs.append(o_i)
            lses.append(lse_i)
        lse = torch.stack(lses)  # (G, b, n, h)
        total = torch.logsumexp(lse, dim=0)
        covered = torch.isfinite(total)
        safe_total = torch.where(covered, total, torch.zeros((), dtype=total.dtype))
        weights = torch.where(covered, torch.exp(lse - safe_total), torch.zeros((), dtype=lse.dtype))
        out = sum(wt.unsqueeze(-1) * o for wt, o in zip(weights, outs))
    else:
        raise ValueError(f"mode must be 'groups' or 'longnet': got {mode!r}")
    return out.to(dtype)


def dilated_decode_reference(q, k, v, segment_lengths, dilation_rates, mode="groups", is_causal=False, scale=None,
                             key_padding_mask=None):
    """SPEC section 9 as written: q ``(batch, sq, heads, head_dim)`` placed at the last ``sq`` of
    the ``skv`` positions of k, v, the full forward over all of them, its last ``sq`` rows (the
    rows before are zeros: no row reads another row's query)."""
    b, sq, h, d = q.shape
    skv = k.shape[1]
    full = torch.cat([q.new_zeros(b, skv - sq, h, d), q], dim=1)
    out = dilated_attention_reference(full, k, v, segment_lengths, dilation_rates, mode, is_causal, scale,
                                      key_padding_mask)
    return out[:, skv - sq:]


def block_sparse_reference(q, k, v, layout, block_size: int, is_causal: bool = False, scale=None,
                           key_padding_mask=None):
    """Block-sparse attention (SPEC section 4) as dense attention under the expanded element
    mask, in float64: q ``(batch, seq, heads, head_dim)``, k, v with ``heads`` or a divisor of
    it (grouped-query attention, SPEC section 8), layout ``(heads or 1, nb, nb)`` bool,
    ``key_padding_mask`` ``(batch, seq)`` bool, True = keep. A query with no visible key gets 0."""
    b, n, h, d = q.shape
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    group = h // k.shape[2]
    k, v = (t.repeat_interleave(group, dim=2) for t in (k, v))  # query head j reads KV head j // group
    q, k, v = (t.double().transpose(1, 2) for t in (q, k, v))  # (b, h, n, d)
    blk = torch.arange(n, device=q.device) // block_size
    mask = layout.to(q.device).expand(h, -1, -1)[:, blk][:, :, blk]  # (h, n, n)
    if is_causal:
        mask = mask & torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
    if key_padding_mask is not None:
        mask = mask & key_padding_mask.to(q.device)[:, None, None, :]  # (b, h, n, n)
    s = ((q @ k.transpose(-1, -2)) * scale).masked_fill(~mask, float("-inf"))
    # A row with no visible key: every weight 0 (softmax of all -inf would be NaN).
    m = s.amax(-1, keepdim=True).nan_to_num(0.0, neginf=0.0).detach()
    p = torch.exp(s - m)
    return ((p @ v) / p.sum(-1, keepdim=True).clamp_min(1e-300)).transpose(1, 2)
