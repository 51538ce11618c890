"""``torch.ops.dilated.ring_attention`` and its backward op: sequence-parallel dilated attention
by a ring (:mod:`dilated_ops.kernels.distributed`: each rank's shard on the single-device op,
the dilated K/V rows of segments that span shards passed rank to rank with point-to-point
transfers overlapped with the attention, merged in by log-sum-exp; their gradients travel the
ring home in float32), custom op, fake kernel, autograd.

q, k, v: this rank's shard ``(batch, seq / P, heads, head_dim)``; the group by name with its
size given, as for ``ulysses_attention``; ``layout``: ``"contiguous"`` (rank ``p`` holds chunk
``p`` of ``P``) or ``"zigzag"`` (chunks ``p`` and ``2P - 1 - p`` of ``2P``, head and tail, for
causal load balance); k, v may have fewer heads (grouped-query attention); ``key_padding_mask``:
this rank's shard ``(batch, seq / P)`` bool, True = keep. Returns ``(out, lse)``; the backward
passes the ring again (nothing gathered is kept).
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

from ..kernels import attention as _attention
from ..kernels.distributed import ring_backward, ring_forward
from .longnet_attention import check_arguments
from .ulysses_attention import resolve_group

__all__ = ["check_arguments", "ring_attention_op", "ring_attention_backward_op"]


@torch.library.custom_op("dilated::ring_attention", mutates_args=())
def ring_attention_op(
    q: Tensor, k: Tensor, v: Tensor, segment_lengths: List[int], dilation_rates: List[int], mode: str,
    is_causal: bool, scale: Optional[float], group_name: str, world_size: int, layout: str = "contiguous",
    key_padding_mask: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    check_arguments(q, k, v, segment_lengths, dilation_rates, mode, is_causal, scale, world_size, layout,
                    key_padding_mask)
    group = resolve_group(group_name, world_size)
    return ring_forward(q, k, v, segment_lengths, dilation_rates, mode, is_causal, scale, group, world_size,
                        dist.get_rank(group), layout, key_padding_mask)


@ring_attention_op.register_fake
def _fake(q, k, v, segment_lengths, dilation_rates, mode, is_causal, scale, group_name, world_size,
          layout="contiguous", key_padding_mask=None):
    check_arguments(q, k, v, segment_lengths, dilation_rates, mode, is_causal, scale, world_size, layout,
                    key_padding_mask)
    b, s, h, _ = q.shape
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            q.new_empty(b, s, h, dtype=_attention.lse_dtype(q.dtype)))


@torch.library.custom_op("dilated::ring_attention_backward", mutates_args=())
def ring_attention_backward_op(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, segment_lengths: List[int],
    dilation_rates: List[int], mode: str, is_causal: bool, scale: Optional[float], group_name: str, world_size: int,
    layout: str, key_padding_mask: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor, Tensor]:
    group = resolve_group(group_name, world_size)
    return ring_backward(grad_out.contiguous(), q, k, v, out, lse, segment_lengths, dilation_rates, mode, is_causal,
                         scale, group, world_size, dist.get_rank(group), layout, key_padding_mask)


@ring_attention_backward_op.register_fake
def _backward_fake(grad_out, q, k, v, out, lse, segment_lengths, dilation_rates, mode, is_causal, scale, group_name,
                   world_size, layout, key_padding_mask=None):
    return tuple(torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))


def _setup_context(ctx, inputs, output):
    q, k, v, segment_lengths, dilation_rates, mode, is_causal, scale, group_name, world_size, *rest = inputs
    layout, *mask = rest or ("contiguous",)
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, out, lse, *mask)
    ctx.config = (segment_lengths, dilation_rates, mode, is_causal, scale, group_name, world_size, layout)
    ctx.num_inputs = len(inputs)


def _backward(ctx, grad_out, _):
    q, k, v, out, lse, *mask = ctx.saved_tensors
    dq, dk, dv = ring_attention_backward_op(grad_out, q, k, v, out, lse, *ctx.config, *mask)
    return (dq, dk, dv) + (None,) * (ctx.num_inputs - 3)


ring_attention_op.register_autograd(_backward, setup_context=_setup_context)
