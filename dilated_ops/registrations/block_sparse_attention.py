"""``torch.ops.dilated.block_sparse_attention`` and its backward op: custom op, fake kernel,
autograd (SPEC section 4).

q, k, v ``(batch, seq, heads, head_dim)``; the pattern by name and fields (v0.2.0's
``SparsePatternConfig``: ``pattern``, ``block_size``, ``local_window_size``, ``global_tokens``,
``sparsity_ratio``; ``segment_lengths``/``dilation_rates`` for ``dilated_sparse``), or
``pattern="mask"`` with a bool ``block_mask`` ``(heads or 1, nb, nb)``; k, v may have a divisor
of q's heads (grouped-query attention), ``key_padding_mask`` ``(batch, seq)`` bool (True = keep)
hides keys (SPEC section 8). Returns ``(out, lse)``:
``out`` as q, ``lse`` ``(batch, seq, heads)`` (float32; float64 for float64 inputs). A named
pattern's layout is built inside the op, once per (arguments, length, device), so compiled and
exported graphs hold the op alone, for any sequence length.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from .. import _checks
from ..kernels import block_sparse as _kernels
from ..kernels.attention import default_scale, lse_dtype
from . import eager, transforms


def check_arguments(q, k, v, pattern, block_size, local_window_size, global_tokens, sparsity_ratio, segment_lengths,
           dilation_rates, scale, block_mask, key_padding_mask=None) -> None:
    _checks.check_qkv(q, k, v, gqa=True)
    _checks.check_key_padding_mask(key_padding_mask, q)
    _checks.check_sparse_pattern(pattern, sparsity_ratio, block_size, local_window_size, global_tokens)
    if pattern == "dilated_sparse":
        _checks.check_segments(segment_lengths, dilation_rates)
    if pattern == "mask":
        _checks.check_block_mask(block_mask, q, block_size)
    elif block_mask is not None:
        raise ValueError(f"block_mask is only read with pattern 'mask': got pattern {pattern!r} and a block_mask")
    _checks.check_scale(scale)
    if q.shape[-1] == 0:
        raise ValueError(f"head_dim must be >= 1 for block_sparse_attention: got q of shape {tuple(q.shape)}")


def _plan(q, pattern, block_size, local_window_size, global_tokens, sparsity_ratio, segment_lengths,
          dilation_rates, is_causal, block_mask) -> _kernels.Plan:
    """The layout's plan: a named pattern's from the cache, a mask's built here."""
    if pattern == "mask":
        layout = block_mask.to(q.device)
        return _kernels.Plan(_kernels.causal_blocks(layout) if is_causal else layout)
    return _kernels.cached_plan(
        pattern, q.shape[1], q.shape[2], block_size, local_window_size, global_tokens, float(sparsity_ratio),
        tuple(segment_lengths), tuple(dilation_rates), is_causal, q.device)


@torch.library.custom_op("dilated::block_sparse_attention", mutates_args=())
def block_sparse_attention_op(
    q: Tensor, k: Tensor, v: Tensor,
    # The pattern: SparsePatternConfig's fields, dilated_sparse's branches, or pattern "mask".
    pattern: str, block_size: int, local_window_size: Optional[int], global_tokens: int, sparsity_ratio: float,
    segment_lengths: List[int], dilation_rates: List[int],
    is_causal: bool = False, scale: Optional[float] = None, block_mask: Optional[Tensor] = None,
    key_padding_mask: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    check_arguments(q, k, v, pattern, block_size, local_window_size, global_tokens, sparsity_ratio, segment_lengths,
           dilation_rates, scale, block_mask, key_padding_mask)
    return _forward_kernels(q, k, v, pattern, block_size, local_window_size, global_tokens, sparsity_ratio,
                            segment_lengths, dilation_rates, is_causal, scale, block_mask, key_padding_mask)


@block_sparse_attention_op.register_fake
def block_sparse_attention_fake(q, k, v, pattern, block_size, local_window_size, global_tokens, sparsity_ratio,
                                segment_lengths, dilation_rates, is_causal=False, scale=None, block_mask=None,
                                key_padding_mask=None):
    _checks.check_qkv(q, k, v, gqa=True)
    b, n, h, _ = q.shape
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(b, n, h, dtype=lse_dtype(q.dtype))


@torch.library.custom_op("dilated::block_sparse_attention_backward", mutates_args=())
def block_sparse_attention_backward_op(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
    pattern: str, block_size: int, local_window_size: Optional[int], global_tokens: int, sparsity_ratio: float,
    segment_lengths: List[int], dilation_rates: List[int],
    is_causal: bool, scale: Optional[float], block_mask: Optional[Tensor],
    key_padding_mask: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor, Tensor]:
    plan = _plan(q, pattern, block_size, local_window_size, global_tokens, sparsity_ratio, segment_lengths,
                 dilation_rates, is_causal, block_mask)
    return _kernels.backward(grad_out, q, k, v, out, lse, plan, block_size, is_causal,
                             default_scale(q.shape[-1], scale), key_padding_mask)


@block_sparse_attention_backward_op.register_fake
def block_sparse_attention_backward_fake(grad_out, q, k, v, out, lse, pattern, block_size, local_window_size, global_tokens,
                                         sparsity_ratio, segment_lengths, dilation_rates, is_causal, scale,
                                         block_mask, key_padding_mask=None):
    return tuple(torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))


def _forward_kernels(q, k, v, pattern, block_size, local_window_size, global_tokens, sparsity_ratio,
                     segment_lengths, dilation_rates, is_causal, scale, block_mask, key_padding_mask=None):
    plan = _plan(q, pattern, block_size, local_window_size, global_tokens, sparsity_ratio, segment_lengths,
                 dilation_rates, is_causal, block_mask)
    return _kernels.forward(q, k, v, plan, block_size, is_causal, default_scale(q.shape[-1], scale), key_padding_mask)


def _setup_context(ctx, inputs, output):
    q, k, v, *config = inputs
    if len(config) == 10:  # called without the trailing key_padding_mask
        config.append(None)
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, out, lse, config[-2], config[-1])  # block_mask, key_padding_mask (or None)
    ctx.config = config[:-2]


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, block_mask, key_padding_mask = ctx.saved_tensors
    extra = () if key_padding_mask is None else (key_padding_mask,)
    dq, dk, dv = block_sparse_attention_backward_op(grad_out, q, k, v, out, lse, *ctx.config, block_mask, *extra)
    return (dq, dk, dv) + (None,) * 11


block_sparse_attention_op.register_autograd(_backward, setup_context=_setup_context)


def _backward_kernels(ctx, grad_out, grad_lse):
    q, k, v, out, lse, block_mask, key_padding_mask = ctx.saved_tensors
    (pattern, block_size, local_window_size, global_tokens, sparsity_ratio, segment_lengths, dilation_rates,
     is_causal, scale) = ctx.config
    plan = _plan(q, pattern, block_size, local_window_size, global_tokens, sparsity_ratio, segment_lengths,
                 dilation_rates, is_causal, block_mask)
    dq, dk, dv = _kernels.backward(grad_out, q, k, v, out, lse, plan, block_size, is_causal,
                                   default_scale(q.shape[-1], scale), key_padding_mask)
    return (dq, dk, dv) + (None,) * 11


_EAGER = eager.Kernels(_forward_kernels, _setup_context, _backward_kernels)
# torch.func transforms (grad, vjp, jacrev, vmap) through the op, the functions and modules: see .transforms.
transforms.register("block_sparse_attention", block_sparse_attention_op, block_sparse_attention_backward_op, _setup_context, _backward)


def call(q: Tensor, k: Tensor, v: Tensor, pattern: str, block_size: int, local_window_size: Optional[int],
         global_tokens: int, sparsity_ratio: float, segment_lengths: List[int], dilation_rates: List[int],
         is_causal: bool, scale: Optional[float], block_mask: Optional[Tensor],
         key_padding_mask: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """``(out, lse)`` of the op on validated arguments (see :func:`eager.run`); the trailing
    ``key_padding_mask`` is passed only when set (graphs without one keep the older schema's
    call)."""
    args = (q, k, v, pattern, block_size, local_window_size, global_tokens, float(sparsity_ratio),
            list(segment_lengths), list(dilation_rates), is_causal, scale, block_mask)
    if key_padding_mask is not None:
        args += (key_padding_mask,)
    return eager.run(block_sparse_attention_op, _EAGER, args, (q, k, v))

