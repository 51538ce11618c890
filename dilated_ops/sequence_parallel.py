"""Sequence-parallel dilated attention over a ``torch.distributed`` process group (SPEC section
5, issue 20): each rank holds a contiguous shard of the sequence, rank ``p`` positions
``[p * n / P, (p + 1) * n / P)``, and gets the matching slice of the single-process result,
forward and backward.

``"ulysses"`` (DeepSpeed-Ulysses): ``torch.ops.dilated.ulysses_attention``
(:mod:`dilated_ops.registrations.ulysses_attention`, the math in
:mod:`dilated_ops.kernels.distributed`): an all-to-all turns q, k, v from sequence shards into
head shards, the dilated attention of those heads runs as the window of the whole call they are
(head groups and offsets stay the whole call's), and an all-to-all turns the output back.

:func:`shard_sequence` and :func:`unshard_sequence` cut a whole sequence into this rank's shard
and put the shards back together.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from .registrations import ulysses_attention as _ulysses

STRATEGIES = ("ulysses", "longnet", "ring")
BUILT_STRATEGIES = ("ulysses",)


def check_strategy(strategy) -> None:
    """ValueError for an unknown strategy, NotImplementedError for one not built yet."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {', '.join(map(repr, STRATEGIES))}: got {strategy!r}")
    if strategy not in BUILT_STRATEGIES:
        raise NotImplementedError(f"distributed: strategy {strategy!r} is not built yet; built: "
                                  f"{', '.join(map(repr, BUILT_STRATEGIES))}")


def _group_and_size(group):
    name, world_size = _ulysses.group_args(group)
    return (group if group is not None else dist.group.WORLD), name, world_size


def shard_sequence(x: Tensor, group: Optional[dist.ProcessGroup] = None, dim: int = 1) -> Tensor:
    """This rank's contiguous shard of ``x`` along ``dim`` (the sequence dim of ``(batch, seq,
    ...)``): positions ``[p * n / P, (p + 1) * n / P)`` for rank ``p`` of the ``P`` ranks of
    ``group`` (default: the world). A view of ``x``.

    Raises:
        ValueError: no initialized process group, or ``x.shape[dim]`` not divisible by ``P``
            (the strategies need equal shards).
    """
    group, _, world_size = _group_and_size(group)
    n = x.shape[dim]
    if n % world_size:
        raise ValueError(f"shard_sequence: the sequence length ({n}, dim {dim}) must be divisible by the process "
                         f"group's size ({world_size}); pad the sequence to a multiple of {world_size}")
    s = n // world_size
    return x.narrow(dim, dist.get_rank(group) * s, s)


class _Unshard(torch.autograd.Function):
    """All-gather along ``dim``; the gradient of each rank's shard sums every rank's gradient of
    the whole (an all-reduce, then this rank's slice: gloo has no reduce-scatter)."""

    @staticmethod
    def forward(ctx, x, group, dim: int):
        ctx.group, ctx.dim = group, dim
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x, group=group)
        return torch.cat(parts, dim)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        s = grad.shape[ctx.dim] // dist.get_world_size(ctx.group)
        return grad.narrow(ctx.dim, dist.get_rank(ctx.group) * s, s), None, None


def unshard_sequence(x: Tensor, group: Optional[dist.ProcessGroup] = None, dim: int = 1) -> Tensor:
    """The shards ``x`` of every rank of ``group``, concatenated along ``dim`` in rank order
    (the inverse of :func:`shard_sequence`). Differentiable: each rank's shard gets the sum of
    every rank's gradient of the whole."""
    group, _, _ = _group_and_size(group)
    return _Unshard.apply(x.contiguous(), group, dim)


def _check_equal_shards(q: Tensor, group, world_size: int) -> None:
    """Every rank's q has the same shape: else each raises naming every rank's (one small
    all-gather; a mismatched all-to-all would fail inside the backend, or hang)."""
    device = q.device if dist.get_backend(group) == "nccl" else torch.device("cpu")
    mine = torch.tensor(list(q.shape), dtype=torch.int64, device=device)
    shapes = [torch.empty_like(mine) for _ in range(world_size)]
    dist.all_gather(shapes, mine, group=group)
    shapes = [tuple(s.tolist()) for s in shapes]
    if len(set(shapes)) > 1:
        got = ", ".join(f"rank {i}: {s}" for i, s in enumerate(shapes))
        raise ValueError(f"sequence-parallel attention needs equal shards (batch, seq / P, heads, head_dim) on every "
                         f"rank: got {got}; dilated_ops.shard_sequence cuts them (seq divisible by P)")


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
    check_shards: bool = True,
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
        check_shards: first check that every rank's shard has the same shape (one small
            all-gather and a host sync; eager calls only, skipped while ``torch.compile``
            traces).

    Returns:
        ``(batch, seq / P, heads, head_dim)``: this rank's slice of the single-process output.

    Raises:
        ValueError: no initialized process group; ``P`` does not divide ``heads``; shards of
            different shapes (with ``check_shards``); bad arguments as
            :func:`dilated_ops.dilated_attention`.
    """
    group, group_name, world_size = _group_and_size(group)
    # Checked before the op (whose schema would convert some values first) and before any
    # collective: a rank with bad input raises at once.
    segment_lengths, dilation_rates, scale = _ulysses.check_arguments(
        q, k, v, segment_lengths, dilation_rates, mode, is_causal, scale, world_size)
    if check_shards and not torch.compiler.is_compiling():
        _check_equal_shards(q, group, world_size)
    return torch.ops.dilated.ulysses_attention(q, k, v, segment_lengths, dilation_rates, mode, is_causal, scale,
                                               group_name, world_size)[0]
