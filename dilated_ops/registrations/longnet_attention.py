"""``torch.ops.dilated.longnet_attention`` and its backward op: sequence-parallel dilated
attention by LongNet's strategy (:mod:`dilated_ops.kernels.distributed`: each rank's shard on
the single-device op, the dilated K/V rows of segments that span shards all-gathered and merged
in), custom op, fake kernel, autograd.

q, k, v: this rank's shard ``(batch, seq / P, heads, head_dim)``; the group by name with its
size given, as for ``ulysses_attention``; k, v may have fewer heads (grouped-query attention);
``key_padding_mask``: this rank's shard ``(batch, seq / P)`` bool, True = keep. Returns
``(out, lse, gathered)``: the rank's output slice, its log-sum-exp ``(batch, seq / P, heads)``
and the gathered K/V rows ``(P, numel)`` the backward takes.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

from .. import _checks
from ..kernels import attention as _attention
from ..kernels.distributed import (LAYOUTS, chunks, longnet_backward, longnet_forward, longnet_geometry_error, pieces,
                                   spanning_numel)
from .ulysses_attention import resolve_group


def check_arguments(q, k, v, segment_lengths, dilation_rates, mode, is_causal, scale, world_size,
                    layout: str = "contiguous", key_padding_mask=None):
    """The op's arguments, before any collective (a rank with bad input raises at once); the
    ring op takes the same and a ``layout`` (:data:`~dilated_ops.kernels.distributed.LAYOUTS`),
    whose chunks the geometry applies to."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(map(repr, LAYOUTS))}: got {layout!r}")
    segment_lengths, dilation_rates, scale = _checks.check_dilated_args(
        q, k, v, segment_lengths, dilation_rates, mode, scale, 0.0, is_causal=is_causal,
        key_padding_mask=key_padding_mask)
    _checks.check_positive_int("world_size", world_size)
    m, s = len(pieces(0, world_size, layout)), q.shape[1]
    if s % m:
        raise ValueError(f"layout {layout!r} holds {m} chunks of the sequence per shard: the shard length must be "
                         f"divisible by {m}, got q of shape {tuple(q.shape)}")
    reason = longnet_geometry_error(s // m, chunks(world_size, layout), segment_lengths, dilation_rates)
    if reason is not None:
        raise ValueError(reason if m == 1 else f"layout {layout!r} (the sequence in {chunks(world_size, layout)} "
                                               f"chunks of {s // m}): {reason}")
    return segment_lengths, dilation_rates, scale


@torch.library.custom_op("dilated::longnet_attention", mutates_args=())
def longnet_attention_op(
    q: Tensor, k: Tensor, v: Tensor, segment_lengths: List[int], dilation_rates: List[int], mode: str,
    is_causal: bool, scale: Optional[float], group_name: str, world_size: int,
    key_padding_mask: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor, Tensor]:
    check_arguments(q, k, v, segment_lengths, dilation_rates, mode, is_causal, scale, world_size,
                    key_padding_mask=key_padding_mask)
    group = resolve_group(group_name, world_size)
    return longnet_forward(q, k, v, segment_lengths, dilation_rates, mode, is_causal, scale, group, world_size,
                           dist.get_rank(group), key_padding_mask)


@longnet_attention_op.register_fake
def _fake(q, k, v, segment_lengths, dilation_rates, mode, is_causal, scale, group_name, world_size,
          key_padding_mask=None):
    check_arguments(q, k, v, segment_lengths, dilation_rates, mode, is_causal, scale, world_size,
                    key_padding_mask=key_padding_mask)
    b, s, h, _ = q.shape
    numel = spanning_numel(q.shape, world_size, segment_lengths, dilation_rates, mode, k.shape[2],
                           key_padding_mask is not None)
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            q.new_empty(b, s, h, dtype=_attention.lse_dtype(q.dtype)), q.new_empty(world_size, numel))


@torch.library.custom_op("dilated::longnet_attention_backward", mutates_args=())
def longnet_attention_backward_op(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, gathered: Tensor,
    segment_lengths: List[int], dilation_rates: List[int], mode: str, is_causal: bool, scale: Optional[float],
    group_name: str, world_size: int, key_padding_mask: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor, Tensor]:
    group = resolve_group(group_name, world_size)
    return longnet_backward(grad_out.contiguous(), q, k, v, out, lse, gathered, segment_lengths, dilation_rates,
                            mode, is_causal, scale, group, world_size, dist.get_rank(group), key_padding_mask)


@longnet_attention_backward_op.register_fake
def _backward_fake(grad_out, q, k, v, out, lse, gathered, segment_lengths, dilation_rates, mode, is_causal, scale,
                   group_name, world_size, key_padding_mask=None):
    return tuple(torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))


def _setup_context(ctx, inputs, output):
    q, k, v, segment_lengths, dilation_rates, mode, is_causal, scale, group_name, world_size, *mask = inputs
    out, lse, gathered = output
    ctx.mark_non_differentiable(lse, gathered)
    ctx.save_for_backward(q, k, v, out, lse, gathered, *mask)
    ctx.config = (segment_lengths, dilation_rates, mode, is_causal, scale, group_name, world_size)


def _backward(ctx, grad_out, *_):
    q, k, v, out, lse, gathered, *mask = ctx.saved_tensors
    dq, dk, dv = longnet_attention_backward_op(grad_out, q, k, v, out, lse, gathered, *ctx.config, *mask)
    return (dq, dk, dv) + (None,) * (7 + len(mask))


longnet_attention_op.register_autograd(_backward, setup_context=_setup_context)
