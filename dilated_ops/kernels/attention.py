"""One batch of ordinary softmax attention, forward and backward, on the fastest PyTorch
backend for the device: ``(batch, heads, len, head_dim)`` in (any strides), ``out`` and the
natural-log log-sum-exp ``lse`` ``(batch, heads, len)`` out.

The backward takes ``(grad_out, q, k, v, out, lse)`` and, like every flash-style backward,
recomputes ``P = exp(q k^T scale - lse)`` and ``delta = rowsum(grad_out * out)`` from what it is
given; the dilated kernels rely on that to run the exact longnet backward (SPEC section 3).

Grouped-query attention: k, v may have ``H_kv`` heads, a divisor of q's ``H``; query head ``j``
reads KV head ``j // (H / H_kv)`` (the kernels that take it natively do; the others broadcast,
and the "efficient" kernel gets repeated copies). A key mask ``key_mask`` ``(B, 1, L)`` bool
(True = keep) hides keys; a query that then sees no key gets output 0 and ``lse = -inf``, and
zero gradients.

Backends (chosen per call, honouring ``torch.backends.cuda.*_sdp_enabled()`` so that
``torch.nn.attention.sdpa_kernel`` steers them too):
- ``cudnn``: CUDA fp16/bf16 (fastest on Hopper for these shapes, see PERF-NOTES), with a key
  mask as an additive bias (broadcast, stride 0);
- ``flash``: CUDA fp16/bf16 when cuDNN is off or unavailable (no key mask: it takes no bias);
- ``efficient``: CUDA float32, and a key mask where cuDNN does not run;
- ``cpu_flash``: CPU, every float dtype (PyTorch's CPU flash kernel, float64 included);
- ``math``: anything else, and every call with dropout: explicit probabilities in plain torch
  ops, O(len^2) memory per batch entry; dropout masks come from a seeded generator so the
  backward regenerates the forward's mask.
"""
from __future__ import annotations

import functools
import math
from typing import Optional, Tuple

import torch

aten = torch.ops.aten


def lse_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of the log-sum-exp for inputs of ``dtype``: float32, or float64 for float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@functools.lru_cache(maxsize=None)
def _capability(index: int):
    return torch.cuda.get_device_capability(index)


def device_capability(device: torch.device):
    """``(major, minor)`` of a CUDA device, asked of the driver once per device (it is read on
    every launch)."""
    return _capability(device.index if device.index is not None else torch.cuda.current_device())


def select_backend(q: torch.Tensor, dropout_p: float, scale: float, is_causal: bool = False,
                   masked: bool = False) -> str:
    """The attention kernel for one piece, q ``(batch*segments, heads, len, head_dim)``;
    ``masked``: with a key mask."""
    if dropout_p > 0.0 or q.shape[-1] == 0:  # head_dim 0: out is empty, lse log(#keys)
        return "math"
    if q.device.type == "cpu":
        # PyTorch's CPU flash kernel returns NaN rows for causal attention with scale <= 0.
        return "cpu_flash" if scale > 0 or not is_causal else "math"
    if q.device.type == "cuda":
        head_dim = q.shape[-1]
        cuda = torch.backends.cuda
        # torch 2.11's cuDNN and flash SDPA return NaN for scale <= 0 (measured on the H100).
        if q.dtype in (torch.float16, torch.bfloat16) and head_dim % 8 == 0 and head_dim <= 256 and scale > 0:
            if (
                head_dim <= 128
                and q.shape[-2] > 1  # cuDNN's frontend refuses s_q = s_kv = 1 (a one-token piece)
                and cuda.cudnn_sdp_enabled()
                and torch.backends.cudnn.is_available()
                and device_capability(q.device) >= (9, 0)
            ):
                return "cudnn"  # takes a key mask's bias and GQA, forward and backward
            if cuda.flash_sdp_enabled() and not masked:  # flash takes no bias
                return "flash"
        if q.dtype in (torch.float16, torch.bfloat16, torch.float32) and cuda.mem_efficient_sdp_enabled():
            return "efficient"
    return "math"


def _packed_like(t: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``t`` densely packed in ``ref``'s dimension order (no copy when it already is)."""
    like = torch.empty_like(ref)
    return t if t.stride() == like.stride() else like.copy_(t)


def _packed_blhd(t: torch.Tensor) -> torch.Tensor:
    """``(B, H, L, D)`` ``t`` stored as packed ``(B, L, H, D)``."""
    b, h, l, d = t.shape
    want = (l * h * d, d, h * d, 1)
    if t.stride() == want:
        return t
    return t.new_empty(b, l, h, d).transpose(1, 2).copy_(t)


def _dropout_mask(shape, p: float, seed: int, device) -> torch.Tensor:
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return torch.rand(shape, generator=gen, device=device) >= p


def _grouped(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """q ``(B, H, L, D)`` as ``(B, H_kv, H / H_kv, L, D)`` (a view): the query heads of each KV
    head of k, which broadcasts against it as ``k.unsqueeze(2)``."""
    return q.unflatten(1, (k.shape[1], q.shape[1] // k.shape[1]))


def _math_probs(q, k, lse, is_causal, scale, key_mask=None):
    """Softmax weights ``(B, H_kv, H / H_kv, L, S)`` of q against k (GQA broadcast); ``lse``
    ``(B, H, L)`` given, or computed (rows with no visible key: -inf, their weights 0)."""
    s = torch.matmul(_grouped(q, k), k.unsqueeze(2).transpose(-2, -1)).mul_(scale)
    if is_causal:
        lq, lk = s.shape[-2], s.shape[-1]
        keep = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril_()
        s = s.masked_fill(~keep, float("-inf"))
    if key_mask is not None:
        s = s.masked_fill(~key_mask[:, None, None], float("-inf"))  # (B, 1, 1, 1, S)
    if lse is None:
        lse = torch.logsumexp(s.to(lse_dtype(q.dtype)), dim=-1).flatten(1, 2)
    lse_g = _grouped(lse.unsqueeze(-1), k).squeeze(-1)
    # a row with no visible key: exp(-inf - (+inf)) = 0 (forward: lse -inf, so take +inf here)
    lse_g = torch.where(torch.isneginf(lse_g), float("inf"), lse_g)
    return torch.exp(s.to(lse.dtype) - lse_g.unsqueeze(-1)), lse


def _bias(key_mask: torch.Tensor, q: torch.Tensor, length: int) -> torch.Tensor:
    """The additive bias of a key mask ``(B, 1, S)`` for PyTorch's kernels, ``(B, H, L, S)``
    in q's dtype, broadcast (stride 0) over heads and queries; its rows stored 16-aligned as
    the "efficient" kernel needs (PyTorch's own ``F.scaled_dot_product_attention`` pads alike);
    cuDNN takes the same tensor."""
    b, _, s = key_mask.shape
    padded = -(-s // 16) * 16
    bias = q.new_zeros(b, 1, 1, padded)[..., :s]
    bias.masked_fill_(~key_mask[:, None], float("-inf"))
    return bias.expand(b, q.shape[1], length, s)


def _visible(key_mask: torch.Tensor, is_causal: bool) -> torch.Tensor:
    """Which queries see a key, ``(B, 1, L)`` (causal) or ``(B, 1, 1)``, of a key mask
    ``(B, 1, L)`` on a square piece."""
    return key_mask.cumsum(-1) > 0 if is_causal else key_mask.any(-1, keepdim=True)


def _expand_kv(q: torch.Tensor, *kv: torch.Tensor):
    """k, v repeated to q's heads (for kernels without grouped-query attention)."""
    return tuple(t if t.shape[1] == q.shape[1] else t.repeat_interleave(q.shape[1] // t.shape[1], 1) for t in kv)


def _sum_kv(g: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
    """A gradient of repeated K or V heads summed back to ``kv``'s heads."""
    return g if g.shape[1] == kv.shape[1] else g.unflatten(1, (kv.shape[1], -1)).sum(2)


def forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    is_causal: bool,
    scale: float,
    dropout_p: float = 0.0,
    seed: int = 0,
    key_mask: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Attention of ``(B, H, L, D)`` q and ``(B, H_kv, L, D)`` k, v. Returns ``out`` ``(B, H, L,
    D)`` (any strides) and ``lse`` ``(B, H, L)`` in :func:`lse_dtype`."""
    if key_mask is None:
        return _forward(q, k, v, is_causal, scale, dropout_p, seed)
    out, lse = _forward(q, k, v, is_causal, scale, dropout_p, seed, key_mask)
    seen = _visible(key_mask, is_causal)
    return out.masked_fill(~seen.unsqueeze(-1), 0.0), lse.masked_fill(~seen, float("-inf"))


def _forward(q, k, v, is_causal, scale, dropout_p, seed, key_mask=None):
    backend = select_backend(q, dropout_p, scale, is_causal, key_mask is not None)
    if backend == "cudnn":
        bias = None if key_mask is None else _bias(key_mask, q, q.shape[-2])
        res = aten._scaled_dot_product_cudnn_attention(q, k, v, bias, True, 0.0, is_causal, False, scale=scale)
        out, lse = res[0], res[1]
        return out, (lse.squeeze(-1) if lse.dim() == 4 else lse)
    if backend == "flash":
        res = aten._scaled_dot_product_flash_attention(q, k, v, 0.0, is_causal, False, scale=scale)
        return res[0], res[1]
    if backend == "efficient":
        k, v = _expand_kv(q, k, v)
        bias = None if key_mask is None else _bias(key_mask, q, q.shape[-2])
        res = aten._scaled_dot_product_efficient_attention(q, k, v, bias, True, 0.0, is_causal, scale=scale)
        return res[0], res[1][..., : q.shape[-2]]
    if backend == "cpu_flash":
        mask = None if key_mask is None else _bias(key_mask, q, q.shape[-2])[:, :1, :1]
        out, lse = aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, is_causal, attn_mask=mask,
                                                                   scale=scale)
        return out, lse.to(lse_dtype(q.dtype))
    p, lse = _math_probs(q, k, None, is_causal, scale, key_mask)
    if dropout_p > 0.0:
        p = p * _dropout_mask(p.shape, dropout_p, seed, q.device) / (1.0 - dropout_p)
    return torch.matmul(p.to(v.dtype), v.unsqueeze(2)).flatten(1, 2), lse


def backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    is_causal: bool,
    scale: float,
    dropout_p: float = 0.0,
    seed: int = 0,
    key_mask: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients ``(dq, dk, dv)``, shaped as q, k, v, of attention with probabilities
    ``exp(q k^T scale - lse)`` and ``delta = rowsum(grad_out * out)``. ``lse`` ``(B, H, L)``
    (with ``key_mask``, ``-inf`` on rows that see no key: they get zero gradients)."""
    backend = select_backend(q, dropout_p, scale, is_causal, key_mask is not None)
    if key_mask is not None and backend != "math":
        # exp(s - inf) = 0: a row that sees no key adds nothing (the kernels would make NaN of -inf)
        lse = torch.where(torch.isneginf(lse), float("inf"), lse)
    length = q.shape[-2]
    no_rng = torch.empty(0, dtype=torch.int64, device=q.device)  # dropout is off on these paths
    if backend == "cudnn":
        # PyTorch 2.11 caches the cuDNN backward graph by q/k/v layout only and silently
        # misreads out/grad_out of other strides (measured): always pass them packed in q's
        # dimension order, which is what the cuDNN forward returns.
        bias = None if key_mask is None else _bias(key_mask, q, length)
        dq, dk, dv = aten._scaled_dot_product_cudnn_attention_backward(
            _packed_like(grad_out, q), q, k, v, _packed_like(out, q), lse.float().contiguous().unsqueeze(-1),
            no_rng, no_rng, bias, None, None, length, length, 0.0, is_causal, scale=scale,
        )
        return dq, dk, dv
    if backend == "flash":
        return aten._scaled_dot_product_flash_attention_backward(
            grad_out, q, k, v, out, lse.float().contiguous(), None, None, length, length, 0.0,
            is_causal, no_rng, no_rng, scale=scale,
        )
    if backend == "efficient":
        # out must be packed (B, L, H, D) as the forward returns it (else silently wrong dq/dk,
        # measured); the lse padded to a multiple of 32 as the forward returns it.
        b, h, _, d = q.shape
        out_blhd = _packed_blhd(out)
        lse_pad = lse.new_zeros(b, h, -(-length // 32) * 32, dtype=torch.float32)
        lse_pad[..., :length] = lse
        ke, ve = _expand_kv(q, k, v)
        bias = None if key_mask is None else _bias(key_mask, q, length)
        dq, dk_e, dv_e, _ = aten._scaled_dot_product_efficient_attention_backward(
            grad_out, q, ke, ve, bias, out_blhd, lse_pad, no_rng.cpu(), no_rng.cpu(), 0.0,
            [True, True, True, False], is_causal, scale=scale,
        )
        return dq, _sum_kv(dk_e, k), _sum_kv(dv_e, v)
    if backend == "cpu_flash":
        # The kernel takes the log-sum-exp in its accumulation dtype, as its forward returns it
        # (float32 for float16/bfloat16 inputs).
        mask = None if key_mask is None else _bias(key_mask, q, length)[:, :1, :1]
        return aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad_out, q, k, v, out, lse.to(lse_dtype(q.dtype)).contiguous(), 0.0, is_causal, attn_mask=mask,
            scale=scale
        )
    p, _ = _math_probs(q, k, lse, is_causal, scale, key_mask)  # (B, H_kv, m, L, S)
    p = p.to(q.dtype)
    do = _grouped(grad_out, k)
    dp = torch.matmul(do, v.unsqueeze(2).transpose(-2, -1))
    if dropout_p > 0.0:
        keep = _dropout_mask(p.shape, dropout_p, seed, q.device)
        p_drop = p * keep / (1.0 - dropout_p)
        dp = dp * keep / (1.0 - dropout_p)
    else:
        p_drop = p
    dv = torch.matmul(p_drop.transpose(-2, -1), do).sum(2)
    delta = (do * _grouped(out, k)).sum(-1, keepdim=True)
    ds = p * (dp - delta)
    dq = torch.matmul(ds, k.unsqueeze(2)).flatten(1, 2) * scale
    dk = torch.matmul(ds.transpose(-2, -1), _grouped(q, k)).sum(2) * scale
    return dq, dk, dv


def default_scale(head_dim: int, scale: Optional[float]) -> float:
    """``1 / sqrt(head_dim)`` unless given; for ``head_dim == 0`` (every score is 0 whatever the
    scale, as in ``F.scaled_dot_product_attention``) 1.0, a finite stand-in for its inf."""
    if scale is not None:
        return float(scale)
    return 1.0 / math.sqrt(head_dim) if head_dim > 0 else 1.0
