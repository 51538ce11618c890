"""Rewrites ``F.scaled_dot_product_attention(q, k, v, ...)`` calls on ``(batch, heads, seq,
head_dim)`` into the configured variant's op between transposes (bhnd <-> bnhd).

``is_causal``, ``scale`` and ``dropout_p`` pass through (SDPA applies ``dropout_p`` as given,
so does the op; the draws differ). Refused, left untouched and reported
(:func:`.refusals.sdpa_problem`): ``attn_mask``, ``enable_gqa=True``, q/k/v of different shapes
(sequence lengths, heads) or not 4-D, fewer heads than dilation groups.
"""
from __future__ import annotations

from typing import Callable, Iterator, Optional, Tuple

import torch
import torch.fx
import torch.nn.functional as F

from ._emit import emit_op
from .config import RewriteConfig
from .refusals import sdpa_problem
from .report import Decider

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


def sdpa_calls(gm: torch.fx.GraphModule, targets, decider: Decider,
               extra_problem: Callable[[torch.fx.Node, dict], Optional[str]] = lambda node, a: None
               ) -> Iterator[Tuple[torch.fx.Node, dict]]:
    """The SDPA nodes of ``gm`` (on one of ``targets``) to rewrite, with their bound arguments;
    ``extra_problem`` adds a pass's own checks to :func:`.refusals.sdpa_problem`."""
    config = decider.config
    return decider.calls(gm, KIND, targets, bind_sdpa,
                         lambda node, a: sdpa_problem(config, a) or extra_problem(node, a))


def emit_transposed(graph: torch.fx.Graph, config: RewriteConfig, a: dict, dropout_p: float,
                    transpose=torch.transpose) -> torch.fx.Node:
    """bhnd q, k, v -> bnhd -> the op -> bhnd; returns the output node (insert point set by
    the caller)."""
    q, k, v = (graph.call_function(transpose, (a[n], 1, 2)) for n in ("query", "key", "value"))
    out = emit_op(graph, config, q, k, v, a["is_causal"], dropout_p, a["scale"])
    return graph.call_function(transpose, (out, 1, 2))


def rewrite_sdpa(gm: torch.fx.GraphModule, decider: Decider) -> int:
    count = 0
    graph = gm.graph
    for node, a in sdpa_calls(gm, _TARGETS, decider):
        with graph.inserting_before(node):
            out = emit_transposed(graph, decider.config, a, float(a["dropout_p"]))
        node.replace_all_uses_with(out)
        graph.erase_node(node)
        decider.node_done(KIND, node)
        count += 1
    return count
