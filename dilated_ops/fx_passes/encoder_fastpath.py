"""Expands ``torch._transformer_encoder_layer_fwd`` (``nn.TransformerEncoderLayer``'s fused eval
fast path, taken in eval mode under ``torch.no_grad()``; one node per layer in a Dynamo graph)
into the layer's decomposed computation with ``torch.ops.dilated.dilated_attention`` as its
attention, on the weights the node already receives.

The node is batch-first ``(batch, seq, embed)`` and computes, with ``act`` relu or gelu
(``use_gelu``) and ``ffn(y) = linear2(act(linear1(y)))``::

    norm_first:  x = src + attn(ln1(src));  out = x + ffn(ln2(x))
    otherwise:   x = ln1(src + attn(src));  out = ln2(x + ffn(x))

where ``attn`` is the packed in-projection, attention and out-projection (``eps`` is the
layer's ``norm1.eps``, used for both norms as the fast path does). Refused, left untouched and
reported: a mask (attention or key padding mask: the fast path receives it merged, as a tensor,
without the ``is_causal`` hint, so a causal mask cannot be told from an arbitrary one), a source
that is not 3-D, ``embed_dim``/``num_heads`` that are not static ints dividing evenly, fewer
heads than dilation groups.
"""
from __future__ import annotations

import torch
import torch.fx
import torch.nn.functional as F

from ..attention_block import attention_block, packed_in_projection
from ._emit import emit_block
from .refusals import encoder_fast_path_problem
from .report import Decider

KIND = "_transformer_encoder_layer_fwd"
_TARGETS = (torch._transformer_encoder_layer_fwd, torch.ops.aten._transformer_encoder_layer_fwd.default)
_NAMES = ("src", "embed_dim", "num_heads", "qkv_weight", "qkv_bias", "proj_weight", "proj_bias",
          "use_gelu", "norm_first", "eps", "norm_weight_1", "norm_bias_1", "norm_weight_2",
          "norm_bias_2", "ffn_weight_1", "ffn_bias_1", "ffn_weight_2", "ffn_bias_2", "mask",
          "mask_type")


def _bind(node: torch.fx.Node) -> dict:
    a = dict(zip(_NAMES, node.args))
    for name, value in node.kwargs.items():
        if name not in _NAMES or name in a:
            raise TypeError(f"unexpected keyword {name!r}")
        a[name] = value
    a.setdefault("mask", None)
    a.setdefault("mask_type", None)
    missing = [n for n in _NAMES if n not in a]
    if missing:
        raise TypeError(f"missing {missing}")
    return a


def _expand(graph: torch.fx.Graph, node: torch.fx.Node, a: dict, config) -> torch.fx.Node:
    e, h = a["embed_dim"], a["num_heads"]

    def norm(x, i):
        return graph.call_function(F.layer_norm, (x, (e,), a[f"norm_weight_{i}"], a[f"norm_bias_{i}"], a["eps"]))

    def attn(x):  # (batch, seq, embed) -> (batch, seq, embed)
        def block(attend, x, w, b, out_w, out_b):
            return attention_block(x, x, x, lambda q, k, v: packed_in_projection(q, k, v, w, b), attend,
                                   lambda y: F.linear(y, out_w, out_b), h, e // h)

        inputs = {"x": x, "w": a["qkv_weight"], "b": a["qkv_bias"], "out_w": a["proj_weight"],
                  "out_b": a["proj_bias"]}
        return emit_block(graph, config, inputs, block, False, 0.0)

    def ffn(x):
        x = graph.call_function(F.linear, (x, a["ffn_weight_1"], a["ffn_bias_1"]))
        x = graph.call_function(F.gelu if a["use_gelu"] else F.relu, (x,))
        return graph.call_function(F.linear, (x, a["ffn_weight_2"], a["ffn_bias_2"]))

    def add(x, y):
        return graph.call_function(torch.add, (x, y))

    src = a["src"]
    with graph.inserting_before(node):
        if a["norm_first"]:
            x = add(src, attn(norm(src, 1)))
            return add(x, ffn(norm(x, 2)))
        x = norm(add(src, attn(src)), 1)
        return norm(add(x, ffn(x)), 2)


def rewrite_fast_path(gm: torch.fx.GraphModule, decider: Decider) -> int:
    count = 0
    config = decider.config
    for node, a in decider.calls(gm, KIND, _TARGETS, _bind, lambda node, a: encoder_fast_path_problem(config, a)):
        node.replace_all_uses_with(_expand(gm.graph, node, a, config))
        gm.graph.erase_node(node)
        decider.node_done(KIND, node)
        count += 1
    return count
