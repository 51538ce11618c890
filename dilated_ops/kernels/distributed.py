"""Sequence-parallel dilated attention over a ``torch.distributed`` process group (SPEC section
5): rank ``p`` of ``P`` holds positions ``[p * s, (p + 1) * s)`` of q, k, v ``(batch, s, heads,
head_dim)``.

Ulysses (DeepSpeed-Ulysses): an all-to-all turns the sequence shards into head shards (each rank
then holds all ``P * s`` positions of ``heads / P`` heads), :func:`.dilated.dilated_attention_forward`
runs on them as the window of the whole call those heads are (head groups and offsets stay the
whole call's), and an all-to-all turns the output back. The forward returns the head shards its
backward needs, so the backward moves only the output's gradient in and q, k, v's gradients out:
four tensors' worth of all-to-all each way, the least this scheme can move.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from .dilated import dilated_attention_backward, dilated_attention_forward


def seq_to_heads(xs: Sequence[torch.Tensor], world_size: int, group) -> torch.Tensor:
    """Sequence shards ``(b, s, h, *tail)``, one or more -> their head shards ``(len(xs) * b,
    P * s, h / P, *tail)``, stacked on the batch dim: one all-to-all for all of them, each
    written once into the send buffer."""
    b, s, h, *tail = xs[0].shape
    hp = h // world_size
    send = xs[0].new_empty(world_size, len(xs) * b, s, hp, *tail)
    for i, x in enumerate(xs):
        send[:, i * b:(i + 1) * b].copy_(x.reshape(b, s, world_size, hp, *tail).movedim(2, 0))
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)  # chunk i of recv: rank i's positions, my heads
    return recv.movedim(0, 1).reshape(len(xs) * b, world_size * s, hp, *tail)


def heads_to_seq(y: torch.Tensor, world_size: int, group, parts: int = 1) -> Tuple[torch.Tensor, ...]:
    """``(b, P * s, h / P, *tail)`` head shards -> ``(b / parts, s, h, *tail)`` sequence shards,
    one per equal part of the batch dim (tensors stacked there travel in one all-to-all); each a
    tensor of its own."""
    b, n, hp, *tail = y.shape
    s = n // world_size
    send = y.reshape(b, world_size, s, hp, *tail).movedim(1, 0).contiguous()
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)  # chunk i of recv: my positions, rank i's heads
    # clone: a copy the layout change needs anyway, and parts that never share storage
    return tuple(part.movedim(0, 2).clone(memory_format=torch.contiguous_format).view(b // parts, s, world_size * hp,
                                                                                      *tail)
                 for part in recv.chunk(parts, 1))


def ulysses_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segment_lengths: Sequence[int], dilation_rates: Sequence[int],
    mode: str, is_causal: bool, scale: Optional[float], group, world_size: int, rank: int,
) -> Tuple[torch.Tensor, ...]:
    """``(out, lse, qkv_heads, out_heads, lse_heads)``: this rank's slice of the output and
    log-sum-exp ``(b, s, h)``, and the head shards the backward takes: q, k, v stacked on the
    batch dim ``(3b, P * s, h / P, d)``, out and lse of those heads."""
    b, s, h, d = q.shape
    qkv = seq_to_heads((q, k, v), world_size, group)
    qh, kh, vh = qkv.chunk(3)
    out_h, lse_h = dilated_attention_forward(qh, kh, vh, segment_lengths, dilation_rates, mode, is_causal, scale,
                                             head_start=rank * (h // world_size), total_heads=h)
    (out,), (lse,) = heads_to_seq(out_h, world_size, group), heads_to_seq(lse_h, world_size, group)
    return out, lse, qkv, out_h, lse_h


def ulysses_backward(
    grad_out: torch.Tensor, qkv_heads: torch.Tensor, out_heads: torch.Tensor, lse_heads: torch.Tensor,
    segment_lengths: Sequence[int], dilation_rates: Sequence[int], mode: str, is_causal: bool,
    scale: Optional[float], group, world_size: int, rank: int,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv)`` ``(b, s, h, d)`` of this rank's shard, from the forward's head shards and
    the output's gradient ``(b, s, h, d)``."""
    h = grad_out.shape[2]
    qh, kh, vh = qkv_heads.chunk(3)
    grads = dilated_attention_backward(seq_to_heads((grad_out,), world_size, group), qh, kh, vh, out_heads, lse_heads,
                                       segment_lengths, dilation_rates, mode, is_causal, scale,
                                       head_start=rank * (h // world_size), total_heads=h)
    return heads_to_seq(torch.cat(grads), world_size, group, parts=3)


def ulysses_bytes(shard_shape: Sequence[int], element_size: int, lse_element_size: int,
                  world_size: int) -> Tuple[int, int]:
    """``(forward, backward)`` bytes one rank sends (and receives) in the all-to-alls of one
    Ulysses call on shards ``(b, s, h, d)``: q, k, v in and out and lse back in the forward,
    dO in and dq, dk, dv back in the backward; of each all-to-all a rank keeps ``1 / P`` (its
    own chunk) and sends the rest."""
    b, s, h, d = shard_shape
    tensor = b * s * h * d * element_size
    fwd = (4 * tensor + b * s * h * lse_element_size) * (world_size - 1) // world_size
    return fwd, 4 * tensor * (world_size - 1) // world_size

