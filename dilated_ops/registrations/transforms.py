"""``torch.func`` for the ``dilated`` ops: the autograd Functions transforms need, and vmap rules
that merge the vmapped dim into the batch dim (every op treats batch rows alike).

A custom op's own autograd node does not take ``torch.func`` transforms ("must override the
setup_context staticmethod"), so under a transform the public functions call a Function of the
form they need (:func:`transformable`), whose forward and backward call the ops; vmap (jacrev,
vmap itself) reaches the ops, which batch through :func:`merged_vmap`.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch


def transformable(name: str, op, setup_context: Callable, backward: Callable) -> type:
    """An ``autograd.Function`` over ``op`` (forward) with the op's registered ``setup_context``
    and ``backward`` kept apart, the form ``torch.func`` transforms need (the custom op's own
    autograd node is not). Its vmap rule is generated: the ops' own vmap rules batch the calls.
    Forward-mode transforms get a clear error."""

    def jvp(ctx, *tangents):
        raise NotImplementedError(
            f"dilated_ops.{name}: forward-mode AD (torch.func.jvp, jacfwd, hessian) is not supported; "
            "use reverse mode (torch.func.grad, vjp, jacrev)"
        )

    return type(f"{name}_transformable", (torch.autograd.Function,), {
        "forward": staticmethod(lambda *args: op(*args)),
        "setup_context": staticmethod(setup_context),
        "backward": staticmethod(backward),
        "jvp": staticmethod(jvp),
        "generate_vmap_rule": True,
    })




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


def register(name: str, op, backward_op, setup_context: Callable, num_args: int):
    """The transform support of op ``dilated::<name>`` and its backward op
    ``dilated::<name>_backward``, both written in this project's form: the forward saves
    ``(q, k, v, out, lse, extra)`` and sets ``ctx.config``; the backward op takes ``(grad_out,
    q, k, v, out, lse, *ctx.config, extra)``. Registers both ops' vmap rules and returns the
    forward's transformable Function."""
    backward_function = transformable(f"{name}_backward", backward_op, lambda ctx, inputs, output: None,
                                      no_double_backward(name))

    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse, extra = ctx.saved_tensors
        grads = backward_function.apply(grad_out, q, k, v, out, lse, *ctx.config, extra)
        return (*grads, *(None,) * (num_args - 3))

    torch.library.register_vmap(f"dilated::{name}", merged_vmap(op, (0, 1, 2), 2))
    torch.library.register_vmap(f"dilated::{name}_backward", merged_vmap(backward_op, (0, 1, 2, 3, 4, 5), 3))
    return transformable(name, op, setup_context, backward)
