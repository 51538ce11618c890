"""Emits the configured variant's op into an FX graph: on its own (:func:`emit_op`, q, k, v
``(batch, seq, heads, head_dim)`` nodes in, the ``out`` node back) or as the whole attention
block of :func:`dilated_ops.attention_block.attention_block` run on ``torch.fx.Proxy`` values
(:func:`emit_block`), so the graphs get the computation the modules run."""
from __future__ import annotations

import operator
from typing import Callable, Dict

import torch
import torch.fx
from torch.fx.proxy import GraphAppendingTracer, Proxy

from ..variants import Call
from .config import RewriteConfig


def emit_op(graph: torch.fx.Graph, config: RewriteConfig, q, k, v, is_causal: bool, dropout_p: float,
            scale=None, key_padding_mask=None) -> torch.fx.Node:
    """The configured variant's op on q, k, v nodes (``(batch, seq, heads, head_dim)``; k, v
    with fewer heads for GQA), its arguments from the variant's row
    (:meth:`dilated_ops.variants.Variant.bind`), ``key_padding_mask`` a bool ``(batch, seq)``
    node (True = keep) or None; returns the ``out`` node."""
    variant = config.variant
    seed = None
    if dropout_p > 0.0:
        # As dilated_ops.dilated_attention does: a CPU int64 seed from the default generator.
        seed = graph.call_function(torch.randint, (0, 2**62, ()), {"dtype": torch.int64})
    args, kwargs = variant.bind(Call(q, k, v, config.segment_lengths, config.dilation_rates, config.mode,
                                     bool(is_causal), scale, float(dropout_p), seed, config.options,
                                     key_padding_mask))
    pair = graph.call_function(variant.op.default, args, kwargs)
    return graph.call_function(operator.getitem, (pair, 0))


def emit_block(graph: torch.fx.Graph, config: RewriteConfig, inputs: Dict[str, object],
               block: Callable[..., Proxy], is_causal: bool, dropout_p: float) -> torch.fx.Node:
    """Runs ``block(attend, **proxies)`` with ``inputs`` (names -> nodes or constants) as
    proxies, ``attend(q, k, v, key_padding_mask=None)`` emitting the op (the mask a bool proxy,
    True = keep); the nodes go in at the graph's insert point. Returns
    the block's output node. ``block`` calls :func:`attention_block`."""
    tracer = GraphAppendingTracer(graph)
    proxies: Dict[torch.fx.Node, Proxy] = {}  # one proxy per node: `query is key` stays true

    def wrap(x):
        if isinstance(x, torch.fx.Node):
            return proxies.setdefault(x, Proxy(x, tracer))
        return x

    def attend(q, k, v, key_padding_mask=None):
        keep = None if key_padding_mask is None else key_padding_mask.node
        return Proxy(emit_op(graph, config, q.node, k.node, v.node, is_causal, dropout_p, key_padding_mask=keep),
                     tracer)

    out = block(attend, **{name: wrap(x) for name, x in inputs.items()})
    return out.node

