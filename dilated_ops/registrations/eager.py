"""Eager calls of the ``dilated`` ops on plain tensors, without the custom-op dispatch layers.

The GPU waits for the host's first launch, so host time spent in the dispatcher is part of
every eager call's time (``benchmarks/RESULTS.md`` has the measurements). Where the op node is
what counts (compile, export, ``torch.jit.trace``, fake tensors, FX proxies, ``torch.func``, a
``TorchDispatchMode`` watching ops) the op itself is called.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import torch
from torch import Tensor
from torch.autograd import forward_ad
from torch.utils._python_dispatch import _get_current_dispatch_mode


class Kernels(NamedTuple):
    """What an op's eager path runs: ``forward(*args) -> outputs`` (the op's kernels),
    ``setup_context(ctx, args, outputs)`` and ``backward(ctx, *grads) -> one grad per arg`` (its
    registered autograd formula, on the kernels)."""

    forward: Callable
    setup_context: Callable
    backward: Callable


class _Eager(torch.autograd.Function):
    """``forward`` takes ``ctx`` itself (no ``setup_context``): with one, ``Function.apply``
    binds the arguments through ``inspect.signature`` on every call. Only plain eager calls get
    here, never torch.func transforms, which would need the separate ``setup_context``."""

    @staticmethod
    def forward(ctx, kernels: Kernels, *args):
        outputs = kernels.forward(*args)
        kernels.setup_context(ctx, args, outputs)
        ctx.kernels = kernels
        return outputs

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads):
        return (None, *ctx.kernels.backward(ctx, *grads))


def plain(*tensors: Tensor) -> bool:
    """True for plain tensors outside tracing, transforms and dispatch modes."""
    return (
        all(type(t) is Tensor for t in tensors)
        and not torch.compiler.is_compiling()
        and not torch.jit.is_tracing()
        and _get_current_dispatch_mode() is None
        and torch._C._functorch.peek_interpreter_stack() is None
    )


def has_tangent(*tensors: Tensor) -> bool:
    """Inside ``torch.autograd.forward_ad.dual_level`` with a dual input: the ops have no
    forward-mode formula, and a custom op would drop the tangent silently."""
    if getattr(forward_ad, "_current_level", -1) < 0:
        return False
    return any(isinstance(t, Tensor) and forward_ad.unpack_dual(t).tangent is not None for t in tensors)


def run(op, kernels: Kernels, args: tuple, tensors: Sequence[Tensor]):
    """``op(*args)``, or on plain eager ``tensors`` the same computation through ``kernels``:
    with an autograd node when a tensor needs a gradient, else the forward kernels alone."""
    if plain(*tensors):  # the common case first: it is every eager call's host time
        if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
            return _Eager.apply(kernels, *args)
        return kernels.forward(*args)
    return op(*args)
