"""Sequence-parallel dilated attention over a ``torch.distributed`` process group (SPEC section
5): rank ``p`` of ``P`` holds positions ``[p * s, (p + 1) * s)`` of q, k, v ``(batch, s, heads,
head_dim)``.

Ulysses (DeepSpeed-Ulysses): an all-to-all turns the sequence shards into head shards (each rank
then holds all ``P * s`` positions of ``heads / P`` heads), :func:`.dilated.dilated_attention_forward`
runs on them as the window of the whole call those heads are (head groups and offsets stay the
whole call's), and an all-to-all turns the output back. The forward returns the head shards its
backward needs, so the backward moves only the output's gradient in and q, k, v's gradients out:
four tensors' worth of all-to-all each way, the least this scheme can move.

LongNet (the paper's sequence parallelism, exact): each rank runs the single-device op on its
own shard. A branch whose segments lie inside shards (``w`` divides the shard length ``s``) needs
nothing more. A branch whose segment spans ``m = w / s`` whole shards (``w`` a multiple of ``s``,
``w >= n`` meaning the whole sequence) got, from the shard alone, attention over the segment's
dilated rows in this shard; the rows of the segment's other shards (all of them, or with
``is_causal`` the earlier ones) come by an all-gather among the ranks of the segment only (one
per span, of every branch with that span: ``s / r`` rows a head), are attended by the rank's
selected queries, and are merged in by log-sum-exp (SPEC section 3: one softmax over the union).
The backward is the single-device backward with the merged output and log-sum-exp, plus the
gathered rows' backward, whose K/V gradients go home by a reduce-scatter among the same ranks
(accumulated in float32).

Ring: as LongNet, but the spanning segments' rows travel the ring by point-to-point transfers,
one rank's rows per step (the next transfer posted before this step's attention), so a rank holds
two ranks' rows at a time; the backward sends them around again with a float32 accumulator of
their gradients, home after ``P`` passes.
"""
from __future__ import annotations

import functools
import threading
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from . import attention
from .dilated import dilated_attention_backward, dilated_attention_forward
from .segments import plan


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


# torch 2.13 renamed the flat-tensor collectives (the old names warn); torch 2.6-2.12 have only those
_ALL_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_REDUCE_SCATTER = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def longnet_geometry_error(shard_len: int, world_size: int, segment_lengths: Sequence[int],
                           dilation_rates: Sequence[int]) -> Optional[str]:
    """Why the LongNet strategy cannot run shards of ``shard_len`` positions on ``world_size``
    ranks, or None: each branch's segment must lie inside a shard (``w`` divides the shard
    length) or span whole shards (``w`` a multiple of it, or ``w`` at least the sequence) with
    the rate dividing the shard length (every shard then holds ``s / r`` dilated rows)."""
    n = shard_len * world_size
    for i, (w, r) in enumerate(zip(segment_lengths, dilation_rates)):
        w = min(w, n)
        if shard_len % w == 0:
            continue
        if w % shard_len or shard_len % r:
            return (f"the longnet and ring strategies need each segment length to divide the shard length "
                    f"({shard_len}) or be a multiple of it with the rate dividing the shard length: "
                    f"segment_lengths[{i}] = {segment_lengths[i]}, dilation_rates[{i}] = {r} on {world_size} ranks")
    return None


class _Branch(NamedTuple):
    """A branch whose segments span shards (``span`` of them, at most ``P``), on the heads
    ``[head_start, head_start + num_heads)`` at offset ``offset`` (groups mode: the branch's
    group, one offset) or, with ``offset`` None, head ``j`` at offset ``j % rate`` (longnet
    mode: every head): its launches (:func:`segments.plan`) batched into one attention call."""

    seg_len: int
    rate: int
    head_start: int
    num_heads: int
    offset: Optional[int]
    span: int


@functools.lru_cache(maxsize=256)
def _spanning(h: int, shard_len: int, world_size: int, segment_lengths: Tuple[int, ...],
              dilation_rates: Tuple[int, ...], mode: str) -> Tuple[_Branch, ...]:
    """The branches whose segments span more than one shard, ordered by span (the rows of the
    branches of one span are gathered together)."""
    n = shard_len * world_size
    branches = {}
    for c in plan(h, segment_lengths, dilation_rates, mode):
        if min(c.seg_len, n) > shard_len:
            span = min(c.seg_len, n) // shard_len
            if mode == "groups":  # one launch per branch: its head group, one offset
                start, stop, _ = c.heads.indices(h)
                branches[c.branch] = _Branch(c.seg_len, c.rate, start, stop - start, c.offset, span)
            else:  # a launch per offset class, together every head
                branches[c.branch] = _Branch(c.seg_len, c.rate, 0, h, None, span)
    return tuple(sorted(branches.values(), key=lambda x: x.span))


def _branches(shape, world_size: int, segment_lengths, dilation_rates, mode) -> Tuple[_Branch, ...]:
    # int(h), int(s): cached by value (a symbolic size, e.g. under a fake kernel's dynamic
    # shapes, is specialized here)
    return _spanning(int(shape[2]), int(shape[1]), world_size, tuple(segment_lengths), tuple(dilation_rates), mode)


def _members(span: int, rank: int, world_size: int) -> range:
    """The ranks holding this rank's segment when segments span ``span`` shards."""
    first = rank // span * span
    return range(first, min(first + span, world_size))


def _peers(branch: _Branch, rank: int, shard_len: int, world_size: int, is_causal: bool) -> List[int]:
    """The other ranks holding rows of this rank's segment of ``branch`` (with ``is_causal``,
    the earlier ones: all their rows precede this rank's)."""
    return [p for p in _members(branch.span, rank, world_size) if p < rank or (p > rank and not is_causal)]


_SEGMENT_GROUPS: Dict[tuple, object] = {}  # (group name, span, first member) -> its process group
_SEGMENT_GROUPS_LOCK = threading.Lock()


def _segment_group(group, span: int, rank: int, world_size: int):
    """The process group of this rank's segment's ranks (``group`` itself when a segment spans
    every rank), made once per (group, span) by the member ranks alone."""
    members = _members(span, rank, world_size)
    if len(members) == world_size:
        return group
    key = (group.group_name, span, members[0])
    with _SEGMENT_GROUPS_LOCK:
        sub = _SEGMENT_GROUPS.get(key)
        if sub is None:
            sub = dist.new_group([dist.get_global_rank(group, p) for p in members], use_local_synchronization=True)
            _SEGMENT_GROUPS[key] = sub
    return sub


def _span_runs(branches, b: int, s: int, d: int):
    """``(span, first column, columns)`` of each run of branches with one span in a packed
    buffer (:func:`_pack`; the branches are ordered by span)."""
    runs, at = [], 0
    for x in branches:
        size = 2 * b * x.num_heads * (s // x.rate) * d
        if runs and runs[-1][0] == x.span:
            runs[-1][2] += size
        else:
            runs.append([x.span, at, size])
        at += size
    return runs


def _index(branch: _Branch, shard_len: int, device):
    """``(rows, heads)`` index tensors ``(H, s / r)`` and ``(H, 1)``: ``x[:, rows, heads]`` is
    the branch's dilated rows of a shard ``(b, s, h, ...)`` as ``(b, H, s / r, ...)`` (the shard
    starts on a multiple of the rate, so each head's offset is its launch's)."""
    heads = torch.arange(branch.head_start, branch.head_start + branch.num_heads, device=device)
    offsets = heads % branch.rate if branch.offset is None else torch.full_like(heads, branch.offset)
    rows = offsets[:, None] + branch.rate * torch.arange(shard_len // branch.rate, device=device)
    return rows, heads[:, None]


def spanning_numel(shape, world_size: int, segment_lengths, dilation_rates, mode) -> int:
    """Elements per rank of the gathered K/V rows (the forward's third output, per rank)."""
    b, s, h, d = shape
    return sum(2 * b * x.num_heads * (s // x.rate) * d
               for x in _branches(shape, world_size, segment_lengths, dilation_rates, mode))


def _unpack(flat: torch.Tensor, branches, b: int, s: int, d: int):
    """Per branch, the (k rows, v rows) ``(b, H, s / r, d)`` of one rank's packed buffer."""
    out, at = [], 0
    for x in branches:
        shape = (b, x.num_heads, s // x.rate, d)
        size = shape[0] * shape[1] * shape[2] * shape[3]
        out.append((flat[at:at + size].view(shape), flat[at + size:at + 2 * size].view(shape)))
        at += 2 * size
    return out


def _spanning_setup(q: torch.Tensor, world_size: int, segment_lengths, dilation_rates, mode):
    """``(branches, index, g)`` of a call on shard ``q``: the spanning branches, their row
    indices (:func:`_index`), and ``G`` in groups mode (a head's output is its branch's / G) or
    1 in longnet mode."""
    branches = _branches(q.shape, world_size, segment_lengths, dilation_rates, mode)
    index = [_index(x, q.shape[1], q.device) for x in branches]
    return branches, index, (len(segment_lengths) if mode == "groups" else 1)


def _pack(k: torch.Tensor, v: torch.Tensor, index) -> torch.Tensor:
    """This shard's K/V rows of the spanning branches, packed flat (:func:`_unpack` reads them)."""
    return torch.cat([t[:, rows, heads].reshape(-1) for rows, heads in index for t in (k, v)])


def _peer_rows(parts, peers, i: int):
    """Branch ``i``'s K and V rows of the ranks ``peers`` (in rank order) from the unpacked
    per-rank buffers ``parts``: ``(b, H, len(peers) * s / r, d)`` each."""
    return tuple(torch.cat([parts[p][i][j] for p in peers], 2) for j in (0, 1))


def _merge_rows(out, lse, q, rows, heads, kp, vp, g: int, scale: float) -> None:
    """Attention of the rows ``q[:, rows, heads]`` over other ranks' K/V rows ``kp``, ``vp``
    ``(b, H, L, d)``, merged into ``out`` and ``lse`` at those rows by log-sum-exp (SPEC section
    3: one softmax over the union; ``g``: the number of branches in groups mode, where a head's
    output is its branch's / G, else 1)."""
    o_p, l_p = attention.forward(q[:, rows, heads], kp, vp, False, scale)
    lse_x = lse[:, rows, heads]
    l_p = l_p.to(lse.dtype)
    l_new = torch.logaddexp(lse_x, l_p)
    merged = (out[:, rows, heads].to(lse.dtype) * (g * torch.exp(lse_x - l_new)).unsqueeze(-1)
              + o_p.to(lse.dtype) * torch.exp(l_p - l_new).unsqueeze(-1))
    out[:, rows, heads] = (merged / g).to(out.dtype)
    lse[:, rows, heads] = l_new


def _rows_backward(grad_out, q, out, lse, dq, rows, heads, kp, vp, g: int, scale: float):
    """The backward of :func:`_merge_rows`'s attention given the merged ``out`` and ``lse``:
    adds the rows' dq into ``dq``, returns the K/V rows' gradients ``(b, H, L, d)`` in ``lse``'s
    dtype."""
    o_in = out[:, rows, heads] * g  # groups: the branch's own output (SPEC section 3)
    gq, gk, gv = attention.backward(grad_out[:, rows, heads], q[:, rows, heads], kp, vp, o_in,
                                    lse[:, rows, heads], False, scale)
    dq[:, rows, heads] += (gq / g).to(dq.dtype)
    return (gk / g).to(lse.dtype), (gv / g).to(lse.dtype)


def longnet_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segment_lengths: Sequence[int], dilation_rates: Sequence[int],
    mode: str, is_causal: bool, scale: Optional[float], group, world_size: int, rank: int,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(out, lse, gathered)``: this rank's slice of the output and log-sum-exp ``(b, s, h)``,
    and the gathered K/V rows ``(P, numel)`` (:func:`spanning_numel`) the backward takes."""
    b, s, h, d = q.shape
    scale = attention.default_scale(d, scale)
    out, lse = dilated_attention_forward(q, k, v, segment_lengths, dilation_rates, mode, is_causal, scale)
    branches, index, g = _spanning_setup(q, world_size, segment_lengths, dilation_rates, mode)
    if not branches:
        return out, lse, q.new_empty(world_size, 0)
    send = _pack(k, v, index)
    # row p: rank p's rows, filled for the ranks of this rank's segments (the others are not read)
    gathered = send.new_zeros(world_size, send.numel())
    for span, at, size in _span_runs(branches, b, s, d):
        members = _members(span, rank, world_size)
        received = send.new_empty(len(members) * size)
        _ALL_GATHER(received, send[at:at + size], group=_segment_group(group, span, rank, world_size))
        gathered[members.start:members.stop, at:at + size] = received.view(len(members), size)
    parts = [_unpack(gathered[p], branches, b, s, d) for p in range(world_size)]
    for i, (x, (rows, heads)) in enumerate(zip(branches, index)):
        peers = _peers(x, rank, s, world_size, is_causal)
        if not peers:
            continue
        kp, vp = _peer_rows(parts, peers, i)
        _merge_rows(out, lse, q, rows, heads, kp, vp, g, scale)
    return out, lse, gathered


def longnet_backward(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    gathered: torch.Tensor, segment_lengths: Sequence[int], dilation_rates: Sequence[int], mode: str,
    is_causal: bool, scale: Optional[float], group, world_size: int, rank: int,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv)`` ``(b, s, h, d)`` of this rank's shard, from the forward's merged ``out``,
    ``lse`` and ``gathered`` rows."""
    b, s, h, d = q.shape
    scale = attention.default_scale(d, scale)
    dq, dk, dv = dilated_attention_backward(grad_out, q, k, v, out, lse, segment_lengths, dilation_rates, mode,
                                            is_causal, scale)
    branches, index, g = _spanning_setup(q, world_size, segment_lengths, dilation_rates, mode)
    if not branches:
        return dq, dk, dv
    parts = [_unpack(gathered[p], branches, b, s, d) for p in range(world_size)]
    # every rank's K/V rows' gradients from this rank's queries, summed over ranks in float32
    home = torch.zeros(gathered.shape, dtype=lse.dtype, device=q.device)
    home_parts = [_unpack(home[p], branches, b, s, d) for p in range(world_size)]
    for i, (x, (rows, heads)) in enumerate(zip(branches, index)):
        peers = _peers(x, rank, s, world_size, is_causal)
        if not peers:
            continue
        kp, vp = _peer_rows(parts, peers, i)
        gk, gv = _rows_backward(grad_out, q, out, lse, dq, rows, heads, kp, vp, g, scale)
        n_rows = s // x.rate
        for j, p in enumerate(peers):
            home_parts[p][i][0].copy_(gk[:, :, j * n_rows:(j + 1) * n_rows])
            home_parts[p][i][1].copy_(gv[:, :, j * n_rows:(j + 1) * n_rows])
    mine = home.new_empty(home.shape[1])
    for span, at, size in _span_runs(branches, b, s, d):
        members = _members(span, rank, world_size)
        _REDUCE_SCATTER(mine[at:at + size], home[members.start:members.stop, at:at + size].contiguous().view(-1),
                        group=_segment_group(group, span, rank, world_size))
    for (rows, heads), (gk, gv) in zip(index, _unpack(mine, branches, b, s, d)):
        dk[:, rows, heads] += gk.to(dk.dtype)
        dv[:, rows, heads] += gv.to(dv.dtype)
    return dq, dk, dv


def longnet_bytes(shard_shape: Sequence[int], element_size: int, accumulate_size: int, world_size: int,
                  segment_lengths: Sequence[int], dilation_rates: Sequence[int], mode: str) -> Tuple[int, int]:
    """``(forward, backward)`` bytes a rank of a full segment (rank 0) sends in one LongNet call
    on shards ``(b, s, h, d)``: per spanning branch, its dilated K/V rows to the other ranks of
    its segment (all-gather), and the gathered rows' gradients in the accumulation dtype
    (reduce-scatter: as many chunks of the same size), as a ring algorithm moves them."""
    b, s, h, d = shard_shape
    branches = _branches(shard_shape, world_size, segment_lengths, dilation_rates, mode)
    numel = sum((len(_members(span, 0, world_size)) - 1) * size for span, _, size in _span_runs(branches, b, s, d))
    return numel * element_size, numel * accumulate_size


LAYOUTS = ("contiguous", "zigzag")


def pieces(rank: int, world_size: int, layout: str) -> Tuple[int, ...]:
    """The chunks of the sequence this rank's shard holds, in order: ``"contiguous"``: chunk
    ``rank`` of ``P``; ``"zigzag"``: chunks ``rank`` and ``2P - 1 - rank`` of ``2P`` (head and
    tail: with ``is_causal`` every rank then has as many earlier keys to attend)."""
    return (rank,) if layout == "contiguous" else (rank, 2 * world_size - 1 - rank)


def chunks(world_size: int, layout: str) -> int:
    """How many chunks the sequence is cut into: ``P`` (contiguous) or ``2P`` (zigzag)."""
    return world_size * len(pieces(0, world_size, layout))


def ring_bytes(shard_shape: Sequence[int], element_size: int, accumulate_size: int, world_size: int,
               segment_lengths: Sequence[int], dilation_rates: Sequence[int], mode: str,
               layout: str = "contiguous") -> Tuple[int, int]:
    """``(forward, backward)`` bytes one rank sends in one ring call on shards ``(b, s, h, d)``:
    the spanning segments' K/V rows it holds, ``P - 1`` times forward and again backward, and the
    rows' float32 gradients ``P`` times (the last pass takes them home)."""
    b, s, h, d = shard_shape
    m = len(pieces(0, world_size, layout))
    numel = m * spanning_numel((b, s // m, h, d), chunks(world_size, layout), segment_lengths, dilation_rates, mode)
    if not numel:
        return 0, 0
    return ((world_size - 1) * numel * element_size,
            (world_size - 1) * numel * element_size + world_size * numel * accumulate_size)


def _pass(tensors, group, rank: int, world_size: int):
    """Sends each tensor to the next rank of the ring and receives as many from the previous
    one (batched isend/irecv); returns ``(requests, received)``: wait on the requests before
    reading the received tensors."""
    nxt = dist.get_global_rank(group, (rank + 1) % world_size)
    prev = dist.get_global_rank(group, (rank - 1) % world_size)
    received = [torch.empty_like(t) for t in tensors]
    ops = [dist.P2POp(dist.isend, t, nxt, group) for t in tensors]
    ops += [dist.P2POp(dist.irecv, r, prev, group) for r in received]
    return dist.batch_isend_irecv(ops), received


def _wait(requests) -> None:
    for r in requests:
        r.wait()


class _Ring(NamedTuple):
    """A ring call's view of this rank's shard: its chunks (:func:`pieces`) of ``c`` positions
    each on a virtual ring of ``chunks`` ranks, where the LongNet geometry applies chunk by
    chunk; the spanning branches of that geometry with their row indices inside a chunk."""

    mine: Tuple[int, ...]
    c: int
    chunks: int
    branches: Tuple[_Branch, ...]
    index: list
    g: int

    def views(self, x: torch.Tensor) -> List[torch.Tensor]:
        """This rank's chunks of a shard-shaped tensor ``(b, s, ...)``, as views."""
        return [x[:, j * self.c:(j + 1) * self.c] for j in range(len(self.mine))]

    def pack(self, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return torch.cat([_pack(kc, vc, self.index) for kc, vc in zip(self.views(k), self.views(v))])

    def unpack(self, flat: torch.Tensor, owner: int, world_size: int, layout: str, b: int, d: int):
        """``{chunk: per-branch (k rows, v rows)}`` of a buffer packed by rank ``owner``."""
        size = flat.numel() // len(self.mine)
        return {p: _unpack(flat[j * size:(j + 1) * size], self.branches, b, self.c, d)
                for j, p in enumerate(pieces(owner, world_size, layout))}

    def peers(self, i: int, chunk: int, is_causal: bool, held) -> List[int]:
        """The chunks among ``held`` whose rows chunk ``chunk``'s queries of branch ``i`` read."""
        return [p for p in _peers(self.branches[i], chunk, self.c, self.chunks, is_causal) if p in held]


def _ring_setup(q: torch.Tensor, world_size: int, rank: int, segment_lengths, dilation_rates, mode,
                layout: str) -> _Ring:
    b, s, h, d = q.shape
    mine = pieces(rank, world_size, layout)
    c = s // len(mine)
    branches = _branches((b, c, h, d), chunks(world_size, layout), segment_lengths, dilation_rates, mode)
    return _Ring(mine, c, chunks(world_size, layout), branches, [_index(x, c, q.device) for x in branches],
                 len(segment_lengths) if mode == "groups" else 1)


def _by_chunk(x: torch.Tensor, m: int) -> torch.Tensor:
    """A shard ``(b, s, ...)`` of ``m`` chunks as ``(b * m, s / m, ...)``: the chunks as batch
    entries, for the single-device op (each chunk's own segments)."""
    return x.reshape(x.shape[0] * m, x.shape[1] // m, *x.shape[2:])


def _by_shard(x: torch.Tensor, m: int) -> torch.Tensor:
    return x.reshape(x.shape[0] // m, x.shape[1] * m, *x.shape[2:])


def ring_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segment_lengths: Sequence[int], dilation_rates: Sequence[int],
    mode: str, is_causal: bool, scale: Optional[float], group, world_size: int, rank: int,
    layout: str = "contiguous",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)`` of this rank's shard by the ring: the single-device op on each of the
    shard's chunks (:func:`pieces`), then the packed dilated K/V rows of the spanning segments
    travel the ring, one rank's per step (the next step's transfer posted before this step's
    attention), and each chunk merges in the rows of its segments' other chunks as they pass
    (step 0: the rank's own other chunk, zigzag). Only two ranks' rows are held at a time."""
    b, s, h, d = q.shape
    scale = attention.default_scale(d, scale)
    ring = _ring_setup(q, world_size, rank, segment_lengths, dilation_rates, mode, layout)
    m = len(ring.mine)
    out, lse = dilated_attention_forward(_by_chunk(q, m), _by_chunk(k, m), _by_chunk(v, m), segment_lengths,
                                         dilation_rates, mode, is_causal, scale)
    out, lse = _by_shard(out, m), _by_shard(lse, m)
    if not ring.branches:
        return out, lse
    qs, outs, lses = ring.views(q), ring.views(out), ring.views(lse)
    rows_kv = ring.pack(k, v)
    for step in range(world_size):
        owner = (rank - step) % world_size  # whose rows rows_kv holds
        transfer = _pass([rows_kv], group, rank, world_size) if step < world_size - 1 else None
        parts = ring.unpack(rows_kv, owner, world_size, layout, b, d)
        for j, chunk in enumerate(ring.mine):
            for i, (rows, heads) in enumerate(ring.index):
                peers = ring.peers(i, chunk, is_causal, parts)
                if peers:
                    kp, vp = _peer_rows(parts, peers, i)
                    _merge_rows(outs[j], lses[j], qs[j], rows, heads, kp, vp, ring.g, scale)
        if transfer is not None:
            _wait(transfer[0])
            (rows_kv,) = transfer[1]
    return out, lse


def ring_backward(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    segment_lengths: Sequence[int], dilation_rates: Sequence[int], mode: str, is_causal: bool,
    scale: Optional[float], group, world_size: int, rank: int, layout: str = "contiguous",
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv)`` of this rank's shard: the single-device backward on each chunk with the
    merged ``out`` and ``lse``, then the K/V rows travel the ring again with a float32
    accumulator of their gradients, which each rank adds its queries' share to; after ``P``
    passes the accumulator is home."""
    b, s, h, d = q.shape
    scale = attention.default_scale(d, scale)
    ring = _ring_setup(q, world_size, rank, segment_lengths, dilation_rates, mode, layout)
    m = len(ring.mine)
    grads = dilated_attention_backward(*(_by_chunk(t, m) for t in (grad_out, q, k, v, out, lse)), segment_lengths,
                                       dilation_rates, mode, is_causal, scale)
    dq, dk, dv = (_by_shard(t, m) for t in grads)
    if not ring.branches:
        return dq, dk, dv
    qs, outs, lses, gos, dqs = (ring.views(t) for t in (q, out, lse, grad_out, dq))
    rows_kv = ring.pack(k, v)
    grads = torch.zeros(rows_kv.shape, dtype=lse.dtype, device=q.device)  # of the rows in rows_kv
    for step in range(world_size):
        owner = (rank - step) % world_size
        transfer = _pass([rows_kv], group, rank, world_size) if step < world_size - 1 else None
        parts = ring.unpack(rows_kv, owner, world_size, layout, b, d)
        grad_parts = ring.unpack(grads, owner, world_size, layout, b, d)
        for j, chunk in enumerate(ring.mine):
            for i, (rows, heads) in enumerate(ring.index):
                peers = ring.peers(i, chunk, is_causal, parts)
                if not peers:
                    continue
                kp, vp = _peer_rows(parts, peers, i)
                gk, gv = _rows_backward(gos[j], qs[j], outs[j], lses[j], dqs[j], rows, heads, kp, vp, ring.g, scale)
                n_rows = ring.c // ring.branches[i].rate
                for t, p in enumerate(peers):
                    grad_parts[p][i][0].add_(gk[:, :, t * n_rows:(t + 1) * n_rows])
                    grad_parts[p][i][1].add_(gv[:, :, t * n_rows:(t + 1) * n_rows])
        requests, (grads,) = _pass([grads], group, rank, world_size)  # with their rows, to the next rank
        _wait(requests)
        if transfer is not None:
            _wait(transfer[0])
            (rows_kv,) = transfer[1]
    home = ring.unpack(grads, rank, world_size, layout, b, d)  # home after P passes
    for j, chunk in enumerate(ring.mine):
        dk_j, dv_j = ring.views(dk)[j], ring.views(dv)[j]
        for (rows, heads), (gk, gv) in zip(ring.index, home[chunk]):
            dk_j[:, rows, heads] += gk.to(dk.dtype)
            dv_j[:, rows, heads] += gv.to(dv.dtype)
    return dq, dk, dv
