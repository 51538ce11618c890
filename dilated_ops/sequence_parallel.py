"""Sequence-parallel dilated attention over a ``torch.distributed`` process group (SPEC section
5, issue 20): each rank holds a contiguous shard of the sequence, rank ``p`` positions
``[p * n / P, (p + 1) * n / P)``, and gets the matching slice of the single-process result,
forward and backward.

``"ulysses"`` (DeepSpeed-Ulysses): ``torch.ops.dilated.ulysses_attention``
(:mod:`dilated_ops.registrations.ulysses_attention`, the math in
:mod:`dilated_ops.kernels.distributed`): an all-to-all turns q, k, v from sequence shards into
head shards, the dilated attention of those heads runs as the window of the whole call they are
(head groups and offsets stay the whole call's), and an all-to-all turns the output back.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from .registrations import ulysses_attention as _ulysses


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
    world_size = dist.get_world_size(group)
    # Checked before the op (whose schema would convert some values first) and before any
    # collective: a rank with bad input raises at once.
    segment_lengths, dilation_rates, scale = _ulysses.check_arguments(
        q, k, v, segment_lengths, dilation_rates, mode, is_causal, scale, world_size)
    return torch.ops.dilated.ulysses_attention(q, k, v, segment_lengths, dilation_rates, mode, is_causal, scale,
                                               group.group_name, world_size)[0]
