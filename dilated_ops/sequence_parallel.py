"""Sequence-parallel dilated attention over a ``torch.distributed`` process group (SPEC section
5, issue 20): each rank holds a contiguous shard of the sequence, rank ``p`` positions
``[p * n / P, (p + 1) * n / P)``, and gets the matching slice of the single-process result,
forward and backward.

``"ulysses"`` (DeepSpeed-Ulysses): an all-to-all turns q, k, v from sequence shards into head
shards (each rank then holds the whole sequence for ``heads / P`` heads), the ``dilated`` op runs
on them as the window of the whole call that those heads are (``head_start``, ``total_heads``:
head groups and offsets stay those of the whole call), and an all-to-all turns the output back
into sequence shards. Exact by construction. The all-to-alls are PyTorch's functional
collectives with their autograd (``all_to_all_single_autograd``): the backward moves the
output's gradient and q, k, v's gradients, four all-to-alls each way in all.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import Tensor

from . import _checks
from .registrations import dilated_attention as _op


def _seq_to_heads(x: Tensor, world_size: int, group) -> Tensor:
    """``(b, s, h, d)`` sequence shards -> ``(b, P * s, h / P, d)`` head shards."""
    b, s, h, d = x.shape
    send = x.view(b, s, world_size, h // world_size, d).permute(2, 0, 1, 3, 4).reshape(world_size * b, s, -1, d)
    recv = funcol.all_to_all_single_autograd(send, None, None, group)
    return recv.view(world_size, b, s, -1, d).transpose(0, 1).reshape(b, world_size * s, -1, d)


def _heads_to_seq(y: Tensor, world_size: int, group) -> Tensor:
    """``(b, P * s, h / P, d)`` head shards -> ``(b, s, h, d)`` sequence shards."""
    b, n, hp, d = y.shape
    s = n // world_size
    send = y.reshape(b, world_size, s, hp, d).transpose(0, 1).reshape(world_size * b, s, hp, d)
    recv = funcol.all_to_all_single_autograd(send, None, None, group)
    return recv.view(world_size, b, s, hp, d).permute(1, 2, 0, 3, 4).reshape(b, s, world_size * hp, d)


def ulysses_dilated_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    *,
    mode: str = "groups",
    is_causal: bool = False,
    scale: Optional[float] = None,
    group: Optional[dist.ProcessGroup] = None,
) -> Tensor:
    """Dilated attention (as :func:`dilated_ops.dilated_attention`) of a sequence sharded over
    the ranks of ``group``, by the Ulysses all-to-all over heads. With 2 ranks, 8 tokens::

        rank 0: q, k, v positions 0-3, heads 0..h-1  --all-to-all-->  positions 0-7, heads 0..h/2-1
        rank 1: q, k, v positions 4-7, heads 0..h-1  --all-to-all-->  positions 0-7, heads h/2..h-1
        each rank: the dilated op on its heads, then the output back the same way

    Args:
        q: ``(batch, seq / P, heads, head_dim)``: this rank's contiguous shard of the sequence.
        k: as q.
        v: as q.
        segment_lengths, dilation_rates, mode, is_causal, scale: as
            :func:`dilated_ops.dilated_attention`, for the whole sequence.
        group: the process group (default: the world); its size ``P`` must divide ``heads``.

    Returns:
        ``(batch, seq / P, heads, head_dim)``: this rank's slice of the single-process output.
    """
    group = group if group is not None else dist.group.WORLD
    world_size, rank = dist.get_world_size(group), dist.get_rank(group)
    segment_lengths, dilation_rates, scale = _checks.check_dilated_args(
        q, k, v, segment_lengths, dilation_rates, mode, scale, 0.0, is_causal=is_causal,
        total_heads=q.shape[2],
    )
    heads = q.shape[2]
    if heads % world_size:
        raise ValueError(f"ulysses: the process group's size ({world_size}) must divide num_heads ({heads})")
    qkv = _seq_to_heads(torch.cat([q, k, v]), world_size, group)
    qh, kh, vh = qkv.chunk(3)
    out, _ = _op.call(qh, kh, vh, segment_lengths, dilation_rates, mode, is_causal, scale, 0.0, None, "auto",
                      rank * (heads // world_size), heads)
    return _heads_to_seq(out, world_size, group)
