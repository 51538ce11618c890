"""Baselines the benchmarks compare the op with (groups mode; every w must divide n).

- ``naive``: gather the dilated positions with an index tensor, SDPA, scatter back, with
  autograd through the indexing (what a straightforward implementation does).
- ``pregathered``: SDPA on segments gathered beforehand into contiguous tensors: the floor for
  the views-plus-SDPA design (no gather, no scatter, no zero fill).
- ``dense``: full SDPA over the sequence.
Tensors ``(batch, seq, heads, head_dim)``.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from dilated_ops.kernels.segments import head_groups


@functools.lru_cache(maxsize=64)
def _positions(n: int, w: int, r: int, o: int, device: str) -> torch.Tensor:
    return (torch.arange(0, n, w).unsqueeze(1) + torch.arange(o, w, r).unsqueeze(0)).flatten().to(device)


def naive(q, k, v, segs, rates, is_causal=False):
    b, n, h, d = q.shape
    outs = []
    for i, ((h0, h1), w, r) in enumerate(zip(head_groups(h, len(segs)), segs, rates)):
        idx = _positions(n, w, r, i % r, str(q.device))
        qs, ks, vs = (t[:, idx, h0:h1].reshape(b * (n // w), w // r, h1 - h0, d).transpose(1, 2) for t in (q, k, v))
        o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=is_causal)
        o = o.transpose(1, 2).reshape(b, -1, h1 - h0, d)
        outs.append(torch.zeros(b, n, h1 - h0, d, dtype=q.dtype, device=q.device).index_copy(1, idx, o) / len(segs))
    return torch.cat(outs, dim=2)


def pregather(q, k, v, segs, rates):
    """Contiguous ``(segments, heads, len, head_dim)`` q, k, v per branch, branches of one
    (len, heads) shape concatenated into one batch."""
    b, n, h, d = q.shape
    by_shape = {}
    for i, ((h0, h1), w, r) in enumerate(zip(head_groups(h, len(segs)), segs, rates)):
        idx = _positions(n, w, r, i % r, str(q.device))
        parts = tuple(t[:, idx, h0:h1].reshape(b * (n // w), w // r, h1 - h0, d).transpose(1, 2).contiguous() for t in (q, k, v))
        by_shape.setdefault((w // r, h1 - h0), []).append(parts)
    return [tuple(torch.cat(p, 0).detach().requires_grad_(q.requires_grad) for p in zip(*group)) for group in by_shape.values()]


def pregathered(batches, is_causal=False):
    return [F.scaled_dot_product_attention(q, k, v, is_causal=is_causal) for q, k, v in batches]


def dense(q, k, v, is_causal=False):
    return F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), is_causal=is_causal).transpose(1, 2)
