"""``torch.func`` for the ``dilated`` ops: their autograd kernel, which transforms take, and vmap
rules that merge the vmapped dim into the batch dim (every op treats batch rows alike).

The autograd node ``torch.library`` generates for a custom op does not take ``torch.func``
transforms ("must override the setup_context staticmethod"). Each op here gets an autograd kernel
of its own (:func:`route_raw_op`) whose node redispatches the op below autograd, as a C++ op's
autograd kernel does, so ``grad``, ``vjp``, ``jacrev`` and ``vmap`` work through the raw
``torch.ops.dilated.*`` ops, and through the public functions and modules, which call them under
transforms. Forward-mode AD and double backward raise ``NotImplementedError`` naming dilated_ops.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch._functorch.utils import enable_single_level_autograd_function

from .eager import has_tangent


def no_double_backward(name: str) -> Callable:
    def backward(ctx, *grads):
        raise NotImplementedError(f"dilated_ops.{name}: double backward (torch.func.hessian, grad of grad) "
                                  "is not supported")
    return backward


def _merge(x, d, size: int):
    """``x`` with its vmapped dim ``d`` (None: unbatched, expanded) merged into dim 0."""
    x = x.movedim(d, 0) if d is not None else x.expand(size, *x.shape)
    return x.reshape(size * x.shape[1], *x.shape[2:])


def merged_vmap(op, batched: Sequence[int], num_outputs: int) -> Callable:
    """A ``torch.library.register_vmap`` rule for ``op``: the arguments at positions ``batched``
    (tensors whose dim 0 is the batch) get the vmapped dim merged into their batch dim, the
    others must not be vmapped; the outputs are split back, vmapped at dim 0."""

    def rule(info, in_dims, *args):
        args = list(args)
        for i, d in enumerate(in_dims):
            if i in batched and args[i] is not None:
                args[i] = _merge(args[i], d, info.batch_size)
            elif isinstance(args[i], torch.Tensor) and d is not None:
                raise ValueError(f"dilated_ops: argument {i} of {op} cannot be vmapped (only q, k, v and "
                                 "the tensors shaped like them can)")
        outs = op(*args)
        return tuple(o.reshape(info.batch_size, o.shape[0] // info.batch_size, *o.shape[1:]) for o in outs), \
            (0,) * num_outputs

    return rule


def register(name: str, op, backward_op, setup_context: Callable, backward: Callable) -> None:
    """The transform support of op ``dilated::<name>`` (autograd formula ``setup_context`` and
    ``backward``, which calls the backward op) and of its backward op ``dilated::<name>_backward``,
    both written in this project's form: the forward's inputs are ``(q, k, v, ...)``, the backward
    op takes ``(grad_out, q, k, v, out, lse, ...)``. Registers both ops' autograd kernels and vmap
    rules."""
    torch.library.register_vmap(f"dilated::{name}", merged_vmap(op, (0, 1, 2), 2))
    torch.library.register_vmap(f"dilated::{name}_backward", merged_vmap(backward_op, (0, 1, 2, 3, 4, 5), 3))
    route_raw_op(name, setup_context, backward, 3)
    route_raw_op(f"{name}_backward", lambda ctx, inputs, output: None, no_double_backward(name), 6)


# Per-backend autograd kernels take precedence over the ``Autograd`` alias kernel that
# ``torch.library.custom_op`` registers (replacing that one would warn), on the devices the ops run on.
_AUTOGRAD_KEYS = ("AutogradCPU", "AutogradCUDA", "AutogradMeta")
_LIB = torch.library.Library("dilated", "IMPL")


class _OpNode(torch.autograd.function._SingleLevelFunction):
    """The autograd node of a raw op call: its forward redispatches the op below autograd (as a
    C++ op's autograd kernel does), so under ``torch.func`` transforms the lower levels see the op
    itself. ``_SingleLevelFunction``, the base functorch builds its own per-level nodes on: the
    public ``Function.apply`` would hand a transform's call to functorch, which needs the
    forward apart from ``setup_context``."""

    @staticmethod
    def forward(ctx, overload, below, setup_context, backward, *args):
        # Grad mode as the caller had it (on: a node is only made then), not the forward's
        # no_grad: under nested transforms the lower levels record their own nodes of the op.
        with torch.enable_grad(), torch._C._AutoDispatchBelowAutograd():
            outputs = overload.redispatch(below, *args)
        setup_context(ctx, args, outputs)
        ctx.op_backward = backward
        return outputs

    @staticmethod
    def backward(ctx, *grads):
        return (None, None, None, None, *ctx.op_backward(ctx, *grads))


def route_raw_op(name: str, setup_context: Callable, backward: Callable, num_tensors: int) -> None:
    """The autograd kernel of the raw op ``dilated::<name>`` on the devices it runs on: its node
    (:class:`_OpNode`) with ``setup_context`` and ``backward`` (the op's registered formula, or
    :func:`no_double_backward`), which ``torch.func`` transforms take, where the node
    ``torch.library`` generates fails under them ("must override the setup_context
    staticmethod"). A forward-mode tangent on one of the first ``num_tensors`` arguments raises
    (a custom op would drop it silently)."""
    overload = getattr(torch.ops.dilated, name).default
    schema_args = overload._schema.arguments

    def kernel(keyset, *args):
        if has_tangent(*args[:num_tensors]):
            raise NotImplementedError(
                f"dilated_ops.{name.removesuffix('_backward')}: forward-mode AD (torch.autograd.forward_ad, "
                f"torch.func.jvp, jacfwd, hessian) is not supported (reached torch.ops.dilated.{name}); use "
                "reverse mode (torch.func.grad, vjp, jacrev)"
            )
        below = keyset & torch._C._after_autograd_keyset
        if not (torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)):
            with torch._C._AutoDispatchBelowAutograd():
                return overload.redispatch(below, *args)
        # the dispatcher drops trailing arguments equal to their defaults; setup_context takes all
        args = (*args, *(a.default_value for a in schema_args[len(args):]))
        if torch._C._functorch.peek_interpreter_stack() is None:
            return _OpNode.apply(overload, below, setup_context, backward, *args)
        with enable_single_level_autograd_function():
            return _OpNode.apply(overload, below, setup_context, backward, *args)

    for key in _AUTOGRAD_KEYS:
        _LIB.impl(name, kernel, key, with_keyset=True)
