"""Rewrites ``F.multi_head_attention_forward`` calls (what ``nn.MultiheadAttention`` and the
training path of ``nn.TransformerEncoderLayer`` become in a Dynamo graph) into the in-projection,
``torch.ops.dilated.dilated_attention`` and the out-projection, keeping the call's own weights.

Supported: self-attention (query, key and value one node), sequence-first 3-D input (what the
call receives for batch_first modules too), packed ``in_proj_weight`` or separate
``q/k/v_proj_weight``, biases or none, ``is_causal=True`` (its mask is taken to be the causal one,
as PyTorch's hint says), dropout (``dropout_p`` passed to the op when ``training``; the draws
differ from PyTorch's). Refused, left untouched and reported: ``need_weights=True``,
``key_padding_mask``, an ``attn_mask`` without ``is_causal=True``, ``bias_k``/``bias_v``
(``add_bias_kv``), ``add_zero_attn``, ``static_k``/``static_v``, cross-attention, unbatched input,
fewer heads than dilation groups, a use of the attention weights output.
"""
from __future__ import annotations

import inspect
import operator
from typing import Optional

import torch
import torch.fx
import torch.nn.functional as F

from ._emit import Target, emit_dilated, emit_packed_in_proj, heads_problem
from .report import Decider, example_shape

KIND = "multi_head_attention_forward"
_SIGNATURE = inspect.signature(F.multi_head_attention_forward)


def weights_output_problem(node: torch.fx.Node) -> Optional[str]:
    """Why an MHA call's ``(output, weights)`` result is used in a way the rewrite cannot keep:
    anything but ``getitem 0`` (and an unused ``getitem 1``)."""
    for user in node.users:
        if user.op != "call_function" or user.target is not operator.getitem or user.args[1] not in (0, 1):
            return f"the call's result is used by {user.format_node()} (expected getitem 0)"
        if user.args[1] == 1 and user.users:
            return "the attention weights output is used"
    return None


def _problem(a: dict, node: torch.fx.Node, target: Target) -> Optional[str]:
    if a["need_weights"]:
        return "need_weights=True (the dilated op returns no attention weights)"
    if a["key_padding_mask"] is not None:
        return "key_padding_mask is not supported by dilated attention"
    if a["attn_mask"] is not None and not a["is_causal"]:
        return "attn_mask without is_causal=True (an arbitrary mask) is not supported"
    if a["bias_k"] is not None or a["bias_v"] is not None:
        return "bias_k/bias_v (add_bias_kv=True) are not supported"
    if a["add_zero_attn"]:
        return "add_zero_attn=True is not supported"
    if a["static_k"] is not None or a["static_v"] is not None:
        return "static_k/static_v are not supported"
    if not (a["query"] is a["key"] is a["value"]):
        return "cross-attention (key/value not the query) is not supported"
    shape = example_shape(a["query"])
    if shape is not None and len(shape) != 3:
        return f"unbatched or non-3-D query (shape {shape}) is not supported"
    e, h = a["embed_dim_to_check"], a["num_heads"]
    if not (isinstance(e, int) and isinstance(h, int)) or e % h:
        return f"embed_dim {e!r} / num_heads {h!r} not static ints dividing evenly"
    problem = heads_problem(target, h)
    if problem:
        return problem
    return weights_output_problem(node)


def _rewrite(graph: torch.fx.Graph, node: torch.fx.Node, a: dict, target: Target) -> None:
    x, e, h = a["query"], a["embed_dim_to_check"], a["num_heads"]
    d = e // h
    dropout_p = float(a["dropout_p"]) if a["training"] else 0.0
    with graph.inserting_before(node):
        if a["use_separate_proj_weight"]:
            b = a["in_proj_bias"]
            if b is not None:
                chunks = graph.call_function(torch.chunk, (b, 3))
                bq, bk, bv = (graph.call_function(operator.getitem, (chunks, i)) for i in range(3))
            else:
                bq = bk = bv = None
            proj = [graph.call_function(F.linear, (x, a[w], bias))
                    for w, bias in (("q_proj_weight", bq), ("k_proj_weight", bk), ("v_proj_weight", bv))]
        else:
            proj = emit_packed_in_proj(graph, x, a["in_proj_weight"], a["in_proj_bias"])
        # (seq, batch, embed) -> (batch, seq, heads, head_dim)
        q, k, v = (graph.call_function(torch.transpose, (
            graph.call_function(torch.unflatten, (p, -1, (h, d))), 0, 1)) for p in proj)
        out = emit_dilated(graph, target, q, k, v, a["is_causal"], dropout_p)
        out = graph.call_function(torch.transpose, (out, 0, 1))          # (seq, batch, heads, hd)
        out = graph.call_function(torch.flatten, (out, 2))              # (seq, batch, embed)
        out = graph.call_function(F.linear, (out, a["out_proj_weight"], a["out_proj_bias"]))
    for user in list(node.users):
        if user.args[1] == 0:
            user.replace_all_uses_with(out)
        graph.erase_node(user)
    graph.erase_node(node)


def _bind(node: torch.fx.Node) -> dict:
    bound = _SIGNATURE.bind(*node.args, **node.kwargs)
    bound.apply_defaults()
    return dict(bound.arguments)


def rewrite_mha(gm: torch.fx.GraphModule, target: Target, decider: Decider) -> int:
    count = 0
    for node, a in decider.calls(gm, KIND, (F.multi_head_attention_forward,), _bind,
                                 lambda node, a: _problem(a, node, target)):
        _rewrite(gm.graph, node, a, target)
        decider.done(KIND, node)
        count += 1
    return count

