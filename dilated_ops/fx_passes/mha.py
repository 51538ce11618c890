"""Rewrites ``F.multi_head_attention_forward`` calls (what ``nn.MultiheadAttention`` and the
training path of ``nn.TransformerEncoderLayer`` become in a Dynamo graph) into the attention
block (in-projection, the configured variant's op, out-projection) on the call's own weights.

Supported: self-attention (query, key and value one node), sequence-first 3-D input (what the
call receives for batch_first modules too), packed ``in_proj_weight`` or separate
``q/k/v_proj_weight``, biases or none, a bool ``key_padding_mask`` (``(batch, seq)``, True =
padding, as MHA takes it), ``is_causal=True`` (its mask is taken to be the causal one,
as PyTorch's hint says), dropout (``dropout_p`` passed to the op when ``training``; the draws
differ from PyTorch's). Refused, left untouched and reported:
:func:`.refusals.mha_functional_problem`.
"""
from __future__ import annotations

import inspect

import torch.fx
import torch.nn.functional as F

from ..attention_block import attention_block, packed_in_projection
from ._emit import emit_block
from .provenance import bool_padding
from .refusals import mha_functional_problem
from .report import Decider

KIND = "multi_head_attention_forward"
_SIGNATURE = inspect.signature(F.multi_head_attention_forward)


def _bind(node: torch.fx.Node) -> dict:
    bound = _SIGNATURE.bind(*node.args, **node.kwargs)
    bound.apply_defaults()
    return dict(bound.arguments)


def _rewrite(graph: torch.fx.Graph, node: torch.fx.Node, a: dict, decider: Decider) -> None:
    h = a["num_heads"]
    d = a["embed_dim_to_check"] // h

    def block(attend, x, in_w, in_b, q_w, k_w, v_w, out_w, out_b, padding):
        separate = (q_w, k_w, v_w) if a["use_separate_proj_weight"] else None
        keep = None if padding is None else ~padding  # MHA's True = padding; the op's True = keep
        return attention_block(
            x, x, x, lambda q, k, v: packed_in_projection(q, k, v, in_w, in_b, separate),
            lambda q, k, v: attend(q, k, v, keep), lambda y: F.linear(y, out_w, out_b), h, d, seq_first=True)

    inputs = {"x": a["query"], "in_w": a["in_proj_weight"], "in_b": a["in_proj_bias"], "q_w": a["q_proj_weight"],
              "k_w": a["k_proj_weight"], "v_w": a["v_proj_weight"], "out_w": a["out_proj_weight"],
              "out_b": a["out_proj_bias"], "padding": bool_padding(a["key_padding_mask"])}
    dropout_p = float(a["dropout_p"]) if a["training"] else 0.0
    with graph.inserting_before(node):
        out = emit_block(graph, decider.config, inputs, block, a["is_causal"], dropout_p)
    for user in list(node.users):
        if user.args[1] == 0:
            user.replace_all_uses_with(out)
        graph.erase_node(user)
    graph.erase_node(node)


def rewrite_mha(gm: torch.fx.GraphModule, decider: Decider) -> int:
    count = 0
    config = decider.config
    for node, a in decider.calls(gm, KIND, (F.multi_head_attention_forward,), _bind,
                                 lambda node, a: mha_functional_problem(config, a, node)):
        _rewrite(gm.graph, node, a, decider)
        decider.node_done(KIND, node)
        count += 1
    return count
