"""Block-sparse attention (SPEC section 4): layouts of the named patterns, and attention over
the active blocks only.

Tensors are ``(batch, seq, heads, head_dim)``. A layout is a bool tensor ``(heads or 1, nb, nb)``
with ``nb = ceil(seq / block_size)``: ``layout[h, i, j]`` says query block ``i`` of head ``h``
reads key block ``j`` (a first dim of 1 is shared by every head). The softmax of a query runs
over the union of its active key blocks, masked inside the blocks for the sequence's end (a
partial last block) and, when causal, for keys after the query. A query with no visible key gets
0 and a log-sum-exp of ``-inf``.

Compute: on CUDA in float16/bfloat16, the Triton kernels of :mod:`.triton_block_sparse`.
Elsewhere, per query block, its active key blocks are gathered (padded to the largest count of
any query block of the layout) and attended in one batch: on the CPU by PyTorch's CPU flash
kernel with an additive mask, on CUDA by an explicit softmax. Memory and work are proportional to
the layout's active blocks, never ``seq x seq``. The backward takes the forward's output and
log-sum-exp; the gather's gradient is the scatter-add into the key blocks.
"""
from __future__ import annotations

import math
import os
import threading
from typing import Dict, Optional, Sequence, Tuple

import torch

PATTERNS = ("local_window", "global_local", "dilated_sparse")
# DILATED_OPS_TRITON=0 keeps CUDA calls on the gather path (as it turns off the dilated forward).
ENABLED = os.environ.get("DILATED_OPS_TRITON", "1") != "0"


def num_blocks(seq_len: int, block_size: int) -> int:
    return -(-seq_len // block_size)


def _band(nb: int, half: int, device) -> torch.Tensor:
    i = torch.arange(nb, device=device)
    return (i[:, None] - i[None, :]).abs() <= half


def _half_width(nb: int, block_size: int, local_window_size: Optional[int], sparsity_ratio: float) -> int:
    """Blocks on each side of the diagonal: from ``local_window_size`` (SPEC section 4), or, when
    it is None, the widest band whose density stays within ``sparsity_ratio``."""
    if local_window_size is not None:
        return (local_window_size // block_size) // 2
    width = max(1, math.floor(sparsity_ratio * nb))  # blocks per row, diagonal included
    return (width - 1) // 2


def _dilated_blocks(nb: int, heads: int, block_size: int, segment_lengths: Sequence[int],
                    dilation_rates: Sequence[int], device) -> torch.Tensor:
    """Section 2's pattern at block granularity, every branch for every head (head ``h`` at
    offset ``h % r`` in branch ``(w, r)``), the union over branches: ``(heads, nb, nb)``."""
    i = torch.arange(nb, device=device)
    h = torch.arange(heads, device=device)
    layout = torch.zeros(heads, nb, nb, dtype=torch.bool, device=device)
    for w, r in zip(segment_lengths, dilation_rates):
        seg = max(1, w // block_size)                # segment length in blocks
        same = (i[:, None] // seg) == (i[None, :] // seg)
        pos = i % seg                                 # block's position inside its segment
        sel = (pos[None, :] % r) == (h[:, None] % r)  # (heads, nb): block selected for the head
        layout |= same[None] & sel[:, :, None] & sel[:, None, :]
    return layout


def pattern_layout(pattern: str, seq_len: int, heads: int, block_size: int, local_window_size: Optional[int],
                   global_tokens: int, sparsity_ratio: float, segment_lengths: Tuple[int, ...],
                   dilation_rates: Tuple[int, ...], is_causal: bool, device: torch.device) -> torch.Tensor:
    """The layout of a named pattern: ``(1, nb, nb)`` for patterns every head shares,
    ``(heads, nb, nb)`` for ``dilated_sparse``. Causal: key blocks after the query block are
    dropped (inside the diagonal block the attention itself masks)."""
    nb = num_blocks(seq_len, block_size)
    if pattern == "dilated_sparse":
        layout = _dilated_blocks(nb, heads, block_size, segment_lengths, dilation_rates, device)
    else:
        layout = _band(nb, _half_width(nb, block_size, local_window_size, sparsity_ratio), device)[None]
        if pattern == "global_local":
            g = min(nb, global_tokens // block_size)
            layout[:, :g, :] = True
            layout[:, :, :g] = True
    if is_causal:
        layout = causal_blocks(layout)
    return layout


def causal_blocks(layout: torch.Tensor) -> torch.Tensor:
    """``layout`` without the key blocks after each query block."""
    i = torch.arange(layout.shape[-1], device=layout.device)
    # A comparison, not tril(): tril cost milliseconds per call on some CPU builds.
    return layout & (i[None, :] <= i[:, None])


class Plan:
    """A layout ``(H or 1, nb, nb)`` as the kernels walk it: per (layout head, query block) the
    active key blocks' indices padded to the largest count (``index``, ``(H or 1, nb, kmax)``),
    which entries are real (``valid``), the counts (``counts``, int32) and the indices as int32
    (``index32``); :meth:`transposed`, the same for the key blocks (which query blocks read
    each), built on first use. Built with one host read of the largest count."""

    def __init__(self, layout: torch.Tensor):
        self.layout = layout.contiguous()  # the sort's indices follow the layout's strides
        self.num_blocks = layout.shape[-1]
        self.index, self.valid, self.counts = _walk(self.layout)
        self.index32 = self.index.to(torch.int32).contiguous()
        self._transposed = None

    def transposed(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(index32, counts)`` of the transposed layout."""
        if self._transposed is None:
            index, _, counts = _walk(self.layout.transpose(-1, -2).contiguous())
            self._transposed = (index.to(torch.int32).contiguous(), counts)
        return self._transposed

    def tensors(self):
        return [self.layout, self.index, self.valid, self.counts, self.index32, *(self._transposed or ())]


def _walk(layout: torch.Tensor):
    counts = layout.sum(-1)
    kmax = max(int(counts.max()), 1) if layout.numel() else 1
    # Stable sort puts the active blocks first, in block order.
    order = torch.sort(layout.to(torch.int8), dim=-1, descending=True, stable=True).indices[..., :kmax]
    valid = torch.arange(kmax, device=layout.device) < counts[..., None]
    return order, valid, counts.to(torch.int32).contiguous()


# The library's own pattern cache (reported by get_memory_pool_info, emptied by
# clear_memory_pool): a named pattern's plan, built once per (arguments, length, device); the
# oldest entry goes past _MAX_LAYOUTS.
_MAX_LAYOUTS = 64
_LAYOUTS: Dict[tuple, Plan] = {}
_LOCK = threading.Lock()


def cached_plan(*key) -> Plan:
    """The :class:`Plan` of :func:`pattern_layout`'s arguments ``key``."""
    plan = _LAYOUTS.get(key)
    if plan is None:
        plan = Plan(pattern_layout(*key))
        with _LOCK:
            if len(_LAYOUTS) >= _MAX_LAYOUTS:
                _LAYOUTS.pop(next(iter(_LAYOUTS)))
            _LAYOUTS[key] = plan
    return plan


def cache_entries() -> int:
    return len(_LAYOUTS)


def cache_bytes() -> int:
    with _LOCK:
        return sum(t.numel() * t.element_size() for plan in _LAYOUTS.values() for t in plan.tensors())


def cache_clear() -> None:
    with _LOCK:
        _LAYOUTS.clear()


class _Blocks:
    """q's blocks, the active key blocks gathered per query block, and what each score may see,
    for one call: q, k, v ``(B, N, H, D)``; ``index``/``valid`` of a :class:`Plan`."""

    def __init__(self, q, k, v, index, valid, block_size: int, is_causal: bool, key_mask=None):
        b, n, h, d = q.shape
        nb = num_blocks(n, block_size)
        self.shape, self.nb, self.bs = (b, n, h, d), nb, block_size
        self.index = index.expand(h, *index.shape[1:])
        kmax = self.index.shape[-1]
        self.flat = self.index.reshape(h, nb * kmax)
        self.heads = torch.arange(h, device=q.device)[:, None]
        self.group = h // k.shape[2]  # grouped-query attention: query head j reads KV head j // group
        self.qb, kb, vb = (self.blocks(t) for t in (q, k, v))
        self.kg, self.vg = (self.gather(t) for t in (kb, vb))  # (B, H, nb, kmax*bs, D)
        qpos = torch.arange(nb * block_size, device=q.device).view(nb, block_size)
        kpos = (self.index[..., None] * block_size + torch.arange(block_size, device=q.device)).view(h, nb, -1)
        real = valid.expand(h, *valid.shape[1:])[..., None].expand(h, nb, kmax, block_size).reshape(h, nb, -1)
        keep = (real & (kpos < n))[None, :, :, None, :]  # (1, H, nb, 1 or bs, kmax*bs)
        if is_causal:
            keep = keep & (kpos[:, :, None, :] <= qpos[None, :, :, None])
        if key_mask is not None:  # (B, N) True = keep, gathered as the keys are: (B, H, nb, 1, kmax*bs)
            blocked = self.blocks(key_mask.to(torch.uint8)[:, :, None, None])[:, 0, :, :, 0].bool()  # (B, nb, bs)
            keep = keep & blocked[:, self.flat].reshape(b, h, nb, 1, -1)
        self.keep = keep

    def blocks(self, t):  # (B, N, H, D) -> (B, H, nb, bs, D), zero-padded to whole blocks (any H)
        b, n = self.shape[:2]
        pad = self.nb * self.bs - n
        t = torch.nn.functional.pad(t, (0, 0, 0, 0, 0, pad)) if pad else t
        return t.reshape(b, self.nb, self.bs, t.shape[2], t.shape[-1]).permute(0, 3, 1, 2, 4)

    def unblocks(self, t):  # (B, H, nb, bs, *tail) -> (B, N, H, *tail) (any H)
        b, n = self.shape[:2]
        t = t.movedim(1, 3)  # (B, nb, bs, H, *tail)
        return t.reshape(b, self.nb * self.bs, t.shape[3], *t.shape[4:])[:, :n]

    def gather(self, t):  # (B, H_kv, nb, bs, D) -> (B, H, nb, kmax*bs, D)
        b = t.shape[0]
        h = self.heads.shape[0]
        return t[:, self.heads // self.group, self.flat].reshape(b, h, self.nb, -1, t.shape[-1])

    def scatter(self, g):  # the gather's adjoint: (B, H, nb, kmax*bs, D) -> (B, H_kv, nb, bs, D)
        b, h, nb, _, d = g.shape
        g = g.reshape(b, h, -1, self.bs * d)  # (B, H, nb*kmax, bs*D)
        out = g.new_zeros(b, h, nb, self.bs * d)
        out.scatter_add_(2, self.flat[None, :, :, None].expand(b, h, -1, self.bs * d), g)
        out = out.view(b, h, nb, self.bs, d)
        return out if self.group == 1 else out.unflatten(1, (h // self.group, self.group)).sum(2)

    def sdpa(self, t):  # (B, H, nb, rows, D) -> (B, H*nb, rows, D): SDPA's (batch, heads, seq, dim)
        return t.reshape(t.shape[0], -1, *t.shape[3:])

    def sdpa_mask(self, dtype):
        """The additive mask ``(1 or B, H*nb, 1 or bs, kmax*bs)`` of the SDPA layout (the CPU flash
        kernel takes no boolean one), and its rows that see no key ``(1 or B, H*nb, 1 or bs)``."""
        keep = self.keep.reshape(self.keep.shape[0], -1, *self.keep.shape[3:])
        return torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill_(~keep, float("-inf")), \
            ~keep.any(-1)

    def probs(self, scale: float, lse=None):
        """``(p, lse)``: the softmax weights ``(B, H, nb, bs, kmax*bs)`` (0 where masked, all 0
        for a query with no visible key) and the log-sum-exp ``(B, H, nb, bs)``."""
        s = (self.qb @ self.kg.transpose(-1, -2)) * scale
        s = s.masked_fill(~self.keep, float("-inf"))
        if lse is None:
            m = s.amax(-1, keepdim=True)
            m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
            p = torch.exp(s - m)
            denom = p.sum(-1, keepdim=True)
            return p / denom.clamp_min(torch.finfo(denom.dtype).tiny), (m + torch.log(denom)).squeeze(-1)
        lse = lse[..., None]
        return torch.exp(s - torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)), None


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # Half types accumulate in float32 (float64 stays).
    return torch.float64 if dtype == torch.float64 else torch.float32


def _triton(q, k, block_size: int, key_mask):
    """The Triton kernels' module when they apply (CUDA float16/bfloat16, block and head sizes
    they take, neither grouped-query attention nor a key mask yet), else None (CPU installs
    without Triton included)."""
    if not q.is_cuda or q.dtype not in (torch.float16, torch.bfloat16) or not ENABLED:
        return None
    if k.shape[2] != q.shape[2] or key_mask is not None:
        return None
    try:
        from . import triton_block_sparse
    except ImportError:
        return None
    return triton_block_sparse if triton_block_sparse.supported(q, block_size) else None


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def forward(q, k, v, plan: Plan, block_size: int, is_causal: bool, scale: float, key_mask=None):
    """``(out, lse)``: out ``(batch, seq, heads, head_dim)`` as q (its dtype), contiguous; lse
    ``(batch, seq, heads)`` float32 (float64 for float64 inputs). k, v may have fewer heads
    (grouped-query attention); ``key_mask`` ``(batch, seq)`` bool, True = keep."""
    triton_kernels = _triton(q, k, block_size, key_mask)
    if triton_kernels is not None:
        return triton_kernels.forward(_unit_last(q), _unit_last(k), _unit_last(v), plan, block_size, is_causal, scale)
    ct = _compute_dtype(q.dtype)
    x = _Blocks(q.to(ct), k.to(ct), v.to(ct), plan.index, plan.valid, block_size, is_causal, key_mask)
    if q.device.type == "cpu":
        return _cpu_forward(x, scale, q.dtype)
    p, lse = x.probs(scale)
    return x.unblocks(p @ x.vg).to(q.dtype).contiguous(), x.unblocks(lse).contiguous()


def backward(grad_out, q, k, v, out, lse, plan: Plan, block_size: int, is_causal: bool, scale: float,
             key_mask=None):
    """``(dq, dk, dv)``, contiguous, shaped as q, k, v, from the forward's ``out`` and ``lse``
    (the softmax weights are recomputed from them; on the gather path the gathers' adjoints are
    scatter-adds into the key blocks, summed over a KV head's query heads)."""
    triton_kernels = _triton(q, k, block_size, key_mask)
    if triton_kernels is not None:
        return triton_kernels.backward(grad_out, q, k, v, out, lse, plan, block_size, is_causal, scale)
    ct = _compute_dtype(q.dtype)
    x = _Blocks(q.to(ct), k.to(ct), v.to(ct), plan.index, plan.valid, block_size, is_causal, key_mask)
    if q.device.type == "cpu":
        return _cpu_backward(x, grad_out, out, lse, scale, (q.dtype, k.dtype, v.dtype))
    p, _ = x.probs(scale, x.blocks(lse[..., None].to(ct)).squeeze(-1))
    do = x.blocks(grad_out.to(ct))
    delta = (do * x.blocks(out.to(ct))).sum(-1, keepdim=True)  # rowsum(dO * O)
    ds = p * (do @ x.vg.transpose(-1, -2) - delta) * scale
    dq = x.unblocks(ds @ x.kg)
    dk = x.unblocks(x.scatter(ds.transpose(-1, -2) @ x.qb))
    dv = x.unblocks(x.scatter(p.transpose(-1, -2) @ do))
    return tuple(g.to(t.dtype).contiguous() for g, t in ((dq, q), (dk, k), (dv, v)))


# On the CPU the gathered blocks go through PyTorch's flash attention kernel (one fused pass per
# query block, an additive mask for the padding, the sequence's end and the causal diagonal)
# instead of the explicit softmax of the CUDA fallback: benchmarks/RESULTS.md has both.


def _cpu_forward(x: _Blocks, scale: float, dtype: torch.dtype):
    mask, empty = x.sdpa_mask(x.qb.dtype)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        x.sdpa(x.qb), x.sdpa(x.kg), x.sdpa(x.vg), 0.0, False, attn_mask=mask, scale=scale)
    # A query that sees no key: the kernel's row is not finite; the op's is 0 with lse -inf.
    out = out.masked_fill(empty[..., None], 0.0)
    lse = lse.masked_fill(empty, float("-inf"))
    b, h, nb, bs = x.qb.shape[:4]
    return (x.unblocks(out.view(b, h, nb, bs, -1)).to(dtype).contiguous(),
            x.unblocks(lse.view(b, h, nb, bs)).contiguous())


def _cpu_backward(x: _Blocks, grad_out, out, lse, scale: float, dtypes):
    ct = x.qb.dtype
    mask, _ = x.sdpa_mask(ct)
    lse = x.sdpa(x.blocks(lse[..., None]).squeeze(-1))
    # A query that sees no key has lse -inf: +inf there makes its weights exp(-inf - inf) = 0.
    lse = lse.masked_fill(torch.isneginf(lse), float("inf"))
    dq, dkg, dvg = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        x.sdpa(x.blocks(grad_out.to(ct))), x.sdpa(x.qb), x.sdpa(x.kg), x.sdpa(x.vg), x.sdpa(x.blocks(out.to(ct))),
        lse, 0.0, False, attn_mask=mask, scale=scale)
    b, h, nb, bs = x.qb.shape[:4]
    grads = (x.unblocks(dq.view(b, h, nb, bs, -1)),
             x.unblocks(x.scatter(dkg.view(*x.kg.shape))), x.unblocks(x.scatter(dvg.view(*x.vg.shape))))
    return tuple(g.to(dt).contiguous() for g, dt in zip(grads, dtypes))
