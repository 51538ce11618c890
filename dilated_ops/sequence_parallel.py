"""Sequence-parallel dilated attention over a ``torch.distributed`` process group (SPEC section
5, issue 20): each rank holds a contiguous shard of the sequence, rank ``p`` positions
``[p * n / P, (p + 1) * n / P)``, and gets the matching slice of the single-process result,
forward and backward (:func:`sequence_parallel_attention`). Two strategies, each an op (the math
in :mod:`dilated_ops.kernels.distributed`):

- ``"longnet"`` (``torch.ops.dilated.longnet_attention``): each rank runs the single-device op on
  its shard; segments that span shards all-gather their dilated K/V rows. Needs every segment
  length to divide the shard length or be a multiple of it (rate dividing the shard length).
- ``"ring"`` (``torch.ops.dilated.ring_attention``): as longnet, but the spanning segments' rows
  travel the ring by point-to-point transfers overlapped with the attention, so a rank holds
  two ranks' rows at a time instead of all of them.
- ``"ulysses"`` (``torch.ops.dilated.ulysses_attention``, DeepSpeed-Ulysses): an all-to-all turns
  q, k, v from sequence shards into head shards, the heads' dilated attention runs on the whole
  sequence, an all-to-all turns the output back. Needs the group's size to divide the heads.

:func:`shard_sequence` and :func:`unshard_sequence` cut a whole sequence into this rank's shard
and put the shards back together.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from .kernels.distributed import LAYOUTS, chunks, longnet_geometry_error, pieces
from .registrations import longnet_attention as _longnet
from .registrations import ring_attention as _ring
from .registrations import ulysses_attention as _ulysses

STRATEGIES = ("auto", "longnet", "ulysses", "ring")
_REGISTRATIONS = {"longnet": _longnet, "ulysses": _ulysses, "ring": _ring}


def check_strategy(strategy) -> None:
    """ValueError for an unknown strategy."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {', '.join(map(repr, STRATEGIES))}: got {strategy!r}")


def _group_and_size(group):
    name, world_size = _ulysses.group_args(group)
    return (group if group is not None else dist.group.WORLD), name, world_size


def check_layout(layout) -> None:
    """ValueError for an unknown layout."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(map(repr, LAYOUTS))}: got {layout!r}")


def _chunk(x: Tensor, dim: int, chunk: int, size: int) -> Tensor:
    return x.narrow(dim, chunk * size, size)


def _mine(x: Tensor, dim: int, rank: int, world_size: int, layout: str) -> Tensor:
    """This rank's chunks (:func:`~dilated_ops.kernels.distributed.pieces`) of the whole ``x``."""
    mine = pieces(rank, world_size, layout)
    size = x.shape[dim] // chunks(world_size, layout)
    parts = [_chunk(x, dim, c, size) for c in mine]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim)


def shard_sequence(x: Tensor, group: Optional[dist.ProcessGroup] = None, dim: int = 1,
                   layout: str = "contiguous") -> Tensor:
    """This rank's shard of ``x`` along ``dim`` (the sequence dim of ``(batch, seq, ...)``), for
    rank ``p`` of the ``P`` ranks of ``group`` (default: the world)::

        layout="contiguous"  positions [p * n / P, (p + 1) * n / P): a view of x
        layout="zigzag"      chunks p and 2P - 1 - p of 2P (head and tail), concatenated: with
                             is_causal every rank attends as many keys (strategy "ring" only)

        n = 8, P = 2:   contiguous   rank 0: 0 1 2 3   rank 1: 4 5 6 7
                        zigzag       rank 0: 0 1 6 7   rank 1: 2 3 4 5

    Raises:
        ValueError: no initialized process group, an unknown layout, or ``x.shape[dim]`` not
            divisible by ``P`` (``2P`` zigzag: the strategies need equal shards).
    """
    check_layout(layout)
    group, _, world_size = _group_and_size(group)
    n, pieces_n = x.shape[dim], chunks(world_size, layout)
    if n % pieces_n:
        raise ValueError(f"shard_sequence: the sequence length ({n}, dim {dim}) must be divisible by {pieces_n} "
                         f"(layout {layout!r} on a process group of size {world_size}); pad the sequence to a "
                         f"multiple of {pieces_n}")
    return _mine(x, dim, dist.get_rank(group), world_size, layout)


class _Unshard(torch.autograd.Function):
    """All-gather along ``dim``, chunks put in sequence order; the gradient of each rank's shard
    sums every rank's gradient of the whole (an all-reduce, then this rank's chunks: collectives
    every backend has)."""

    @staticmethod
    def forward(ctx, x, group, dim: int, layout: str):
        ctx.group, ctx.dim, ctx.layout = group, dim, layout
        world_size = dist.get_world_size(group)
        parts = [torch.empty_like(x) for _ in range(world_size)]
        dist.all_gather(parts, x, group=group)
        m = len(pieces(0, world_size, layout))
        size = x.shape[dim] // m
        by_chunk = {c: _chunk(parts[p], dim, j, size) for p in range(world_size)
                    for j, c in enumerate(pieces(p, world_size, layout))}
        return torch.cat([by_chunk[c] for c in range(len(by_chunk))], dim)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        world_size = dist.get_world_size(ctx.group)
        return _mine(grad, ctx.dim, dist.get_rank(ctx.group), world_size, ctx.layout), None, None, None


def unshard_sequence(x: Tensor, group: Optional[dist.ProcessGroup] = None, dim: int = 1,
                     layout: str = "contiguous") -> Tensor:
    """The shards ``x`` of every rank of ``group`` put back together along ``dim`` in sequence
    order (the inverse of :func:`shard_sequence` with the same ``layout``). Differentiable: each
    rank's shard gets the sum of every rank's gradient of the whole."""
    check_layout(layout)
    group, _, _ = _group_and_size(group)
    return _Unshard.apply(x.contiguous(), group, dim, layout)


def _agree(q: Tensor, group, world_size: int, error: Optional[Exception]) -> None:
    """Every rank's arguments checked out and its shard has the same shape, or every rank
    raises: the rank whose check failed its own error, the others a ``ValueError`` quoting it,
    and all of them the same ``ValueError`` naming each rank's shape for unequal shards. One
    small all-gather (and a host sync); the messages travel only when a check failed."""
    nccl = dist.get_backend(group) == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
    # q passed the checks unless there is an error: 4-D then; a failed rank's shape is not read
    mine = torch.tensor([error is not None, *(q.shape if error is None else (0, 0, 0, 0))], dtype=torch.int64,
                        device=device)
    rows = [torch.empty_like(mine) for _ in range(world_size)]
    dist.all_gather(rows, mine, group=group)
    rows = [tuple(r.tolist()) for r in rows]
    failed = [i for i, r in enumerate(rows) if r[0]]
    if failed:
        messages = [None] * world_size
        dist.all_gather_object(messages, None if error is None else f"{type(error).__name__}: {error}", group=group)
        if error is not None:
            raise error
        raise ValueError(f"sequence-parallel attention: rank {failed[0]} of the group refused its arguments "
                         f"({messages[failed[0]]})")
    shapes = [r[1:] for r in rows]
    if len(set(shapes)) > 1:
        got = ", ".join(f"rank {i}: {s}" for i, s in enumerate(shapes))
        raise ValueError(f"sequence-parallel attention needs equal shards (batch, seq / P, heads, head_dim) on every "
                         f"rank: got {got}; dilated_ops.shard_sequence cuts them (seq divisible by P)")


def choose_strategy(strategy: str, q: Tensor, world_size: int, segment_lengths: Sequence[int],
                    dilation_rates: Sequence[int], layout: str = "contiguous") -> str:
    """The strategy ``"auto"`` stands for: ``"ring"`` for the zigzag layout (the one strategy
    that takes it), else ``"longnet"`` where the segments fit the shards (it moves only the
    dilated rows of segments that span shards), else ``"ulysses"``."""
    check_strategy(strategy)
    check_layout(layout)
    if layout != "contiguous":
        if strategy not in ("auto", "ring"):
            raise ValueError(f"layout {layout!r} is taken by strategy 'ring' only: got strategy {strategy!r}")
        return "ring"
    if strategy != "auto":
        return strategy
    if longnet_geometry_error(q.shape[1], world_size, segment_lengths, dilation_rates) is None:
        return "longnet"
    return "ulysses"


def sequence_parallel_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    *,
    strategy: str = "auto",
    mode: str = "groups",
    is_causal: bool = False,
    scale: Optional[float] = None,
    group: Optional[dist.ProcessGroup] = None,
    check_shards: bool = True,
    layout: str = "contiguous",
    key_padding_mask: Optional[Tensor] = None,
) -> Tensor:
    """Dilated attention (as :func:`dilated_ops.dilated_attention`) of a sequence sharded over
    the ranks of ``group``. With 2 ranks, 8 tokens, one branch ``w = 8, r = 2``::

        positions   0 1 2 3 | 4 5 6 7      rank 0 holds 0-3, rank 1 holds 4-7
        longnet:    x . x . | x . x .      each rank attends its own rows, all-gathers the
                                           segment's other rows (0, 2 <-> 4, 6), merges by lse
        ulysses:    all-to-all: rank 0 gets positions 0-7 of heads 0..h/2-1, rank 1 the rest;
                    each runs the op on its heads; all-to-all back

    Args:
        q: ``(batch, seq / P, heads, head_dim)``: this rank's contiguous shard of the sequence.
        k: ``(batch, seq / P, heads_kv, head_dim)``, ``heads_kv`` dividing ``heads``
            (grouped-query attention; "ulysses" needs ``P`` to divide ``heads_kv`` too).
        v: as k.
        segment_lengths, dilation_rates, mode, is_causal, scale: as
            :func:`dilated_ops.dilated_attention`, for the whole sequence.
        strategy: ``"auto"`` (``"longnet"`` where the segments fit the shards, else
            ``"ulysses"``), ``"longnet"``, ``"ring"`` (as longnet, the spanning segments' rows
            passed rank to rank instead of all-gathered: two ranks' rows held at a time) or
            ``"ulysses"``.
        group: the process group (default: the world).
        layout: how the sequence is sharded (:func:`shard_sequence`): ``"contiguous"``, or
            ``"zigzag"`` (rank ``p`` holds chunks ``p`` and ``2P - 1 - p`` of ``2P``: with
            ``is_causal`` the ring's work is even across ranks; strategy ``"ring"`` only, which
            ``"auto"`` then picks). Input and output are in that layout.
        key_padding_mask: this rank's shard ``(batch, seq / P)`` of a bool key padding mask
            (True = keep; SPEC section 8), in ``layout`` as q, or None.
        check_shards: first agree across ranks that every rank's arguments are valid and its
            shard has the same shape, so that every rank raises (one small all-gather and a host
            sync; eager calls only, skipped while ``torch.compile`` traces). Without it a rank
            with bad input raises alone and the launcher stops the others.

    Returns:
        ``(batch, seq / P, heads, head_dim)``: this rank's slice of the single-process output.

    Raises:
        ValueError: no initialized process group; an unknown strategy; "ulysses" with heads (or KV heads) not
            divisible by ``P``; "longnet" or "ring" with segments that do not fit the shards; shards of
            different shapes (with ``check_shards``); bad arguments as
            :func:`dilated_ops.dilated_attention`.
    """
    group, group_name, world_size = _group_and_size(group)
    agree = check_shards and not torch.compiler.is_compiling()
    # Checked before the op (whose schema would convert some values first) and before the op's
    # collectives; with check_shards every rank learns of a rank's bad input and raises.
    try:
        strategy = choose_strategy(strategy, q, world_size, segment_lengths, dilation_rates, layout)
        registration = _REGISTRATIONS[strategy]
        extra = (layout,) if strategy == "ring" else ()
        segment_lengths, dilation_rates, scale = registration.check_arguments(
            q, k, v, segment_lengths, dilation_rates, mode, is_causal, scale, world_size, *extra,
            key_padding_mask=key_padding_mask)
    except (TypeError, ValueError, NotImplementedError) as error:
        if not agree:
            raise
        _agree(q, group, world_size, error)
    if agree:
        _agree(q, group, world_size, None)
    op = getattr(torch.ops.dilated, f"{strategy}_attention")
    masks = () if key_padding_mask is None else (key_padding_mask,)  # graphs without one keep the short call
    return op(q, k, v, segment_lengths, dilation_rates, mode, is_causal, scale, group_name, world_size, *extra,
              *masks)[0]
