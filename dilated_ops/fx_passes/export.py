"""ATen-level pass over ``torch.export`` programs: each ``aten.scaled_dot_product_attention``
node on ``(batch, heads, seq, head_dim)`` becomes ``torch.ops.dilated.dilated_attention`` between
``aten.transpose`` nodes (bhnd <-> bnhd). What ``torch.export.export`` produces (the training /
pre-dispatch IR, default since torch 2.6) keeps SDPA as one node, both for functional
``F.scaled_dot_product_attention`` calls and for ``nn.MultiheadAttention``, whose forward
reaches it through ``F.multi_head_attention_forward``; after ``run_decompositions()`` SDPA is
decomposed and nothing is found (rewrite first, decompose after).

Route: the graph of a deep copy of the program is edited in place; every inserted node gets
``meta["val"]`` (computed under the program's own fake mode, so symbolic sizes of dynamic
shapes carry through), the SDPA node's ``nn_module_stack`` and ``stack_trace``. The graph
signature, state dict and range constraints are unchanged (no inputs or outputs are added),
so ``torch.export.save``/``load`` and ``ep.module()`` work as before. (Re-exporting
``ep.module()`` was the alternative; it needs example inputs and the dynamic-shape specs again.)

Refused as in :mod:`.sdpa` (masks, ``enable_gqa``, q/k/v of different shapes: cross-attention
with another key length, GQA) plus ``dropout_p > 0`` (export in eval mode: a dropout seed
would be a random op in the program).
"""
from __future__ import annotations

import copy
from typing import Tuple

import torch
import torch.fx

from .config import RewriteConfig
from .refusals import exported_sdpa_problem
from .report import Decider, RewriteReport
from .sdpa import KIND, emit_transposed, replace, sdpa_calls

_SDPA = torch.ops.aten.scaled_dot_product_attention.default
_TRANSPOSE = torch.ops.aten.transpose.int
_COPIED_META = ("nn_module_stack", "stack_trace", "source_fn_stack")


def _fake_mode(node: torch.fx.Node):
    val = node.meta.get("val")
    return getattr(val, "fake_mode", None)


def _fill_meta(graph: torch.fx.Graph, before: set, template: torch.fx.Node, fake_mode) -> None:
    """``meta["val"]`` (and the SDPA node's module metadata) for the nodes not in ``before``."""
    for node in graph.nodes:
        if node in before:
            continue
        args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), lambda n: n.meta["val"])
        with fake_mode:
            node.meta["val"] = node.target(*args, **kwargs)
        for key in _COPIED_META:
            if key in template.meta:
                node.meta[key] = template.meta[key]


def rewrite_graph(gm: torch.fx.GraphModule, decider: Decider) -> int:
    """Rewrites the SDPA nodes of an exported program's graph module in place."""
    graph, count = gm.graph, 0
    problem = lambda node, a: exported_sdpa_problem(a, _fake_mode(node) is not None)  # noqa: E731
    for node, a, p in sdpa_calls(gm, (_SDPA,), decider, problem):
        before = set(graph.nodes)
        with graph.inserting_before(node):
            out = emit_transposed(graph, decider.config, a, p, 0.0, _TRANSPOSE, torch.ops.aten.ne.Scalar)
        _fill_meta(graph, before, node, _fake_mode(node))
        replace(node, out)
        decider.node_done(KIND, node)
        count += 1
    if count:
        graph.lint()
        gm.recompile()
    return count


def rewrite_exported(ep: "torch.export.ExportedProgram", *config, **options
                     ) -> Tuple["torch.export.ExportedProgram", RewriteReport]:
    """A copy of ``ep`` whose ``aten.scaled_dot_product_attention`` nodes are the configured
    variant's op, and the :class:`RewriteReport`.

    Args:
        ep: a ``torch.export.ExportedProgram`` (left as it is).
        config, options: a :class:`RewriteConfig`, or its fields (``segment_lengths,
            dilation_rates, mode="groups", implementation="auto", select=None, strict=False``);
            ``select(module_path)`` sees the path of the module that made the call (from
            ``nn_module_stack``: ``"blocks.0.attn"``, ``""`` for the top module).

    Returns:
        ``(program, report)``.
    """
    if not isinstance(ep, torch.export.ExportedProgram):
        raise TypeError(f"ep must be a torch.export.ExportedProgram: got {type(ep).__name__}")
    decider = Decider(RewriteConfig.of(*config, **options))
    new = copy.deepcopy(ep)
    rewrite_graph(new.graph_module, decider)
    return new, decider.report
