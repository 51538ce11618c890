"""``torch.ops.dilated.decode_attention`` and its backward op: custom op, fake kernel, autograd.

Queries at the end of a KV cache (SPEC section 9): q ``(batch, sq, heads, head_dim)`` is
positions ``skv - sq .. skv - 1`` of k, v ``(batch, skv, heads_kv, head_dim)``. Returns ``(out,
lse)``: ``out`` as q, ``lse`` ``(batch, sq, heads)`` (float32, float64 for float64 inputs). The
user-facing function is :func:`dilated_ops.dilated_attention_decode`.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from .. import _checks
from ..kernels import attention as _attention
from ..kernels.decode import decode_backward, decode_forward
from ..kernels.dilated import empty_output
from . import eager, transforms


@torch.library.custom_op("dilated::decode_attention", mutates_args=())
def decode_attention_op(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    segment_lengths: List[int],
    dilation_rates: List[int],
    mode: str = "groups",
    is_causal: bool = False,
    scale: Optional[float] = None,
    key_padding_mask: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    segment_lengths, dilation_rates, scale = _checks.check_decode_args(
        q, k, v, segment_lengths, dilation_rates, mode, scale, is_causal, key_padding_mask)
    return decode_forward(q, k, v, segment_lengths, dilation_rates, mode, is_causal, scale, key_padding_mask)


@decode_attention_op.register_fake
def decode_attention_fake(q, k, v, segment_lengths, dilation_rates, mode="groups", is_causal=False, scale=None,
                          key_padding_mask=None):
    _checks.check_decode_args(q, k, v, segment_lengths, dilation_rates, mode, scale, is_causal, key_padding_mask)
    b, sq, h, _ = q.shape
    return empty_output(q), q.new_empty(b, sq, h, dtype=_attention.lse_dtype(q.dtype))


@torch.library.custom_op("dilated::decode_attention_backward", mutates_args=())
def decode_attention_backward_op(
    grad_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    segment_lengths: List[int],
    dilation_rates: List[int],
    mode: str,
    is_causal: bool,
    scale: Optional[float],
    key_padding_mask: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor, Tensor]:
    # lse: the backward op's form that transforms.register expects; the kernel recomputes it.
    return decode_backward(grad_out, q, k, v, out, segment_lengths, dilation_rates, mode, is_causal, scale,
                           key_padding_mask)


@decode_attention_backward_op.register_fake
def decode_attention_backward_fake(grad_out, q, k, v, out, lse, segment_lengths, dilation_rates, mode, is_causal,
                                   scale, key_padding_mask=None):
    return tuple(torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))


def _setup_context(ctx, inputs, output):
    q, k, v, segment_lengths, dilation_rates, mode, is_causal, scale = inputs[:8]
    key_padding_mask = inputs[8] if len(inputs) > 8 else None
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, out, lse, key_padding_mask)
    ctx.config = (segment_lengths, dilation_rates, mode, is_causal, scale)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, key_padding_mask = ctx.saved_tensors
    dq, dk, dv = decode_attention_backward_op(grad_out, q, k, v, out, lse, *ctx.config, key_padding_mask)
    return (dq, dk, dv) + (None,) * 6


decode_attention_op.register_autograd(_backward, setup_context=_setup_context)


def _backward_kernels(ctx, grad_out, grad_lse):
    q, k, v, out, lse, key_padding_mask = ctx.saved_tensors
    dq, dk, dv = decode_backward(grad_out, q, k, v, out, *ctx.config, key_padding_mask)
    return (dq, dk, dv) + (None,) * 6


_EAGER = eager.Kernels(decode_forward, _setup_context, _backward_kernels)
transforms.register("decode_attention", decode_attention_op, decode_attention_backward_op, _setup_context, _backward)


def call(q: Tensor, k: Tensor, v: Tensor, segment_lengths: List[int], dilation_rates: List[int], mode: str,
         is_causal: bool, scale: Optional[float], key_padding_mask: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """``(out, lse)`` of the op on validated arguments: the op node where one is being recorded,
    else its kernels directly (:func:`eager.run`); the mask is passed only when set."""
    args = (q, k, v, segment_lengths, dilation_rates, mode, is_causal, scale)
    if key_padding_mask is not None:
        args += (key_padding_mask,)
    return eager.run(decode_attention_op, _EAGER, args, (q, k, v))
