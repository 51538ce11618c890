"""One batch of ordinary softmax attention, forward and backward, on the fastest PyTorch
backend for the device: ``(batch, heads, len, head_dim)`` in (any strides), ``out`` and the
natural-log log-sum-exp ``lse`` ``(batch, heads, len)`` out.

The backward takes ``(grad_out, q, k, v, out, lse)`` and, like every flash-style backward,
recomputes ``P = exp(q k^T scale - lse)`` and ``delta = rowsum(grad_out * out)`` from what it is
given; the dilated kernels rely on that to run the exact longnet backward (SPEC section 3).

Backends (chosen per call, honouring ``torch.backends.cuda.*_sdp_enabled()`` so that
``torch.nn.attention.sdpa_kernel`` steers them too):
- ``cudnn``: CUDA fp16/bf16 (fastest on Hopper for these shapes, see PERF-NOTES);
- ``flash``: CUDA fp16/bf16 when cuDNN is off or unavailable;
- ``efficient``: CUDA float32;
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


def select_backend(q: torch.Tensor, dropout_p: float, scale: float, is_causal: bool = False) -> str:
    """The attention kernel for one piece, q ``(batch*segments, heads, len, head_dim)``."""
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
                return "cudnn"
            if cuda.flash_sdp_enabled():
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


def _math_probs(q, k, lse, is_causal, scale):
    s = torch.matmul(q, k.transpose(-2, -1)).mul_(scale)
    if is_causal:
        lq, lk = s.shape[-2], s.shape[-1]
        keep = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril_()
        s = s.masked_fill(~keep, float("-inf"))
    if lse is None:
        lse = torch.logsumexp(s.to(lse_dtype(q.dtype)), dim=-1)
    return torch.exp(s.to(lse.dtype) - lse.unsqueeze(-1)), lse


def forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    is_causal: bool,
    scale: float,
    dropout_p: float = 0.0,
    seed: int = 0,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Attention of ``(B, H, L, D)`` q, k, v. Returns ``out`` ``(B, H, L, D)`` (any strides)
    and ``lse`` ``(B, H, L)`` in :func:`lse_dtype`."""
    backend = select_backend(q, dropout_p, scale, is_causal)
    if backend == "cudnn":
        res = aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, is_causal, False, scale=scale)
        out, lse = res[0], res[1]
        return out, (lse.squeeze(-1) if lse.dim() == 4 else lse)
    if backend == "flash":
        res = aten._scaled_dot_product_flash_attention(q, k, v, 0.0, is_causal, False, scale=scale)
        return res[0], res[1]
    if backend == "efficient":
        res = aten._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.0, is_causal, scale=scale)
        return res[0], res[1][..., : q.shape[-2]]
    if backend == "cpu_flash":
        out, lse = aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, is_causal, scale=scale)
        return out, lse.to(lse_dtype(q.dtype))
    p, lse = _math_probs(q, k, None, is_causal, scale)
    if dropout_p > 0.0:
        p = p * _dropout_mask(p.shape, dropout_p, seed, q.device) / (1.0 - dropout_p)
    return torch.matmul(p.to(v.dtype), v), lse


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
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients ``(dq, dk, dv)``, each ``(B, H, L, D)``, of attention with probabilities
    ``exp(q k^T scale - lse)`` and ``delta = rowsum(grad_out * out)``. ``lse`` ``(B, H, L)``."""
    backend = select_backend(q, dropout_p, scale, is_causal)
    length = q.shape[-2]
    no_rng = torch.empty(0, dtype=torch.int64, device=q.device)  # dropout is off on these paths
    if backend == "cudnn":
        # PyTorch 2.11 caches the cuDNN backward graph by q/k/v layout only and silently
        # misreads out/grad_out of other strides (measured): always pass them packed in q's
        # dimension order, which is what the cuDNN forward returns.
        dq, dk, dv = aten._scaled_dot_product_cudnn_attention_backward(
            _packed_like(grad_out, q), q, k, v, _packed_like(out, q), lse.float().contiguous().unsqueeze(-1),
            no_rng, no_rng, None, None, None, length, length, 0.0, is_causal, scale=scale,
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
        dq, dk, dv, _ = aten._scaled_dot_product_efficient_attention_backward(
            grad_out, q, k, v, None, out_blhd, lse_pad, no_rng.cpu(), no_rng.cpu(), 0.0,
            [True, True, True, False], is_causal, scale=scale,
        )
        return dq, dk, dv
    if backend == "cpu_flash":
        # The kernel takes the log-sum-exp in its accumulation dtype, as its forward returns it
        # (float32 for float16/bfloat16 inputs).
        return aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad_out, q, k, v, out, lse.to(lse_dtype(q.dtype)).contiguous(), 0.0, is_causal, scale=scale
        )
    p, _ = _math_probs(q, k, lse, is_causal, scale)
    p = p.to(q.dtype)
    dp = torch.matmul(grad_out, v.transpose(-2, -1))
    if dropout_p > 0.0:
        keep = _dropout_mask(p.shape, dropout_p, seed, q.device)
        p_drop = p * keep / (1.0 - dropout_p)
        dp = dp * keep / (1.0 - dropout_p)
    else:
        p_drop = p
    dv = torch.matmul(p_drop.transpose(-2, -1), grad_out)
    delta = (grad_out * out).sum(-1, keepdim=True)
    ds = p * (dp - delta)
    dq = torch.matmul(ds, k) * scale
    dk = torch.matmul(ds.transpose(-2, -1), q) * scale
    return dq, dk, dv


def default_scale(head_dim: int, scale: Optional[float]) -> float:
    """``1 / sqrt(head_dim)`` unless given; for ``head_dim == 0`` (every score is 0 whatever the
    scale, as in ``F.scaled_dot_product_attention``) 1.0, a finite stand-in for its inf."""
    if scale is not None:
        return float(scale)
    return 1.0 / math.sqrt(head_dim) if head_dim > 0 else 1.0
