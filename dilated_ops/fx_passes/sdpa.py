"""Rewrites ``F.scaled_dot_product_attention(q, k, v, ...)`` calls on ``(batch, heads, seq,
head_dim)`` into the configured variant's op between transposes (bhnd <-> bnhd).

``is_causal``, ``scale`` and ``dropout_p`` pass through (SDPA applies ``dropout_p`` as given,
so does the op; the draws differ). For variants that take them (the table's ``masks`` and
``GQA`` columns): ``enable_gqa=True`` and K/V heads repeated by transformers' ``repeat_kv``
become the op's grouped-query attention on the unrepeated K/V; a boolean ``attn_mask`` that
reads as causal, key padding or both (:func:`.provenance.explain_mask`) becomes ``is_causal``
and ``key_padding_mask``. Refused, left untouched and reported: other masks (named), cross-
attention (k or v projected from other states than q, whatever the shapes), q/k/v of other
shapes, fewer heads than dilation groups (:func:`.refusals.sdpa_problem`).
"""
from __future__ import annotations

from typing import Callable, Iterator, NamedTuple, Optional, Tuple

import torch
import torch.fx
import torch.nn.functional as F

from ._emit import emit_op
from .config import RewriteConfig
from .provenance import MaskMeaning, cross_attention_problem, explain_mask, unrepeated_kv
from .refusals import example_shape, sdpa_problem
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


class Plan(NamedTuple):
    """What an SDPA call becomes: the op on ``q``, ``k``, ``v`` (K/V unrepeated for GQA),
    ``is_causal``, and the ``(batch, seq)`` key padding input (nonzero = keep) or None."""

    q: object
    k: object
    v: object
    is_causal: bool
    padding: Optional[torch.fx.Node]


def plan(gm: torch.fx.GraphModule, config: RewriteConfig, a: dict) -> "Plan | str":
    """The call's :class:`Plan`, or why it is refused (after :func:`.refusals.sdpa_problem`)."""
    q, k, v = a["query"], a["key"], a["value"]
    problem = cross_attention_problem(q, k, v)
    if problem:
        return problem
    if config.variant.gqa:
        k0, v0 = unrepeated_kv(k), unrepeated_kv(v)
        if k0 is not None and v0 is not None and str(example_shape(k0)) == str(example_shape(v0)):
            k, v = k0, v0
    is_causal, padding = a["is_causal"], None
    if a["attn_mask"] is not None:
        qs, ks = example_shape(q), example_shape(k)
        meaning = explain_mask(gm, a["attn_mask"], qs[0], qs[2], ks[2])
        if isinstance(meaning, str):
            return meaning
        if is_causal and meaning.padding is None and not meaning.is_causal:
            meaning = MaskMeaning(True, None)  # an all-keep mask with is_causal: causal
        if is_causal:  # SDPA refuses a mask with is_causal=True; a graph that has one errs anyway
            return "attn_mask together with is_causal=True"
        is_causal, padding = meaning.is_causal, meaning.padding
    return Plan(q, k, v, bool(is_causal), padding)


def sdpa_calls(gm: torch.fx.GraphModule, targets, decider: Decider,
               extra_problem: Callable[[torch.fx.Node, dict], Optional[str]] = lambda node, a: None
               ) -> Iterator[Tuple[torch.fx.Node, dict, Plan]]:
    """The SDPA nodes of ``gm`` (on one of ``targets``) to rewrite, with their bound arguments
    and :class:`Plan`; ``extra_problem`` adds a pass's own checks."""
    config = decider.config
    plans = {}

    def problem(node, a):
        # Cross-attention first: whatever the lengths, it is named as such (a length mismatch
        # left over is then a decode step against a cache, which the backend warns about).
        reason = cross_attention_problem(a["query"], a["key"], a["value"]) or sdpa_problem(config, a) or \
            extra_problem(node, a)
        if reason:
            return reason
        p = plan(gm, config, a)
        if isinstance(p, str):
            return p
        plans[node] = p
        return None

    for node, a in decider.calls(gm, KIND, targets, bind_sdpa, problem):
        yield node, a, plans.pop(node)


def emit_transposed(graph: torch.fx.Graph, config: RewriteConfig, a: dict, p: Plan, dropout_p: float,
                    transpose=torch.transpose, ne=torch.ne) -> torch.fx.Node:
    """bhnd q, k, v -> bnhd -> the op -> bhnd; returns the output node (insert point set by
    the caller). ``transpose``, ``ne``: the functions the graph's level calls them by."""
    q, k, v = (graph.call_function(transpose, (x, 1, 2)) for x in (p.q, p.k, p.v))
    keep = None if p.padding is None else graph.call_function(ne, (p.padding, 0))
    out = emit_op(graph, config, q, k, v, p.is_causal, dropout_p, a["scale"], keep)
    return graph.call_function(transpose, (out, 1, 2))


def rewrite_sdpa(gm: torch.fx.GraphModule, decider: Decider) -> int:
    count = 0
    graph = gm.graph
    for node, a, p in sdpa_calls(gm, _TARGETS, decider):
        with graph.inserting_before(node):
            out = emit_transposed(graph, decider.config, a, p, float(a["dropout_p"]))
        replace(node, out)
        decider.node_done(KIND, node)
        count += 1
    return count


def replace(node: torch.fx.Node, out: torch.fx.Node) -> None:
    """``node`` replaced by ``out`` and erased, with the nodes that only fed it (the mask's
    construction, the K/V repeats) when they are pure."""
    inputs = list(node.all_input_nodes)
    node.replace_all_uses_with(out)
    node.graph.erase_node(node)
    while inputs:
        n = inputs.pop()
        if n.users or n.op not in ("call_function", "call_method") or str(n.target).endswith("_") or n.is_impure():
            continue
        inputs.extend(n.all_input_nodes)
        n.graph.erase_node(n)
