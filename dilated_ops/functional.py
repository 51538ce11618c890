"""The public functions over the ``dilated`` ops (as ``flash_attn_func`` over FlashAttention's
ops): argument checks with readable messages, the dropout seed, then the op."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from . import _checks
from .registrations import dilated_attention as _op
from .registrations import eager


def dilated_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    *,
    mode: str = "groups",
    is_causal: bool = False,
    scale: Optional[float] = None,
    dropout_p: float = 0.0,
    backend: str = "auto",
) -> Tensor:
    """Dilated attention (LongNet): each branch ``(w, r)`` cuts the sequence into segments of
    ``w`` tokens and, inside each segment, lets every ``r``-th token attend to every ``r``-th
    token (offset per head). ``segment_lengths=[4, 8]``, ``dilation_rates=[1, 2]``, 8 tokens,
    ``x`` = the positions one head of each branch attends among::

        branch (w=4, r=1):  x x x x | x x x x      two segments, dense inside each
        branch (w=8, r=2):  x . x . x . x .        one segment, every 2nd token (offset 0)

    Args:
        q: ``(batch, seq, heads, head_dim)``.
        k: ``(batch, seq, heads, head_dim)``, as q.
        v: ``(batch, seq, heads, head_dim)``, as q.
        segment_lengths: the branches' ``w_i``; a last segment shorter than ``w_i`` is attended
            as it is.
        dilation_rates: the branches' ``r_i`` (``w_i % r_i == 0``), as many as segment_lengths.
        mode: ``"groups"`` (heads split into one group per branch, v0.2.0's numerics) or
            ``"longnet"`` (every head in every branch, combined by softmax weight as in the
            LongNet paper).
        is_causal: mask keys after the query inside each segment.
        scale: softmax scale; ``None`` is ``1 / sqrt(head_dim)``.
        dropout_p: attention-probability dropout, applied as given (pass 0.0 in eval, as
            with ``F.scaled_dot_product_attention``).
        backend: ``"auto"`` runs the fastest kernels we have for the device; ``"sdpa"`` only
            PyTorch's own attention kernels.

    Returns:
        ``(batch, seq, heads, head_dim)``, in q's dtype, device and memory order.

    Raises ValueError / TypeError naming the argument for bad input, and NotImplementedError
    for forward-mode AD (``torch.autograd.forward_ad``) tangents.
    """
    # Checked here as well as in the op: the op's schema rejects wrong types with a less
    # helpful message before its body runs.
    _checks.check_dilated_args(q, k, v, segment_lengths, dilation_rates, mode, scale, dropout_p, backend)
    seed = None
    if dropout_p > 0.0:
        # Drawn from the default CPU generator, so torch.manual_seed makes runs repeatable.
        seed = torch.randint(0, 2**62, (), dtype=torch.int64)
    if eager.has_tangent(q, k, v):
        raise NotImplementedError(
            "dilated_attention does not support forward-mode AD (torch.autograd.forward_ad): "
            "q, k or v carries a tangent; use reverse mode (backward / torch.autograd.grad)"
        )
    out, _ = _op.call(q, k, v, list(segment_lengths), list(dilation_rates), mode, is_causal, scale, dropout_p,
                      seed, backend)
    return out
