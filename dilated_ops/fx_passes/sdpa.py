"""Rewrites ``F.scaled_dot_product_attention(q, k, v, ...)`` calls on ``(batch, heads, seq,
head_dim)`` into ``torch.ops.dilated.dilated_attention`` between transposes (bhnd <-> bnhd).

``is_causal``, ``scale`` and ``dropout_p`` pass through (SDPA applies ``dropout_p`` as given,
so does the op; the draws differ). Refused, left untouched and reported: ``attn_mask``,
``enable_gqa=True``, q/k/v of different shapes (sequence lengths, heads) or not 4-D, fewer heads
than dilation groups.
"""
from __future__ import annotations

from typing import Callable, Iterator, Optional, Tuple

import torch
import torch.fx
import torch.nn.functional as F

from ._emit import Target, emit_dilated, heads_problem
from .report import Decider, example_shape

KIND = "scaled_dot_product_attention"
_NAMES = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_DEFAULTS = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}
_TARGETS = (F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention)


def bind_sdpa(node: torch.fx.Node) -> dict:
    if len(node.args) > len(_NAMES):
        raise TypeError(f"{len(node.args)} positional arguments")
    a = dict(_DEFAULTS)
    a.update(zip(_NAMES, node.args))
    for name, value in node.kwargs.items():
        if name not in _NAMES or (name in _NAMES[: len(node.args)]):
            raise TypeError(f"unexpected keyword {name!r}")
        a[name] = value
    missing = [n for n in _NAMES[:3] if n not in a]
    if missing:
        raise TypeError(f"missing {missing}")
    return a


def mask_problem(mask) -> str:
    """Why an ``attn_mask`` is refused (every mask is: the tensor's values are unknown here)."""
    value = mask.meta.get("example_value", mask.meta.get("val")) if isinstance(mask, torch.fx.Node) else mask
    if getattr(value, "dtype", None) == torch.bool:
        return ("a boolean attn_mask is not supported by dilated attention (only causal masking, "
                "declared with is_causal=True)")
    return "a float attn_mask (an additive bias) is not supported by dilated attention (use is_causal=True)"


def sdpa_problem(a: dict, target: Target) -> Optional[str]:
    if a["attn_mask"] is not None:
        return mask_problem(a["attn_mask"])
    if a["enable_gqa"]:
        return "enable_gqa=True is not supported"
    if not all(isinstance(a[n], (int, float)) for n in ("dropout_p",)) or not isinstance(a["is_causal"], bool):
        return "dropout_p / is_causal are not Python constants"
    if a["scale"] is not None and not isinstance(a["scale"], float):
        return f"scale {a['scale']!r} is not a Python float"
    shapes = [example_shape(a[n]) for n in ("query", "key", "value")]
    if any(s is None for s in shapes):
        return "q/k/v shapes unknown (no shape metadata; for a symbolic_trace graph pass example_inputs)"
    # Compared as text: SymInt sizes (dynamic shapes) are unhashable, and comparing them here
    # would add guards after Dynamo has installed its own.
    if len(shapes[0]) != 4 or len({str(s) for s in shapes}) != 1:
        return f"q, k, v must be 4-D (batch, heads, seq, head_dim) of one shape: got {shapes}"
    return heads_problem(target, shapes[0][1]) if isinstance(shapes[0][1], int) else None


def sdpa_calls(gm: torch.fx.GraphModule, targets, target: Target, decider: Decider,
               extra_problem: Callable[[torch.fx.Node, dict], Optional[str]] = lambda node, a: None
               ) -> Iterator[Tuple[torch.fx.Node, dict]]:
    """The SDPA nodes of ``gm`` (on one of ``targets``) to rewrite, with their bound arguments;
    ``extra_problem`` adds a pass's own checks to :func:`sdpa_problem`."""
    return decider.calls(gm, KIND, targets, bind_sdpa, lambda node, a: sdpa_problem(a, target) or extra_problem(node, a))


def emit_transposed(graph: torch.fx.Graph, target: Target, a: dict, dropout_p: float, transpose=torch.transpose):
    """bhnd q, k, v -> bnhd -> dilated op -> bhnd; returns the output node (insert point set by
    the caller)."""
    q, k, v = (graph.call_function(transpose, (a[n], 1, 2)) for n in ("query", "key", "value"))
    out = emit_dilated(graph, target, q, k, v, a["is_causal"], dropout_p, a["scale"])
    return graph.call_function(transpose, (out, 1, 2))


def rewrite_sdpa(gm: torch.fx.GraphModule, target: Target, decider: Decider) -> int:
    count = 0
    graph = gm.graph
    for node, a in sdpa_calls(gm, _TARGETS, target, decider):
        with graph.inserting_before(node):
            out = emit_transposed(graph, target, a, float(a["dropout_p"]))
        node.replace_all_uses_with(out)
        graph.erase_node(node)
        decider.done(KIND, node)
        count += 1
    return count
