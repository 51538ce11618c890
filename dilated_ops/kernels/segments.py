"""Index math shared by every kernel: which heads use which (segment, dilation, offset),
and the zero-copy strided views that make each dilated segment a plain attention batch.

Layout everywhere: ``(batch, seq, heads, *tail)`` with ``tail = (head_dim,)`` for q/k/v/out
and ``tail = ()`` for the per-position log-sum-exp.
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch

MODES = ("groups", "longnet")


@dataclass(frozen=True)
class BranchCall:
    """One attention launch: branch ``branch`` = ``(seg_len, rate)`` at ``offset`` on the heads
    ``heads`` (a slice, contiguous in groups mode, ``offset::rate`` in longnet mode)."""

    branch: int
    seg_len: int
    rate: int
    offset: int
    heads: slice


def head_groups(num_heads: int, num_groups: int) -> List[Tuple[int, int]]:
    """Contiguous head ranges ``[start, stop)`` of SPEC section 3: sizes ``h // G``, the first
    ``h % G`` groups one head larger."""
    base, extra = divmod(num_heads, num_groups)
    ranges, start = [], 0
    for i in range(num_groups):
        stop = start + base + (1 if i < extra else 0)
        ranges.append((start, stop))
        start = stop
    return ranges


@functools.lru_cache(maxsize=256)
def plan(
    num_heads: int, segment_lengths: Tuple[int, ...], dilation_rates: Tuple[int, ...], mode: str,
    head_start: int = 0, total_heads: int = 0,
) -> Tuple[BranchCall, ...]:
    """The attention launches that compute dilated attention (SPEC sections 2-3).

    groups: one launch per branch, on that branch's head group, offset ``i % r_i``.
    longnet: every head in every branch; head ``j`` uses offset ``j % r_i``, so the heads of one
    offset class form the strided slice ``offset::r_i``: one launch per (branch, offset class).

    A head window: the ``num_heads`` heads are heads ``[head_start, head_start + num_heads)`` of
    a ``total_heads``-head call (0: the window is every head), as one rank holds them when heads
    are sharded over ranks; the launches are those of the whole call restricted to the window, in
    the window's own head numbering (a branch the window misses has none).
    Plain Python data, cached: nothing here is a tensor.
    """
    total = total_heads or num_heads
    stop_all = head_start + num_heads
    calls = []
    if mode == "groups":
        for i, ((start, stop), w, r) in enumerate(
            zip(head_groups(total, len(segment_lengths)), segment_lengths, dilation_rates)
        ):
            lo, hi = max(start, head_start), min(stop, stop_all)
            if lo < hi:
                calls.append(BranchCall(i, w, r, i % r, slice(lo - head_start, hi - head_start, 1)))
    else:
        for i, (w, r) in enumerate(zip(segment_lengths, dilation_rates)):
            for o in range(min(r, total)):
                first = (o - head_start) % r  # the window's first head j with j % r == o
                if first < num_heads:
                    calls.append(BranchCall(i, w, r, o, slice(first, num_heads, r)))
    return tuple(calls)


def _geometry(x: torch.Tensor, call: BranchCall):
    """Of ``x`` ``(batch, seq, heads, *tail)`` and ``call``: batch, the batch / seq strides, the
    stride between selected heads, their count, the tail's sizes and strides, the storage offset
    of the first selected element, the number of full segments and the trailing remainder."""
    b, n, h = x.shape[:3]
    sb, sn, sh = x.stride()[:3]
    h0, h1, hstep = call.heads.indices(h)
    full = n // call.seg_len
    return (b, sb, sn, hstep * sh, len(range(h0, h1, hstep)), tuple(x.shape[3:]), tuple(x.stride()[3:]),
            x.storage_offset() + call.offset * sn + h0 * sh, full, n - full * call.seg_len)


def segment_views(x: torch.Tensor, call: BranchCall) -> List[torch.Tensor]:
    """Strided views of ``x`` ``(batch, seq, heads, *tail)`` holding the positions and heads
    that ``call`` selects, each ``(batch, segments, selected_len, call_heads, *tail)``.

    At most two pieces: the full segments, and the trailing partial segment (which is the whole
    sequence when ``seg_len > seq``). All are views: writing into a view of an output buffer
    writes the output in place. One ``as_strided`` per piece: the equivalent chain of slices
    and unflattens cost about 25 ATen calls per forward launch, most of the op's host time at
    short sequences.
    """
    b, sb, sn, sh, nh, tail, st, base, full, rem = _geometry(x, call)
    w, r, o = call.seg_len, call.rate, call.offset
    pieces = []
    if full > 0:
        size = (b, full, len(range(o, w, r)), nh) + tail
        pieces.append(x.as_strided(size, (sb, w * sn, r * sn, sh) + st, base))
    if rem > o:
        size = (b, 1, len(range(o, rem, r)), nh) + tail
        pieces.append(x.as_strided(size, (sb, w * sn, r * sn, sh) + st, base + full * w * sn))
    return pieces


def bhld_views(x: torch.Tensor, call: BranchCall) -> Optional[List[torch.Tensor]]:
    """The pieces of :func:`segment_views` already in the layout SDPA takes, ``(batch*segments,
    heads, len, *tail)``: what :func:`to_bhld` makes of them, one ``as_strided`` each instead of
    three or four calls (the backward runs nine tensors through this per branch). None when some
    piece's batch and segment dims do not merge into one stride (batch > 1 with a partial
    trailing segment), where :func:`to_bhld` would copy."""
    b, sb, sn, sh, nh, tail, st, base, full, rem = _geometry(x, call)
    w, r, o = call.seg_len, call.rate, call.offset
    views = []
    if full > 0:
        if b > 1 and sb != full * w * sn:
            return None
        size = (b * full, nh, len(range(o, w, r))) + tail
        views.append(x.as_strided(size, (w * sn, sh, r * sn) + st, base))
    if rem > o:
        size = (b, nh, len(range(o, rem, r))) + tail
        views.append(x.as_strided(size, (sb, sh, r * sn) + st, base + full * w * sn))
    return views


def to_bhld(piece: torch.Tensor) -> torch.Tensor:
    """``(batch, segments, len, heads, *tail)`` -> ``(batch*segments, heads, len, *tail)``, the
    layout SDPA takes. A view except when segments of several batch rows cannot be merged
    (batch > 1 and a partial trailing segment), where ``flatten`` copies."""
    return piece.flatten(0, 1).transpose(1, 2)


def from_bhld(t: torch.Tensor, piece: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`to_bhld`: a ``(batch*segments, heads, len, *tail)`` result viewed with
    the shape of ``piece``, ready to be written into it."""
    return t.transpose(1, 2).unflatten(0, piece.shape[:2])


@functools.lru_cache(maxsize=256)
def gqa_plan(
    num_heads: int, num_kv_heads: int, segment_lengths: Tuple[int, ...], dilation_rates: Tuple[int, ...], mode: str,
    head_start: int = 0, total_heads: int = 0,
) -> Tuple[Tuple[BranchCall, BranchCall], ...]:
    """:func:`plan`'s launches for grouped-query attention (SPEC section 8: query head ``j`` reads
    KV head ``j // (num_heads // num_kv_heads)``), each as ``(query call, KV call)``: the query
    heads and the KV heads they read, such that the ``u``-th query head of the launch reads the
    ``u // m``-th KV head of it (``m`` query heads per KV head: what attention kernels with
    native GQA take). A launch whose heads do not map so (a head group or an offset class that
    cuts a KV head's query heads unevenly) is split into launches that do; no K/V is copied.
    Without GQA each launch is its own KV call. (A head window starts on a KV head: the checks
    make ``head_start`` a multiple of the ratio, so window-local heads map alike.)"""
    calls = plan(num_heads, segment_lengths, dilation_rates, mode, head_start, total_heads)
    if num_kv_heads == num_heads:
        return tuple((c, c) for c in calls)
    ratio = num_heads // num_kv_heads
    out = []
    for c in calls:
        heads = list(range(*c.heads.indices(num_heads)))
        step = c.heads.step or 1
        runs = []  # [kv head, query heads reading it], in order
        for j in heads:
            if runs and runs[-1][0] == j // ratio:
                runs[-1][1].append(j)
            else:
                runs.append([j // ratio, [j]])
        block = [runs[0]]
        for run in runs[1:] + [None]:
            uniform = (run is not None and len(run[1]) == len(block[0][1])
                       and (len(block) == 1 or run[0] - block[-1][0] == block[1][0] - block[0][0]))
            if uniform:
                block.append(run)
                continue
            kv_step = block[1][0] - block[0][0] if len(block) > 1 else 1
            qs, kvs = [j for _, js in block for j in js], [kv for kv, _ in block]
            out.append((dataclasses.replace(c, heads=slice(qs[0], qs[-1] + 1, step)),
                        dataclasses.replace(c, heads=slice(kvs[0], kvs[-1] + 1, kv_step))))
            block = [run]
    return tuple(out)
