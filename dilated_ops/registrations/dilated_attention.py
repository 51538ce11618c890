"""``torch.ops.dilated.dilated_attention`` and its backward op: custom op, fake kernel, autograd.

q, k, v ``(batch, seq, heads, head_dim)``. The op returns ``(out, lse)``: ``out`` as q,
``lse`` ``(batch, seq, heads)`` (float32, float64 for float64 inputs; see
:mod:`dilated_ops.kernels.dilated` for its meaning per mode). The backward is an op of its own,
so compiled and exported graphs show it as one node too.

:func:`call` is how the API reaches the op: the op itself under compile, export, tracing and
transforms; on plain eager tensors the same kernels without the dispatcher's layers
(:mod:`.eager`). The user-facing function is :func:`dilated_ops.dilated_attention`.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from .. import _checks
from ..kernels import attention as _attention
from ..kernels.dilated import dilated_attention_backward, dilated_attention_forward, empty_output
from ..kernels.packed import packed_backward, packed_forward
from . import eager, transforms


def _seed(dropout_p: float, dropout_seed: Optional[Tensor]) -> int:
    if dropout_p == 0.0:
        return 0
    _checks.check_dropout_seed(dropout_seed)  # the backward op's seed is checked here only
    if dropout_seed is None:
        raise ValueError(
            "dropout_p > 0 needs dropout_seed (an int64 tensor); "
            "dilated_ops.dilated_attention draws one for you"
        )
    return int(dropout_seed)  # a CPU scalar by convention: no device sync


@torch.library.custom_op("dilated::dilated_attention", mutates_args=())
def dilated_attention_op(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    segment_lengths: List[int],
    dilation_rates: List[int],
    mode: str = "groups",
    is_causal: bool = False,
    scale: Optional[float] = None,
    dropout_p: float = 0.0,
    dropout_seed: Optional[Tensor] = None,
    backend: str = "auto",
    head_start: int = 0,
    total_heads: int = 0,
    key_padding_mask: Optional[Tensor] = None,
    cu_seqlens: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    # The schema has already converted what it accepts (numpy ints, bools given for ints or
    # floats, None for is_causal): the checks see the values the kernels get. head_start and
    # total_heads: q's heads are heads [head_start, head_start + heads) of a total_heads-head
    # call (0: all of them), as a rank holds them when heads are sharded over ranks. k and v may
    # have fewer heads (grouped-query attention); key_padding_mask (batch, seq) bool, True =
    # keep; cu_seqlens: packed documents' boundaries (SPEC section 8).
    _checks.check_dilated_args(q, k, v, segment_lengths, dilation_rates, mode, scale, dropout_p, backend,
                               is_causal=is_causal, dropout_seed=dropout_seed, head_start=head_start,
                               total_heads=total_heads, key_padding_mask=key_padding_mask, cu_seqlens=cu_seqlens)
    return _forward_kernels(q, k, v, segment_lengths, dilation_rates, mode, is_causal, scale, dropout_p, dropout_seed,
                            backend, head_start, total_heads, key_padding_mask, cu_seqlens)


@dilated_attention_op.register_fake
def dilated_attention_fake(q, k, v, segment_lengths, dilation_rates, mode="groups", is_causal=False,
                           scale=None, dropout_p=0.0, dropout_seed=None, backend="auto", head_start=0,
                           total_heads=0, key_padding_mask=None, cu_seqlens=None):
    _checks.check_dilated_args(q, k, v, segment_lengths, dilation_rates, mode, scale, dropout_p, backend,
                               is_causal=is_causal, dropout_seed=dropout_seed, head_start=head_start,
                               total_heads=total_heads, key_padding_mask=key_padding_mask, cu_seqlens=cu_seqlens)
    b, n, h, d = q.shape
    out = empty_output(q)
    lse = q.new_empty(b, n, h, dtype=_attention.lse_dtype(q.dtype))
    return out, lse


@torch.library.custom_op("dilated::dilated_attention_backward", mutates_args=())
def dilated_attention_backward_op(
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
    dropout_p: float,
    dropout_seed: Optional[Tensor],
    head_start: int = 0,
    total_heads: int = 0,
    key_padding_mask: Optional[Tensor] = None,
    cu_seqlens: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor, Tensor]:
    return _backward_kernel_call(grad_out, q, k, v, out, lse, segment_lengths, dilation_rates, mode, is_causal, scale,
                                 dropout_p, dropout_seed, head_start, total_heads, key_padding_mask, cu_seqlens)


@dilated_attention_backward_op.register_fake
def dilated_attention_backward_fake(grad_out, q, k, v, out, lse, segment_lengths, dilation_rates, mode,
                                    is_causal, scale, dropout_p, dropout_seed, head_start=0, total_heads=0,
                                    key_padding_mask=None, cu_seqlens=None):
    return tuple(torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))


def _setup_context(ctx, inputs, output):
    q, k, v, segment_lengths, dilation_rates, mode, is_causal, scale, dropout_p, seed = inputs[:10]
    out, lse = output
    ctx.mark_non_differentiable(lse)
    # key_padding_mask, cu_seqlens: :func:`call` passes them (after the head window) if set
    masks = tuple(inputs[13:15]) or (None, None)
    ctx.save_for_backward(q, k, v, out, lse, seed, *masks)
    ctx.config = (segment_lengths, dilation_rates, mode, is_causal, scale, dropout_p)
    ctx.window = tuple(inputs[11:13]) or (0, 0)  # (head_start, total_heads): :func:`call` passes them if set


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, seed, key_padding_mask, cu_seqlens = ctx.saved_tensors
    extra = (key_padding_mask, cu_seqlens) if key_padding_mask is not None or cu_seqlens is not None else ()
    dq, dk, dv = dilated_attention_backward_op(grad_out, q, k, v, out, lse, *ctx.config, seed, *ctx.window, *extra)
    return (dq, dk, dv) + (None,) * 12


dilated_attention_op.register_autograd(_backward, setup_context=_setup_context)


def _forward_kernels(q, k, v, segment_lengths, dilation_rates, mode, is_causal, scale, dropout_p, seed, backend,
                     head_start=0, total_heads=0, key_padding_mask=None, cu_seqlens=None):
    args = (segment_lengths, dilation_rates, mode, is_causal, scale, dropout_p, _seed(dropout_p, seed), backend,
            head_start, total_heads, key_padding_mask)
    if cu_seqlens is not None:
        return packed_forward(q, k, v, _checks.check_cu_seqlens(cu_seqlens, q), *args)
    return dilated_attention_forward(q, k, v, *args)


def _backward_kernel_call(grad_out, q, k, v, out, lse, segment_lengths, dilation_rates, mode, is_causal, scale,
                          dropout_p, seed, head_start, total_heads, key_padding_mask, cu_seqlens):
    args = (segment_lengths, dilation_rates, mode, is_causal, scale, dropout_p, _seed(dropout_p, seed), head_start,
            total_heads, key_padding_mask)
    if cu_seqlens is not None:
        return packed_backward(grad_out, q, k, v, out, lse, _checks.check_cu_seqlens(cu_seqlens, q), *args)
    return dilated_attention_backward(grad_out, q, k, v, out, lse, *args)


def _backward_kernels(ctx, grad_out, grad_lse):
    q, k, v, out, lse, seed, key_padding_mask, cu_seqlens = ctx.saved_tensors
    dq, dk, dv = _backward_kernel_call(grad_out, q, k, v, out, lse, *ctx.config, seed, *ctx.window, key_padding_mask,
                                       cu_seqlens)
    return (dq, dk, dv) + (None,) * 12


_EAGER = eager.Kernels(_forward_kernels, _setup_context, _backward_kernels)
# torch.func transforms (grad, vjp, jacrev, vmap) through the op, the functions and modules: see .transforms.
transforms.register("dilated_attention", dilated_attention_op, dilated_attention_backward_op, _setup_context, _backward)


def call(q: Tensor, k: Tensor, v: Tensor, segment_lengths: List[int], dilation_rates: List[int], mode: str,
         is_causal: bool, scale: Optional[float], dropout_p: float, dropout_seed: Optional[Tensor],
         backend: str, head_start: int = 0, total_heads: int = 0, key_padding_mask: Optional[Tensor] = None,
         cu_seqlens: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """``(out, lse)`` of the op on validated arguments: the op node where one is being recorded,
    else its kernels directly (:func:`eager.run`). A head window's arguments and the masks are
    passed only when set, so graphs of whole, unmasked calls keep the op's 11 arguments."""
    args = (q, k, v, segment_lengths, dilation_rates, mode, is_causal, scale, dropout_p, dropout_seed, backend)
    if key_padding_mask is not None or cu_seqlens is not None:
        args += (head_start, total_heads, key_padding_mask, cu_seqlens)
    elif head_start or total_heads:
        args += (head_start, total_heads)
    return eager.run(dilated_attention_op, _EAGER, args, (q, k, v))
