"""``torch.ops.dilated.ulysses_attention`` and its backward op: sequence-parallel dilated
attention by the Ulysses all-to-all (:mod:`dilated_ops.kernels.distributed`), custom op, fake
kernel, autograd.

q, k, v: this rank's shard ``(batch, seq / P, heads, head_dim)``. The process group comes by
name (``group_name``, as PyTorch's functional collectives take it) with its size ``world_size``
given, so the fake kernel needs no live group. k, v may have fewer heads (grouped-query
attention, ``P`` dividing them); ``key_padding_mask``: this rank's shard ``(batch, seq / P)``
bool, True = keep. Returns ``(out, lse, q_heads, k_heads, v_heads, out_heads, lse_heads)``: the
rank's output slice, its log-sum-exp ``(batch, seq / P, heads)``, and the head shards the
backward takes (saved instead of q, k, v: the backward then moves only gradients).
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

from .. import _checks
from ..kernels import attention as _attention
from ..kernels.distributed import ulysses_backward, ulysses_forward


def resolve_group(group_name: str, world_size: int):
    # PyTorch's functional collectives resolve their group_name argument the same way.
    group = dist.distributed_c10d._resolve_process_group(group_name)
    if dist.get_world_size(group) != world_size:
        raise ValueError(f"world_size ({world_size}) must be the size of process group {group_name!r} "
                         f"({dist.get_world_size(group)})")
    return group


def group_args(group) -> Tuple[str, int]:
    """``(group_name, world_size)``, the op's arguments for process group ``group`` (None: the
    default group). ValueError when torch.distributed has no initialized process group."""
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("sequence-parallel attention needs an initialized torch.distributed process group "
                         "(torch.distributed.init_process_group, e.g. under torchrun): none is")
    group = group if group is not None else dist.group.WORLD
    return group.group_name, dist.get_world_size(group)


def check_arguments(q, k, v, segment_lengths, dilation_rates, mode, is_causal, scale, world_size,
                    key_padding_mask=None):
    """The op's arguments, before any collective (a rank with bad input raises at once)."""
    segment_lengths, dilation_rates, scale = _checks.check_dilated_args(
        q, k, v, segment_lengths, dilation_rates, mode, scale, 0.0, is_causal=is_causal, total_heads=q.shape[2],
        key_padding_mask=key_padding_mask)
    _checks.check_positive_int("world_size", world_size)
    if q.shape[2] % world_size:
        raise ValueError(f"ulysses: the process group's size ({world_size}) must divide num_heads ({q.shape[2]})")
    if k.shape[2] % world_size:
        raise ValueError(f"ulysses: the process group's size ({world_size}) must divide the KV heads of grouped-query "
                         f"attention ({k.shape[2]}): strategy 'longnet' or 'ring' takes any")
    return segment_lengths, dilation_rates, scale


@torch.library.custom_op("dilated::ulysses_attention", mutates_args=())
def ulysses_attention_op(
    q: Tensor, k: Tensor, v: Tensor, segment_lengths: List[int], dilation_rates: List[int], mode: str,
    is_causal: bool, scale: Optional[float], group_name: str, world_size: int,
    key_padding_mask: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    check_arguments(q, k, v, segment_lengths, dilation_rates, mode, is_causal, scale, world_size, key_padding_mask)
    group = resolve_group(group_name, world_size)
    return ulysses_forward(q, k, v, segment_lengths, dilation_rates, mode, is_causal, scale, group, world_size,
                           dist.get_rank(group), key_padding_mask)


@ulysses_attention_op.register_fake
def _fake(q, k, v, segment_lengths, dilation_rates, mode, is_causal, scale, group_name, world_size,
          key_padding_mask=None):
    check_arguments(q, k, v, segment_lengths, dilation_rates, mode, is_causal, scale, world_size, key_padding_mask)
    b, s, h, d = q.shape
    n, hp, hkv, lse_dtype = s * world_size, h // world_size, k.shape[2] // world_size, _attention.lse_dtype(q.dtype)
    return (torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(b, s, h, dtype=lse_dtype),
            q.new_empty(b, n, hp, d), k.new_empty(b, n, hkv, d), v.new_empty(b, n, hkv, d), q.new_empty(b, n, hp, d),
            q.new_empty(b, n, hp, dtype=lse_dtype))


@torch.library.custom_op("dilated::ulysses_attention_backward", mutates_args=())
def ulysses_attention_backward_op(
    grad_out: Tensor, q_heads: Tensor, k_heads: Tensor, v_heads: Tensor, out_heads: Tensor, lse_heads: Tensor,
    segment_lengths: List[int], dilation_rates: List[int], mode: str, is_causal: bool, scale: Optional[float],
    group_name: str, world_size: int, key_padding_mask: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor, Tensor]:
    group = resolve_group(group_name, world_size)
    return ulysses_backward(grad_out.contiguous(), q_heads, k_heads, v_heads, out_heads, lse_heads, segment_lengths,
                            dilation_rates, mode, is_causal, scale, group, world_size, dist.get_rank(group),
                            key_padding_mask)


@ulysses_attention_backward_op.register_fake
def _backward_fake(grad_out, q_heads, k_heads, v_heads, out_heads, lse_heads, segment_lengths, dilation_rates, mode,
                   is_causal, scale, group_name, world_size, key_padding_mask=None):
    b, s, h, d = grad_out.shape
    hkv = k_heads.shape[2] * world_size
    return (torch.empty(b, s, h, d, dtype=grad_out.dtype, device=grad_out.device),
            k_heads.new_empty(b, s, hkv, d), v_heads.new_empty(b, s, hkv, d))


def _setup_context(ctx, inputs, output):
    _, _, _, segment_lengths, dilation_rates, mode, is_causal, scale, group_name, world_size, *mask = inputs
    _, lse, *heads = output
    ctx.mark_non_differentiable(lse, *heads)
    ctx.save_for_backward(*heads, *mask)
    ctx.config = (segment_lengths, dilation_rates, mode, is_causal, scale, group_name, world_size)


def _backward(ctx, grad_out, *_):
    q_heads, k_heads, v_heads, out_heads, lse_heads, *mask = ctx.saved_tensors
    dq, dk, dv = ulysses_attention_backward_op(grad_out, q_heads, k_heads, v_heads, out_heads, lse_heads, *ctx.config,
                                               *mask)
    return (dq, dk, dv) + (None,) * (7 + len(mask))


ulysses_attention_op.register_autograd(_backward, setup_context=_setup_context)
