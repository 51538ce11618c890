"""The public functions over the ``dilated`` ops (as ``flash_attn_func`` over FlashAttention's
ops): argument checks with readable messages, the dropout seed, then the op."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from . import _checks
from .config import SparsePatternConfig
from .registrations import block_sparse_attention as _block_sparse
from .registrations import decode_attention as _decode
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
    key_padding_mask: Optional[Tensor] = None,
    cu_seqlens: Optional[Tensor] = None,
) -> Tensor:
    """Dilated attention (LongNet): each branch ``(w, r)`` cuts the sequence into segments of
    ``w`` tokens and, inside each segment, lets every ``r``-th token attend to every ``r``-th
    token (offset per head). ``segment_lengths=[4, 8]``, ``dilation_rates=[1, 2]``, 8 tokens,
    ``x`` = the positions one head of each branch attends among::

        branch (w=4, r=1):  x x x x | x x x x      two segments, dense inside each
        branch (w=8, r=2):  x . x . x . x .        one segment, every 2nd token (offset 0)

    Args:
        q: ``(batch, seq, heads, head_dim)``.
        k: ``(batch, seq, heads_kv, head_dim)``: as q, or with fewer heads (grouped-query
            attention: ``heads_kv`` divides ``heads``, query head ``j`` reads KV head
            ``j // (heads // heads_kv)``; K/V are never repeated, their gradients sum over the
            query heads that read them).
        v: ``(batch, seq, heads_kv, head_dim)``, as k.
        segment_lengths: the branches' ``w_i`` (ints, numpy integers accepted; at most
            ``2**31 - 1``); a last segment shorter than ``w_i`` is attended as it is.
        dilation_rates: the branches' ``r_i`` (``w_i % r_i == 0``), as many as segment_lengths.
        mode: ``"groups"`` (heads split into one group per branch, v0.2.0's numerics) or
            ``"longnet"`` (every head in every branch, combined by softmax weight as in the
            LongNet paper).
        is_causal: mask keys after the query inside each segment (a bool).
        scale: softmax scale, a finite real number (numpy floats accepted); ``None`` is
            ``1 / sqrt(head_dim)``.
        dropout_p: attention-probability dropout, applied as given (pass 0.0 in eval, as
            with ``F.scaled_dot_product_attention``).
        backend: ``"auto"`` runs the fastest kernels we have for the device; ``"sdpa"`` only
            PyTorch's own attention kernels.
        key_padding_mask: ``(batch, seq)`` bool, True = keep the key (a tokenizer's
            ``attention_mask.bool()``): a padded key is hidden from every branch. A query that
            sees no key in a branch gets nothing from it; one that sees none at all gets 0 (and
            zero gradients), never NaN.
        cu_seqlens: packed documents, ``[0, l_0, l_0 + l_1, ..., seq]`` (int32/int64, as
            flash-attn's varlen API; the same boundaries for every batch row): each document
            is its own sequence (segments restart at its first token, nothing crosses a
            boundary), so the result equals running the documents one by one. Its values are
            read on the host (a sync for a CUDA tensor)::

                cu_seqlens = [0, 5, 8], segment_lengths=[4]:   x x x x | x | x x x
                                                               doc 0       doc 1

    Returns:
        ``(batch, seq, heads, head_dim)``, in q's dtype, device and memory order
        (``head_dim == 0`` gives the empty output, as ``F.scaled_dot_product_attention``).

    Raises ValueError / TypeError naming the argument for bad input, and NotImplementedError
    for forward-mode AD (``torch.autograd.forward_ad``) tangents.
    """
    # Checked here as well as in the op: the op's schema rejects wrong types with a less
    # helpful message before its body runs.
    segment_lengths, dilation_rates, scale = _checks.check_dilated_args(
        q, k, v, segment_lengths, dilation_rates, mode, scale, dropout_p, backend, is_causal=is_causal,
        key_padding_mask=key_padding_mask, cu_seqlens=cu_seqlens,
    )
    seed = None
    if dropout_p > 0.0:
        # Drawn from the default CPU generator, so torch.manual_seed makes runs repeatable.
        seed = torch.randint(0, 2**62, (), dtype=torch.int64)
    if eager.has_tangent(q, k, v):
        raise NotImplementedError(
            "dilated_attention does not support forward-mode AD (torch.autograd.forward_ad): "
            "q, k or v carries a tangent; use reverse mode (backward / torch.autograd.grad)"
        )
    out, _ = _op.call(q, k, v, segment_lengths, dilation_rates, mode, is_causal, scale, dropout_p, seed, backend,
                      key_padding_mask=key_padding_mask, cu_seqlens=cu_seqlens)
    return out


def dilated_attention_decode(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    *,
    mode: str = "groups",
    is_causal: bool = False,
    scale: Optional[float] = None,
    key_padding_mask: Optional[Tensor] = None,
) -> Tensor:
    """Dilated attention for queries at the end of a KV cache (SPEC section 9): q holds the last
    ``sq`` positions of the ``skv`` cached keys (bottom-right aligned, as Hugging Face's caches
    are), and row ``i`` of the result equals row ``skv - sq + i`` of :func:`dilated_attention`
    over all ``skv`` positions. A query at position ``t`` reads, per branch, only the keys of its
    own segment in its own offset class (``<= t`` with ``is_causal``): at most ``w / r`` of them,
    so a step's cost does not grow with the context. ``segment_lengths=[4, 8]``,
    ``dilation_rates=[1, 2]``, 11 cached keys, the query at position 10 (``q``), ``x`` = the
    keys it reads, causal::

        branch (w=4, r=1):  . . . . | . . . . | x x q      its segment, dense
        branch (w=8, r=2):  . . . . . . . . | x . q        its segment's every 2nd key, its class

    (for heads whose offset in that branch is the query's class; the others get nothing from
    it, as in the full forward: in groups mode a head group may get 0 at that position).

    Args:
        q: ``(batch, sq, heads, head_dim)``, ``sq <= skv``.
        k: ``(batch, skv, heads_kv, head_dim)``, the cache (``heads_kv`` divides ``heads``:
            grouped-query attention, query head ``j`` reads KV head ``j // (heads // heads_kv)``).
        v: ``(batch, skv, heads_kv, head_dim)``, as k.
        segment_lengths, dilation_rates, mode, is_causal, scale: as :func:`dilated_attention`.
        key_padding_mask: ``(batch, skv)`` bool, True = keep the key; a query that sees no key
            gets 0 (and zero gradients).

    Returns:
        ``(batch, sq, heads, head_dim)``, in q's dtype.

    Raises ValueError / TypeError naming the argument for bad input.
    """
    segment_lengths, dilation_rates, scale = _checks.check_decode_args(
        q, k, v, segment_lengths, dilation_rates, mode, scale, is_causal, key_padding_mask)
    if eager.has_tangent(q, k, v):
        raise NotImplementedError(
            "dilated_attention_decode does not support forward-mode AD (torch.autograd.forward_ad): "
            "q, k or v carries a tangent; use reverse mode (backward / torch.autograd.grad)"
        )
    out, _ = _decode.call(q, k, v, segment_lengths, dilation_rates, mode, is_causal, scale, key_padding_mask)
    return out


def block_sparse_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    pattern: Optional[SparsePatternConfig] = None,
    *,
    is_causal: bool = False,
    scale: Optional[float] = None,
    segment_lengths: Sequence[int] = (),
    dilation_rates: Sequence[int] = (),
    block_mask: Optional[Tensor] = None,
    key_padding_mask: Optional[Tensor] = None,
) -> Tensor:
    """Block-sparse attention (SPEC section 4): the sequence cut into blocks of
    ``pattern.block_size`` tokens, query block ``i`` reading the key blocks its layout marks,
    one exact softmax over all of them (never per block). ``local_window`` over 4 blocks
    (``x`` = key block read)::

        x x . .
        x x x .
        . x x x
        . . x x

    Args:
        q, k, v: ``(batch, seq, heads, head_dim)``, one dtype and device; the last block may be
            partial. k and v may have ``heads_kv`` heads, a divisor of q's (grouped-query
            attention: query head ``j`` reads KV head ``j // (heads / heads_kv)``).
        pattern: a :class:`~dilated_ops.SparsePatternConfig` (default: its defaults,
            ``dilated_sparse``); ``pattern_type="mask"`` reads ``block_mask``.
        is_causal: drop key blocks after the query block and keys after the query inside it.
        scale: softmax scale; ``None`` is ``1 / sqrt(head_dim)``.
        segment_lengths, dilation_rates: the branches of ``dilated_sparse`` (tokens; each
            ``w // block_size`` blocks long).
        block_mask: bool ``(heads or 1, nb, nb)``, ``nb = ceil(seq / block_size)``, for
            ``pattern_type="mask"``.
        key_padding_mask: ``(batch, seq)`` bool, True = keep the key (a tokenizer's
            ``attention_mask.bool()``); a query that sees no key gets 0 and zero gradients.

    Returns:
        ``(batch, seq, heads, head_dim)`` in q's dtype; 0 for a query that sees no key.
    """
    pattern = SparsePatternConfig() if pattern is None else pattern
    if not isinstance(pattern, SparsePatternConfig):
        raise TypeError(f"pattern must be a SparsePatternConfig or None: got {type(pattern).__name__}")
    args = (q, k, v, pattern.pattern_type, pattern.block_size, pattern.local_window_size, pattern.global_tokens,
            float(pattern.sparsity_ratio), list(segment_lengths), list(dilation_rates))
    _block_sparse.check_arguments(*args, scale, block_mask, key_padding_mask)
    _checks.check_bool("is_causal", is_causal)
    scale = _checks.check_scale(scale)
    if eager.has_tangent(q, k, v):
        raise NotImplementedError(
            "block_sparse_attention does not support forward-mode AD (torch.autograd.forward_ad): "
            "q, k or v carries a tangent; use reverse mode (backward / torch.autograd.grad)"
        )
    out, _ = _block_sparse.call(*args, is_causal, scale, block_mask, key_padding_mask)
    return out
