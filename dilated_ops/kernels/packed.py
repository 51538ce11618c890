"""Packed sequences (SPEC section 8): documents laid end to end along the sequence, their
boundaries ``cu_seqlens = [0, l_0, l_0 + l_1, ..., seq]`` as flash-attn's varlen API takes them.
Each document is a sequence of its own: its segments start at its first position, nothing
crosses a boundary, so a packed batch equals running the documents one by one.

Consecutive documents of one length run as one call with the documents as batch entries (a
view of the packed tensor for batch 1), so a batch of equal-length documents costs one call.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

from .dilated import dilated_attention_backward, dilated_attention_forward

# Dropout seeds of the calls of successive runs are this far apart (a call uses a few seeds).
_SEED_STRIDE = 1_000_003


def document_runs(bounds: Sequence[int]) -> List[Tuple[int, int, int]]:
    """``(start, length, count)`` of each run of consecutive documents of one length (empty
    documents skipped)."""
    runs: List[Tuple[int, int, int]] = []
    for a, z in zip(bounds[:-1], bounds[1:]):
        if z == a:
            continue
        if runs and runs[-1][1] == z - a and runs[-1][0] + runs[-1][1] * runs[-1][2] == a:
            runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((a, z - a, 1))
    return runs


def _docs(x: Optional[torch.Tensor], start: int, length: int, count: int) -> Optional[torch.Tensor]:
    """The run's documents of ``x`` ``(batch, seq, ...)`` as ``(batch * count, length, ...)``."""
    if x is None:
        return None
    part = x[:, start:start + length * count]
    return part.reshape(x.shape[0] * count, length, *x.shape[2:])


def _put(dst: torch.Tensor, start: int, y: torch.Tensor) -> None:
    dst[:, start:start + y.shape[0] // dst.shape[0] * y.shape[1]] = y.reshape(dst.shape[0], -1, *y.shape[2:])


def packed_forward(q, k, v, bounds: Sequence[int], segment_lengths, dilation_rates, mode, is_causal, scale,
                   dropout_p, seed, backend, head_start, total_heads, key_padding_mask):
    """``(out, lse)`` as :func:`dilated_attention_forward`, document by document."""
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = None
    for i, (a, length, count) in enumerate(document_runs(bounds)):
        o, l = dilated_attention_forward(
            *(_docs(t, a, length, count) for t in (q, k, v)), segment_lengths, dilation_rates, mode, is_causal, scale,
            dropout_p, seed + _SEED_STRIDE * i, backend, head_start, total_heads,
            _docs(key_padding_mask, a, length, count))
        if lse is None:
            lse = torch.empty(q.shape[:3], dtype=l.dtype, device=q.device)
        _put(out, a, o)
        _put(lse, a, l)
    if lse is None:  # an empty sequence
        lse = torch.empty(q.shape[:3], dtype=torch.float64 if q.dtype == torch.float64 else torch.float32,
                          device=q.device)
    return out, lse


def packed_backward(grad_out, q, k, v, out, lse, bounds: Sequence[int], segment_lengths, dilation_rates, mode,
                    is_causal, scale, dropout_p, seed, head_start, total_heads, key_padding_mask):
    """``(dq, dk, dv)`` as :func:`dilated_attention_backward`, document by document."""
    grads = [torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v)]
    for i, (a, length, count) in enumerate(document_runs(bounds)):
        parts = dilated_attention_backward(
            *(_docs(t, a, length, count) for t in (grad_out, q, k, v, out, lse)), segment_lengths, dilation_rates,
            mode, is_causal, scale, dropout_p, seed + _SEED_STRIDE * i, head_start, total_heads,
            _docs(key_padding_mask, a, length, count))
        for dst, g in zip(grads, parts):
            _put(dst, a, g)
    return tuple(grads)
