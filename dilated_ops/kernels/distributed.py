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


def seq_to_heads(xs: Sequence[torch.Tensor], world_size: int, group) -> List[torch.Tensor]:
    """Sequence shards ``(b, s, h_i, *tail)`` of one dtype, one or more (``P`` dividing each
    head count) -> their head shards ``(b, P * s, h_i / P, *tail)``, each a tensor of its own:
    one all-to-all for all of them, each written once into the send buffer."""
    sizes = [x[:, :, :x.shape[2] // world_size].numel() for x in xs]
    send = xs[0].new_empty(world_size, sum(sizes))
    at = 0
    for x, size in zip(xs, sizes):
        b, s, h, *tail = x.shape
        send[:, at:at + size].view(world_size, b, s, h // world_size, *tail).copy_(
            x.reshape(b, s, world_size, h // world_size, *tail).movedim(2, 0))
        at += size
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)  # chunk i of recv: rank i's positions, my heads
    out, at = [], 0
    for x, size in zip(xs, sizes):
        b, s, h, *tail = x.shape
        part = recv[:, at:at + size].view(world_size, b, s, h // world_size, *tail)
        # a tensor of its own even for P = 1 (the op returns several: they must not share storage)
        dst = x.new_empty(b, world_size * s, h // world_size, *tail)
        dst.view(b, world_size, s, h // world_size, *tail).copy_(part.movedim(0, 1))
        out.append(dst)
        at += size
    return out


def heads_to_seq(ys: Sequence[torch.Tensor], world_size: int, group) -> List[torch.Tensor]:
    """Head shards ``(b, P * s, h_i / P, *tail)`` of one dtype, one or more -> their sequence
    shards ``(b, s, h_i, *tail)``, each a tensor of its own: one all-to-all for all of them."""
    sizes = [y.numel() // world_size for y in ys]
    send = ys[0].new_empty(world_size, sum(sizes))
    at = 0
    for y, size in zip(ys, sizes):
        b, n, hp, *tail = y.shape
        send[:, at:at + size].view(world_size, b, n // world_size, hp, *tail).copy_(
            y.reshape(b, world_size, n // world_size, hp, *tail).movedim(1, 0))
        at += size
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)  # chunk i of recv: my positions, rank i's heads
    out, at = [], 0
    for y, size in zip(ys, sizes):
        b, n, hp, *tail = y.shape
        part = recv[:, at:at + size].view(world_size, b, n // world_size, hp, *tail)
        dst = y.new_empty(b, n // world_size, world_size * hp, *tail)
        dst.view(b, n // world_size, world_size, hp, *tail).copy_(part.movedim(0, 2))
        out.append(dst)
        at += size
    return out


def gather_mask(key_padding_mask: Optional[torch.Tensor], world_size: int, group) -> Optional[torch.Tensor]:
    """Every rank's key padding mask shard ``(b, s)`` bool -> the whole sequence's ``(b, P * s)``
    (one all-gather of bytes: gloo takes no bool)."""
    if key_padding_mask is None:
        return None
    b, s = key_padding_mask.shape
    mine = key_padding_mask.to(torch.uint8).contiguous()
    whole = mine.new_empty(world_size * b, s)  # gloo wants the ranks' shards stacked on dim 0
    _ALL_GATHER(whole, mine, group=group)
    return whole.view(world_size, b, s).movedim(0, 1).reshape(b, world_size * s).bool()


def ulysses_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segment_lengths: Sequence[int], dilation_rates: Sequence[int],
    mode: str, is_causal: bool, scale: Optional[float], group, world_size: int, rank: int,
    key_padding_mask: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, ...]:
    """``(out, lse, q_heads, k_heads, v_heads, out_heads, lse_heads)``: this rank's slice of the
    output and log-sum-exp ``(b, s, h)``, and the head shards the backward takes (q ``(b, P * s,
    h / P, d)``, k and v ``(b, P * s, h_kv / P, d)``, out and lse of those heads). Grouped-query
    attention: ``P`` divides ``h_kv``, so a rank's query heads read its own KV heads;
    ``key_padding_mask`` ``(b, s)``: this rank's shard of it, all-gathered."""
    h = q.shape[2]
    qh, kh, vh = seq_to_heads((q, k, v), world_size, group)
    whole_mask = gather_mask(key_padding_mask, world_size, group)
    out_h, lse_h = dilated_attention_forward(qh, kh, vh, segment_lengths, dilation_rates, mode, is_causal, scale,
                                             head_start=rank * (h // world_size), total_heads=h,
                                             key_padding_mask=whole_mask)
    (out,), (lse,) = heads_to_seq((out_h,), world_size, group), heads_to_seq((lse_h,), world_size, group)
    return out, lse, qh, kh, vh, out_h, lse_h


def ulysses_backward(
    grad_out: torch.Tensor, q_heads: torch.Tensor, k_heads: torch.Tensor, v_heads: torch.Tensor,
    out_heads: torch.Tensor, lse_heads: torch.Tensor, segment_lengths: Sequence[int], dilation_rates: Sequence[int],
    mode: str, is_causal: bool, scale: Optional[float], group, world_size: int, rank: int,
    key_padding_mask: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv)`` of this rank's shard (``(b, s, h, d)``, k and v ``(b, s, h_kv, d)``),
    from the forward's head shards and the output's gradient ``(b, s, h, d)``."""
    h = grad_out.shape[2]
    (grad_heads,) = seq_to_heads((grad_out,), world_size, group)
    grads = dilated_attention_backward(grad_heads, q_heads, k_heads, v_heads, out_heads, lse_heads,
                                       segment_lengths, dilation_rates, mode, is_causal, scale,
                                       head_start=rank * (h // world_size), total_heads=h,
                                       key_padding_mask=gather_mask(key_padding_mask, world_size, group))
    return tuple(heads_to_seq(grads, world_size, group))


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
    mode: every head): its launches (:func:`segments.plan`) batched into one attention call.
    ``pairs``: the distinct (KV head, offset) the branch's heads read, the rows a rank sends
    (one per head without grouped-query attention); ``pair_of_head``: each head's pair."""

    seg_len: int
    rate: int
    head_start: int
    num_heads: int
    offset: Optional[int]
    span: int
    pairs: Tuple[Tuple[int, int], ...] = ()
    pair_of_head: Tuple[int, ...] = ()


def _with_pairs(x: _Branch, group_size: int) -> _Branch:
    """``x`` with its (KV head, offset) pairs, for ``group_size`` query heads per KV head."""
    heads = range(x.head_start, x.head_start + x.num_heads)
    wanted = [(j // group_size, j % x.rate if x.offset is None else x.offset) for j in heads]
    pairs = tuple(sorted(set(wanted)))
    return x._replace(pairs=pairs, pair_of_head=tuple(pairs.index(p) for p in wanted))


@functools.lru_cache(maxsize=256)
def _spanning(h: int, shard_len: int, world_size: int, segment_lengths: Tuple[int, ...],
              dilation_rates: Tuple[int, ...], mode: str, heads_kv: int = 0) -> Tuple[_Branch, ...]:
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
    return tuple(sorted((_with_pairs(x, h // (heads_kv or h)) for x in branches.values()), key=lambda x: x.span))


def _branches(shape, world_size: int, segment_lengths, dilation_rates, mode, heads_kv: int = 0
              ) -> Tuple[_Branch, ...]:
    # int(h), int(s): cached by value (a symbolic size, e.g. under a fake kernel's dynamic
    # shapes, is specialized here)
    return _spanning(int(shape[2]), int(shape[1]), world_size, tuple(segment_lengths), tuple(dilation_rates), mode,
                     int(heads_kv))


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


def _branch_numel(x: _Branch, b: int, s: int, d: int, masked: bool) -> int:
    """Elements of one rank's packed rows of branch ``x``: K and V rows ``(b, pairs, s / r, d)``
    and, with a key padding mask, the mask's values at those rows ``(b, pairs, s / r)``."""
    return (2 * d + masked) * b * len(x.pairs) * (s // x.rate)


def _span_runs(branches, b: int, s: int, d: int, masked: bool = False):
    """``(span, first column, columns)`` of each run of branches with one span in a packed
    buffer (:func:`_pack`; the branches are ordered by span)."""
    runs, at = [], 0
    for x in branches:
        size = _branch_numel(x, b, s, d, masked)
        if runs and runs[-1][0] == x.span:
            runs[-1][2] += size
        else:
            runs.append([x.span, at, size])
        at += size
    return runs


class _Rows(NamedTuple):
    """Index tensors of a branch in a shard ``(b, s, h, ...)``: ``x[:, q_rows, q_heads]`` is the
    branch's dilated rows of each query head ``(b, H, s / r, ...)`` (the shard starts on a
    multiple of the rate, so each head's offset is its launch's), ``x[:, kv_rows, kv_heads]``
    those of each (KV head, offset) pair ``(b, pairs, s / r, ...)``; ``pair_of_head`` ``(H,)``:
    each query head's pair, None where they are the same rows (no grouped-query attention)."""

    q_rows: torch.Tensor
    q_heads: torch.Tensor
    kv_rows: torch.Tensor
    kv_heads: torch.Tensor
    pair_of_head: Optional[torch.Tensor]


def _index(branch: _Branch, shard_len: int, device) -> _Rows:
    steps = branch.rate * torch.arange(shard_len // branch.rate, device=device)
    heads = torch.arange(branch.head_start, branch.head_start + branch.num_heads, device=device)
    offsets = heads % branch.rate if branch.offset is None else torch.full_like(heads, branch.offset)
    kv_heads, kv_offsets = (torch.tensor(t, dtype=torch.long, device=device) for t in zip(*branch.pairs))
    same = len(branch.pairs) == branch.num_heads and all(j == i for i, j in enumerate(branch.pair_of_head))
    return _Rows(offsets[:, None] + steps, heads[:, None], kv_offsets[:, None] + steps, kv_heads[:, None],
                 None if same else torch.tensor(branch.pair_of_head, dtype=torch.long, device=device))


def spanning_numel(shape, world_size: int, segment_lengths, dilation_rates, mode, heads_kv: int = 0,
                   masked: bool = False) -> int:
    """Elements per rank of the gathered K/V rows (the forward's third output, per rank)."""
    b, s, h, d = shape
    return sum(_branch_numel(x, b, s, d, masked)
               for x in _branches(shape, world_size, segment_lengths, dilation_rates, mode, heads_kv))


def _unpack(flat: torch.Tensor, branches, b: int, s: int, d: int, masked: bool = False):
    """Per branch, the (k rows, v rows) ``(b, pairs, s / r, d)`` of one rank's packed buffer,
    and with ``masked`` the mask's values there ``(b, pairs, s / r)`` (in the rows' dtype)."""
    out, at = [], 0
    for x in branches:
        shape = (b, len(x.pairs), s // x.rate, d)
        size = shape[0] * shape[1] * shape[2] * shape[3]
        parts = (flat[at:at + size].view(shape), flat[at + size:at + 2 * size].view(shape))
        at += 2 * size
        if masked:
            parts += (flat[at:at + size // d].view(shape[:3]),)
            at += size // d
        out.append(parts)
    return out


def _spanning_setup(q: torch.Tensor, k: torch.Tensor, world_size: int, segment_lengths, dilation_rates, mode):
    """``(branches, index, g)`` of a call on shard ``q`` (k: its heads): the spanning branches,
    their row indices (:func:`_index`), and ``G`` in groups mode (a head's output is its
    branch's / G) or 1 in longnet mode."""
    branches = _branches(q.shape, world_size, segment_lengths, dilation_rates, mode, k.shape[2])
    index = [_index(x, q.shape[1], q.device) for x in branches]
    return branches, index, (len(segment_lengths) if mode == "groups" else 1)


def _pack(k: torch.Tensor, v: torch.Tensor, index, key_padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """This shard's K/V rows of the spanning branches (and their mask values), packed flat
    (:func:`_unpack` reads them)."""
    parts = []
    for x in index:
        parts += [k[:, x.kv_rows, x.kv_heads].reshape(-1), v[:, x.kv_rows, x.kv_heads].reshape(-1)]
        if key_padding_mask is not None:
            parts.append(key_padding_mask[:, x.kv_rows].reshape(-1).to(k.dtype))
    return torch.cat(parts)


def _peer_rows(parts, peers, i: int):
    """Branch ``i``'s K and V rows (and mask values) of the ranks ``peers`` (in rank order) from
    the unpacked per-rank buffers ``parts``: ``(b, pairs, len(peers) * s / r, ...)`` each."""
    return tuple(torch.cat([parts[p][i][j] for p in peers], 2) for j in range(len(parts[peers[0]][i])))


def _per_head(rows: _Rows, kp, vp, mp):
    """The peers' rows per query head ``(b, H, L, ...)`` from those per pair, and for a mask
    ``(b, H, L)`` the heads folded into the batch (each head its own key mask, which
    :func:`attention.forward` takes per batch entry): ``(fold, k, v, key_mask)``."""
    if rows.pair_of_head is not None:
        kp, vp = kp[:, rows.pair_of_head], vp[:, rows.pair_of_head]
        mp = None if mp is None else mp[:, rows.pair_of_head]
    if mp is None:
        return None, kp, vp, None
    b, hh = kp.shape[:2]

    def fold(t):
        return t.reshape(b * hh, 1, *t.shape[2:])

    return fold, fold(kp), fold(vp), fold(mp.bool())


def _merge_rows(out, lse, q, rows: _Rows, kp, vp, mp, g: int, scale: float) -> None:
    """Attention of the rows ``q[:, rows, heads]`` over other ranks' K/V rows ``kp``, ``vp``
    ``(b, pairs, L, d)`` (mask values ``mp`` ``(b, pairs, L)`` or None), merged into ``out`` and
    ``lse`` at those rows by log-sum-exp (SPEC section 3: one softmax over the union; ``g``: the
    number of branches in groups mode, where a head's output is its branch's / G, else 1)."""
    r, h = rows.q_rows, rows.q_heads
    fold, kp, vp, key_mask = _per_head(rows, kp, vp, mp)
    q_x = q[:, r, h]
    if fold is None:
        o_p, l_p = attention.forward(q_x, kp, vp, False, scale)
    else:
        o_p, l_p = attention.forward(fold(q_x), kp, vp, False, scale, key_mask=key_mask)
        o_p, l_p = o_p.view(q_x.shape), l_p.view(q_x.shape[:3])
    lse_x = lse[:, r, h]
    l_p = l_p.to(lse.dtype)
    l_new = torch.logaddexp(lse_x, l_p)
    # a row that sees no key on either side (key padding) keeps output 0 and lse -inf, no NaN
    base = torch.where(torch.isneginf(l_new), 0.0, l_new)
    merged = (out[:, r, h].to(lse.dtype) * (g * torch.exp(lse_x - base)).unsqueeze(-1)
              + o_p.to(lse.dtype) * torch.exp(l_p - base).unsqueeze(-1))
    out[:, r, h] = (merged / g).to(out.dtype)
    lse[:, r, h] = l_new


def _rows_backward(grad_out, q, out, lse, dq, rows: _Rows, kp, vp, mp, g: int, scale: float):
    """The backward of :func:`_merge_rows`'s attention given the merged ``out`` and ``lse``:
    adds the rows' dq into ``dq``, returns the K/V rows' gradients per pair ``(b, pairs, L, d)``
    in ``lse``'s dtype."""
    r, h = rows.q_rows, rows.q_heads
    pairs = kp.shape[1]
    fold, kh, vh, key_mask = _per_head(rows, kp, vp, mp)
    o_in = out[:, r, h] * g  # groups: the branch's own output (SPEC section 3)
    q_x, go_x, lse_x = q[:, r, h], grad_out[:, r, h], lse[:, r, h]
    if fold is None:
        gq, gk, gv = attention.backward(go_x, q_x, kh, vh, o_in, lse_x, False, scale)
    else:
        gq, gk, gv = attention.backward(fold(go_x), fold(q_x), kh, vh, fold(o_in), fold(lse_x), False, scale,
                                        key_mask=key_mask)
        gq = gq.view(q_x.shape)
        gk, gv = gk.view(q_x.shape[0], -1, *gk.shape[2:]), gv.view(q_x.shape[0], -1, *gv.shape[2:])
    dq[:, r, h] += (gq / g).to(dq.dtype)
    gk, gv = (gk / g).to(lse.dtype), (gv / g).to(lse.dtype)
    if rows.pair_of_head is not None:  # the query heads of one pair: their gradients summed
        gk = gk.new_zeros(gk.shape[0], pairs, *gk.shape[2:]).index_add_(1, rows.pair_of_head, gk)
        gv = gv.new_zeros(gv.shape[0], pairs, *gv.shape[2:]).index_add_(1, rows.pair_of_head, gv)
    return gk, gv


def longnet_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segment_lengths: Sequence[int], dilation_rates: Sequence[int],
    mode: str, is_causal: bool, scale: Optional[float], group, world_size: int, rank: int,
    key_padding_mask: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(out, lse, gathered)``: this rank's slice of the output and log-sum-exp ``(b, s, h)``,
    and the gathered K/V rows ``(P, numel)`` (:func:`spanning_numel`) the backward takes. k, v
    may have fewer heads (grouped-query attention: each (KV head, offset) pair's rows travel
    once); ``key_padding_mask`` ``(b, s)``: this rank's shard, its values travel with the rows."""
    b, s, h, d = q.shape
    scale = attention.default_scale(d, scale)
    masked = key_padding_mask is not None
    out, lse = dilated_attention_forward(q, k, v, segment_lengths, dilation_rates, mode, is_causal, scale,
                                         key_padding_mask=key_padding_mask)
    branches, index, g = _spanning_setup(q, k, world_size, segment_lengths, dilation_rates, mode)
    if not branches:
        return out, lse, q.new_empty(world_size, 0)
    send = _pack(k, v, index, key_padding_mask)
    # row p: rank p's rows, filled for the ranks of this rank's segments (the others are not read)
    gathered = send.new_zeros(world_size, send.numel())
    for span, at, size in _span_runs(branches, b, s, d, masked):
        members = _members(span, rank, world_size)
        received = send.new_empty(len(members) * size)
        _ALL_GATHER(received, send[at:at + size], group=_segment_group(group, span, rank, world_size))
        gathered[members.start:members.stop, at:at + size] = received.view(len(members), size)
    parts = [_unpack(gathered[p], branches, b, s, d, masked) for p in range(world_size)]
    for i, (x, rows) in enumerate(zip(branches, index)):
        peers = _peers(x, rank, s, world_size, is_causal)
        if not peers:
            continue
        kp, vp, *mp = _peer_rows(parts, peers, i)
        _merge_rows(out, lse, q, rows, kp, vp, mp[0] if mp else None, g, scale)
    return out, lse, gathered


def _add_home(dk: torch.Tensor, dv: torch.Tensor, index, grads) -> None:
    """Adds the K/V rows' gradients per pair (:func:`_unpack`'s parts) into the shard's."""
    for rows, (gk, gv, *_) in zip(index, grads):
        dk[:, rows.kv_rows, rows.kv_heads] += gk.to(dk.dtype)  # pairs are distinct: no index repeats
        dv[:, rows.kv_rows, rows.kv_heads] += gv.to(dv.dtype)


def longnet_backward(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    gathered: torch.Tensor, segment_lengths: Sequence[int], dilation_rates: Sequence[int], mode: str,
    is_causal: bool, scale: Optional[float], group, world_size: int, rank: int,
    key_padding_mask: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv)`` of this rank's shard (as q, k, v), from the forward's merged ``out``,
    ``lse`` and ``gathered`` rows."""
    b, s, h, d = q.shape
    scale = attention.default_scale(d, scale)
    masked = key_padding_mask is not None
    dq, dk, dv = dilated_attention_backward(grad_out, q, k, v, out, lse, segment_lengths, dilation_rates, mode,
                                            is_causal, scale, key_padding_mask=key_padding_mask)
    branches, index, g = _spanning_setup(q, k, world_size, segment_lengths, dilation_rates, mode)
    if not branches:
        return dq, dk, dv
    parts = [_unpack(gathered[p], branches, b, s, d, masked) for p in range(world_size)]
    # every rank's K/V rows' gradients from this rank's queries, summed over ranks in float32
    # (laid out as the gathered rows; a mask's slots stay 0)
    home = torch.zeros(gathered.shape, dtype=lse.dtype, device=q.device)
    home_parts = [_unpack(home[p], branches, b, s, d, masked) for p in range(world_size)]
    for i, (x, rows) in enumerate(zip(branches, index)):
        peers = _peers(x, rank, s, world_size, is_causal)
        if not peers:
            continue
        kp, vp, *mp = _peer_rows(parts, peers, i)
        gk, gv = _rows_backward(grad_out, q, out, lse, dq, rows, kp, vp, mp[0] if mp else None, g, scale)
        n_rows = s // x.rate
        for j, p in enumerate(peers):
            home_parts[p][i][0].copy_(gk[:, :, j * n_rows:(j + 1) * n_rows])
            home_parts[p][i][1].copy_(gv[:, :, j * n_rows:(j + 1) * n_rows])
    mine = home.new_empty(home.shape[1])
    for span, at, size in _span_runs(branches, b, s, d, masked):
        members = _members(span, rank, world_size)
        _REDUCE_SCATTER(mine[at:at + size], home[members.start:members.stop, at:at + size].contiguous().view(-1),
                        group=_segment_group(group, span, rank, world_size))
    _add_home(dk, dv, index, _unpack(mine, branches, b, s, d, masked))
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
    chunk; the spanning branches of that geometry with their row indices inside a chunk;
    ``masked``: the rows carry a key padding mask's values."""

    mine: Tuple[int, ...]
    c: int
    chunks: int
    branches: Tuple[_Branch, ...]
    index: list
    g: int
    masked: bool = False

    def views(self, x: torch.Tensor) -> List[torch.Tensor]:
        """This rank's chunks of a shard-shaped tensor ``(b, s, ...)``, as views."""
        return [x[:, j * self.c:(j + 1) * self.c] for j in range(len(self.mine))]

    def pack(self, k: torch.Tensor, v: torch.Tensor, key_padding_mask: Optional[torch.Tensor] = None
             ) -> torch.Tensor:
        masks = self.views(key_padding_mask) if key_padding_mask is not None else [None] * len(self.mine)
        return torch.cat([_pack(kc, vc, self.index, mc) for kc, vc, mc in zip(self.views(k), self.views(v), masks)])

    def unpack(self, flat: torch.Tensor, owner: int, world_size: int, layout: str, b: int, d: int):
        """``{chunk: per-branch (k rows, v rows[, mask values])}`` of a buffer packed by rank
        ``owner``."""
        size = flat.numel() // len(self.mine)
        return {p: _unpack(flat[j * size:(j + 1) * size], self.branches, b, self.c, d, self.masked)
                for j, p in enumerate(pieces(owner, world_size, layout))}

    def peers(self, i: int, chunk: int, is_causal: bool, held) -> List[int]:
        """The chunks among ``held`` whose rows chunk ``chunk``'s queries of branch ``i`` read."""
        return [p for p in _peers(self.branches[i], chunk, self.c, self.chunks, is_causal) if p in held]


def _ring_setup(q: torch.Tensor, world_size: int, rank: int, segment_lengths, dilation_rates, mode,
                layout: str, heads_kv: int = 0, masked: bool = False) -> _Ring:
    b, s, h, d = q.shape
    mine = pieces(rank, world_size, layout)
    c = s // len(mine)
    branches = _branches((b, c, h, d), chunks(world_size, layout), segment_lengths, dilation_rates, mode, heads_kv)
    return _Ring(mine, c, chunks(world_size, layout), branches, [_index(x, c, q.device) for x in branches],
                 len(segment_lengths) if mode == "groups" else 1, masked)


def _by_chunk(x: Optional[torch.Tensor], m: int) -> Optional[torch.Tensor]:
    """A shard ``(b, s, ...)`` of ``m`` chunks as ``(b * m, s / m, ...)``: the chunks as batch
    entries, for the single-device op (each chunk's own segments)."""
    return None if x is None else x.reshape(x.shape[0] * m, x.shape[1] // m, *x.shape[2:])


def _by_shard(x: torch.Tensor, m: int) -> torch.Tensor:
    return x.reshape(x.shape[0] // m, x.shape[1] * m, *x.shape[2:])


def ring_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segment_lengths: Sequence[int], dilation_rates: Sequence[int],
    mode: str, is_causal: bool, scale: Optional[float], group, world_size: int, rank: int,
    layout: str = "contiguous", key_padding_mask: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)`` of this rank's shard by the ring: the single-device op on each of the
    shard's chunks (:func:`pieces`), then the packed dilated K/V rows of the spanning segments
    travel the ring, one rank's per step (the next step's transfer posted before this step's
    attention), and each chunk merges in the rows of its segments' other chunks as they pass
    (step 0: the rank's own other chunk, zigzag). Only two ranks' rows are held at a time.
    Grouped-query attention and ``key_padding_mask`` (this rank's shard, its values travelling
    with the rows) as :func:`longnet_forward`."""
    b, s, h, d = q.shape
    scale = attention.default_scale(d, scale)
    ring = _ring_setup(q, world_size, rank, segment_lengths, dilation_rates, mode, layout, k.shape[2],
                       key_padding_mask is not None)
    m = len(ring.mine)
    out, lse = dilated_attention_forward(_by_chunk(q, m), _by_chunk(k, m), _by_chunk(v, m), segment_lengths,
                                         dilation_rates, mode, is_causal, scale,
                                         key_padding_mask=_by_chunk(key_padding_mask, m))
    out, lse = _by_shard(out, m), _by_shard(lse, m)
    if not ring.branches:
        return out, lse
    qs, outs, lses = ring.views(q), ring.views(out), ring.views(lse)
    rows_kv = ring.pack(k, v, key_padding_mask)
    for step in range(world_size):
        owner = (rank - step) % world_size  # whose rows rows_kv holds
        transfer = _pass([rows_kv], group, rank, world_size) if step < world_size - 1 else None
        parts = ring.unpack(rows_kv, owner, world_size, layout, b, d)
        for j, chunk in enumerate(ring.mine):
            for i, rows in enumerate(ring.index):
                peers = ring.peers(i, chunk, is_causal, parts)
                if peers:
                    kp, vp, *mp = _peer_rows(parts, peers, i)
                    _merge_rows(outs[j], lses[j], qs[j], rows, kp, vp, mp[0] if mp else None, ring.g, scale)
        if transfer is not None:
            _wait(transfer[0])
            (rows_kv,) = transfer[1]
    return out, lse


def ring_backward(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    segment_lengths: Sequence[int], dilation_rates: Sequence[int], mode: str, is_causal: bool,
    scale: Optional[float], group, world_size: int, rank: int, layout: str = "contiguous",
    key_padding_mask: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv)`` of this rank's shard: the single-device backward on each chunk with the
    merged ``out`` and ``lse``, then the K/V rows travel the ring again with a float32
    accumulator of their gradients, which each rank adds its queries' share to; after ``P``
    passes the accumulator is home."""
    b, s, h, d = q.shape
    scale = attention.default_scale(d, scale)
    ring = _ring_setup(q, world_size, rank, segment_lengths, dilation_rates, mode, layout, k.shape[2],
                       key_padding_mask is not None)
    m = len(ring.mine)
    grads = dilated_attention_backward(*(_by_chunk(t, m) for t in (grad_out, q, k, v, out, lse)), segment_lengths,
                                       dilation_rates, mode, is_causal, scale,
                                       key_padding_mask=_by_chunk(key_padding_mask, m))
    dq, dk, dv = (_by_shard(t, m) for t in grads)
    if not ring.branches:
        return dq, dk, dv
    qs, outs, lses, gos, dqs = (ring.views(t) for t in (q, out, lse, grad_out, dq))
    rows_kv = ring.pack(k, v, key_padding_mask)
    grads = torch.zeros(rows_kv.shape, dtype=lse.dtype, device=q.device)  # of the rows in rows_kv (mask slots: 0)
    for step in range(world_size):
        owner = (rank - step) % world_size
        transfer = _pass([rows_kv], group, rank, world_size) if step < world_size - 1 else None
        parts = ring.unpack(rows_kv, owner, world_size, layout, b, d)
        grad_parts = ring.unpack(grads, owner, world_size, layout, b, d)
        for j, chunk in enumerate(ring.mine):
            for i, rows in enumerate(ring.index):
                peers = ring.peers(i, chunk, is_causal, parts)
                if not peers:
                    continue
                kp, vp, *mp = _peer_rows(parts, peers, i)
                gk, gv = _rows_backward(gos[j], qs[j], outs[j], lses[j], dqs[j], rows, kp, vp, mp[0] if mp else None,
                                        ring.g, scale)
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
        _add_home(ring.views(dk)[j], ring.views(dv)[j], ring.index, home[chunk])
    return dq, dk, dv
