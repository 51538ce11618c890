"""``torch.ops.dilated.dilated_attention`` and its backward op.

q, k, v ``(batch, seq, heads, head_dim)``. The op returns ``(out, lse)``: ``out`` as q,
``lse`` ``(batch, seq, heads)`` (float32, float64 for float64 inputs; see
:mod:`dilated_ops.kernels.dilated` for its meaning per mode). The backward is an op of its own,
so compiled and exported graphs show it as one node too. :func:`dilated_attention` is the
user-facing function returning ``out`` only.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor
from torch.autograd import forward_ad as _forward_ad
from torch.utils._python_dispatch import _get_current_dispatch_mode

from .. import _checks
from ..kernels import attention as _attention
from ..kernels.dilated import dilated_attention_backward, dilated_attention_forward, empty_output


def _seed(dropout_p: float, dropout_seed: Optional[Tensor]) -> int:
    if dropout_p == 0.0:
        return 0
    if dropout_seed is None:
        raise ValueError(
            "dropout_p > 0 needs dropout_seed (an int64 tensor); "
            "dilated_ops.dilated_attention draws one for you"
        )
    return int(dropout_seed)  # a CPU scalar by convention: no device sync


@torch.library.custom_op("dilated::dilated_attention", mutates_args=())
def dilated_attention_op(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    segment_lengths: List[int],
    dilation_rates: List[int],
    mode: str = "groups",
    is_causal: bool = False,
    scale: Optional[float] = None,
    dropout_p: float = 0.0,
    dropout_seed: Optional[Tensor] = None,
    backend: str = "auto",
) -> Tuple[Tensor, Tensor]:
    _checks.check_dilated_args(q, k, v, segment_lengths, dilation_rates, mode, scale, dropout_p, backend)
    return dilated_attention_forward(
        q, k, v, segment_lengths, dilation_rates, mode, is_causal, scale, dropout_p,
        _seed(dropout_p, dropout_seed), backend,
    )


@dilated_attention_op.register_fake
def _(q, k, v, segment_lengths, dilation_rates, mode="groups", is_causal=False, scale=None,
      dropout_p=0.0, dropout_seed=None, backend="auto"):
    _checks.check_dilated_args(q, k, v, segment_lengths, dilation_rates, mode, scale, dropout_p, backend)
    b, n, h, d = q.shape
    out = empty_output(q)
    lse = q.new_empty(b, n, h, dtype=_attention.lse_dtype(q.dtype))
    return out, lse


@torch.library.custom_op("dilated::dilated_attention_backward", mutates_args=())
def dilated_attention_backward_op(
    grad_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    segment_lengths: List[int],
    dilation_rates: List[int],
    mode: str,
    is_causal: bool,
    scale: Optional[float],
    dropout_p: float,
    dropout_seed: Optional[Tensor],
) -> Tuple[Tensor, Tensor, Tensor]:
    return dilated_attention_backward(
        grad_out, q, k, v, out, lse, segment_lengths, dilation_rates, mode, is_causal, scale,
        dropout_p, _seed(dropout_p, dropout_seed),
    )


@dilated_attention_backward_op.register_fake
def _(grad_out, q, k, v, out, lse, segment_lengths, dilation_rates, mode, is_causal, scale,
      dropout_p, dropout_seed):
    return tuple(torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))


_CONFIG = ("segment_lengths", "dilation_rates", "mode", "is_causal", "scale", "dropout_p")


def _setup_context(ctx, inputs, output):
    q, k, v, segment_lengths, dilation_rates, mode, is_causal, scale, dropout_p, seed, _ = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, out, lse, seed)
    ctx.config = (segment_lengths, dilation_rates, mode, is_causal, scale, dropout_p)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, seed = ctx.saved_tensors
    dq, dk, dv = dilated_attention_backward_op(grad_out, q, k, v, out, lse, *ctx.config, seed)
    return (dq, dk, dv) + (None,) * 8


dilated_attention_op.register_autograd(_backward, setup_context=_setup_context)


class _Eager(torch.autograd.Function):
    """Eager calls of :func:`dilated_attention` on plain tensors that need gradients: the op's own
    forward, autograd context and backward kernel without the custom-op dispatch layers, which
    cost host time while the GPU waits (forward+backward at 16K tokens on the H100 machine, per
    call: 3.54 vs 3.64 ms and 4.03 vs 4.14 ms in two interleaved runs).

    ``forward`` takes ``ctx`` itself (no ``setup_context``): with a ``setup_context``,
    ``Function.apply`` binds the arguments through ``inspect.signature`` on every call. Only
    plain eager calls get here (no torch.func transforms, which would need it)."""

    @staticmethod
    def forward(ctx, q, k, v, segment_lengths, dilation_rates, mode, is_causal, scale, dropout_p, seed, backend):
        output = dilated_attention_forward(
            q, k, v, segment_lengths, dilation_rates, mode, is_causal, scale, dropout_p,
            _seed(dropout_p, seed), backend,
        )
        _setup_context(ctx, (q, k, v, segment_lengths, dilation_rates, mode, is_causal, scale, dropout_p, seed,
                             backend), output)
        return output

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse, seed = ctx.saved_tensors
        segment_lengths, dilation_rates, mode, is_causal, scale, dropout_p = ctx.config
        dq, dk, dv = dilated_attention_backward(
            grad_out, q, k, v, out, lse, segment_lengths, dilation_rates, mode, is_causal, scale,
            dropout_p, _seed(dropout_p, seed),
        )
        return (dq, dk, dv) + (None,) * 8


def _plain_eager(*tensors: Tensor) -> bool:
    """True for plain tensors outside tracing, transforms and dispatch modes: there the op node
    is what counts (compile, export, torch.jit.trace, fake tensors, FX proxies, torch.func, a
    TorchDispatchMode watching ops)."""
    return (
        all(type(t) is Tensor for t in tensors)
        and not torch.compiler.is_compiling()
        and not torch.jit.is_tracing()
        and _get_current_dispatch_mode() is None
        and torch._C._functorch.peek_interpreter_stack() is None
    )


def _has_tangent(*tensors: Tensor) -> bool:
    """Inside ``torch.autograd.forward_ad.dual_level`` with a dual input: the op has no
    forward-mode formula, and the custom op would drop the tangent silently."""
    if getattr(_forward_ad, "_current_level", -1) < 0:
        return False
    return any(isinstance(t, Tensor) and _forward_ad.unpack_dual(t).tangent is not None for t in tensors)


def dilated_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    *,
    mode: str = "groups",
    is_causal: bool = False,
    scale: Optional[float] = None,
    dropout_p: float = 0.0,
    backend: str = "auto",
) -> Tensor:
    """Dilated attention (LongNet) of q, k, v ``(batch, seq, heads, head_dim)``; returns
    ``(batch, seq, heads, head_dim)``.

    ``segment_lengths`` / ``dilation_rates``: the branches ``(w_i, r_i)``; ``mode`` "groups"
    (heads split into one group per branch, v0.2.0's ``DilatedAttention``) or "longnet" (every
    head in every branch, combined by softmax weight as in the LongNet paper). ``dropout_p``
    applies as given: pass 0.0 in eval, as with ``F.scaled_dot_product_attention``.
    ``backend`` "auto" runs the fastest kernel we have for the device (our Triton forward where
    it measured faster); "sdpa" only PyTorch's own attention kernels.
    """
    # Checked here as well as in the op: the op's schema rejects wrong types with a less
    # helpful message before its body runs.
    _checks.check_dilated_args(q, k, v, segment_lengths, dilation_rates, mode, scale, dropout_p, backend)
    seed = None
    if dropout_p > 0.0:
        # Drawn from the default CPU generator, so torch.manual_seed makes runs repeatable.
        seed = torch.randint(0, 2**62, (), dtype=torch.int64)
    if _has_tangent(q, k, v):
        raise NotImplementedError(
            "dilated_attention does not support forward-mode AD (torch.autograd.forward_ad): "
            "q, k or v carries a tangent; use reverse mode (backward / torch.autograd.grad)"
        )
    segment_lengths, dilation_rates = list(segment_lengths), list(dilation_rates)
    config = (segment_lengths, dilation_rates, mode, is_causal, scale, dropout_p)
    if not _plain_eager(q, k, v):
        return dilated_attention_op(q, k, v, *config, seed, backend)[0]
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return _Eager.apply(q, k, v, *config, seed, backend)[0]
    # Nothing to differentiate (host time per forward 0.62 vs 0.68 ms at 16K, 0.68 vs 0.79 ms at
    # 256K against the op's dispatch, H100 machine): the forward kernels alone.
    return dilated_attention_forward(q, k, v, *config, _seed(dropout_p, seed), backend)[0]
