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

from typing import Optional

import torch
import torch.fx
import torch.nn.functional as F

from ._emit import Target, emit_dilated, emit_packed_in_proj, heads_problem
from .report import Decider, example_shape

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


def _problem(a: dict, target: Target) -> Optional[str]:
    if a["mask"] is not None:
        return ("a mask (src_mask or src_key_padding_mask) reaches the fused fast path as a merged "
                "tensor without the is_causal hint, so it cannot be told from an arbitrary mask")
    shape = example_shape(a["src"])
    if shape is not None and len(shape) != 3:
        return f"non-3-D source (shape {shape}) is not supported"
    e, h = a["embed_dim"], a["num_heads"]
    if not (isinstance(e, int) and isinstance(h, int)) or e % h:
        return f"embed_dim {e!r} / num_heads {h!r} not static ints dividing evenly"
    if not all(isinstance(a[n], bool) for n in ("use_gelu", "norm_first")):
        return "use_gelu / norm_first are not Python constants"
    # eps: a float, or a graph input (a SymFloat under dynamic=True, before Dynamo specializes it).
    if not isinstance(a["eps"], (float, torch.fx.Node)):
        return f"eps {a['eps']!r} is neither a float nor a graph value"
    return heads_problem(target, h)


def _expand(graph: torch.fx.Graph, node: torch.fx.Node, a: dict, target: Target) -> torch.fx.Node:
    e, h = a["embed_dim"], a["num_heads"]

    def norm(x, i):
        return graph.call_function(F.layer_norm, (x, (e,), a[f"norm_weight_{i}"], a[f"norm_bias_{i}"], a["eps"]))

    def attn(x):  # (batch, seq, embed) -> (batch, seq, embed)
        q, k, v = (graph.call_function(torch.unflatten, (p, -1, (h, e // h)))
                   for p in emit_packed_in_proj(graph, x, a["qkv_weight"], a["qkv_bias"]))
        out = emit_dilated(graph, target, q, k, v, False, 0.0)
        out = graph.call_function(torch.flatten, (out, 2))
        return graph.call_function(F.linear, (out, a["proj_weight"], a["proj_bias"]))

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


def rewrite_fast_path(gm: torch.fx.GraphModule, target: Target, decider: Decider) -> int:
    count = 0
    for node, a in decider.calls(gm, KIND, _TARGETS, _bind, lambda node, a: _problem(a, target)):
        node.replace_all_uses_with(_expand(gm.graph, node, a, target))
        gm.graph.erase_node(node)
        decider.done(KIND, node)
        count += 1
    return count
