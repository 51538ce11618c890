"""The ``torch.fx.symbolic_trace`` pass (issue 4): in a traced ``GraphModule``, each
``call_module`` node whose module is an ``nn.MultiheadAttention`` (a leaf of symbolic tracing)
becomes a call of a :class:`~dilated_ops.module_swap.ConvertedMultiheadAttention` sharing its
Parameters, when the call's own arguments allow it; and, given example inputs (for the shapes
the checks need), ``F.scaled_dot_product_attention`` calls become the dilated op as in the
compile backend (:mod:`.fx_passes.sdpa`).

API layer, next to :mod:`.module_swap` whose module and refusals it reuses (fx_passes may not
import the API layer, and the swap needs the module): the converted module takes the
original's place under the same path, so the graph keeps its nodes and ``state_dict`` its keys.
"""
from __future__ import annotations

import inspect
from typing import Dict, List, Optional, Tuple

import torch.fx
from torch import nn

from .fx_passes import Decider, RewriteConfig, RewriteReport
from .fx_passes.refusals import mha_call_problem, weights_output_problem
from .fx_passes.sdpa import rewrite_sdpa
from .module_swap import KIND, ConvertedMultiheadAttention, mha_problem, swap_modules

_SIGNATURE = inspect.signature(nn.MultiheadAttention.forward)


def _call_problem(config: RewriteConfig, node: torch.fx.Node) -> Optional[str]:
    try:
        bound = _SIGNATURE.bind(None, *node.args, **node.kwargs)
    except TypeError as err:
        return f"arguments do not bind: {err}"
    bound.apply_defaults()
    a = bound.arguments
    return (mha_call_problem(config.variant, a["need_weights"], a["key_padding_mask"], a["attn_mask"], a["is_causal"])
            or weights_output_problem(node))


def _convert_inside_leaves(gm: torch.fx.GraphModule, decider: Decider) -> None:
    """Leaf modules of symbolic tracing (every ``torch.nn`` module, e.g. an
    ``nn.TransformerEncoder`` inside a model) hide their ``nn.MultiheadAttention`` calls in one
    ``call_module`` node: those MHAs are swapped as :func:`dilated_ops.convert` does, whose calls
    the leaf's own code makes (what only a call shows raises ValueError at forward)."""
    done = set()
    for node in gm.graph.nodes:
        if node.op != "call_module" or node.target in done:
            continue
        leaf = gm.get_submodule(node.target)
        if isinstance(leaf, nn.MultiheadAttention) or not any(
                isinstance(m, nn.MultiheadAttention) for m in leaf.modules()):
            continue
        done.add(node.target)
        sub = Decider(decider.config)
        swap_modules(leaf, sub, prefix=node.target + ".")
        decider.report.extend(sub.report, lambda e: type(e)(e.kind, node.name, e.module_path, e.reason))


def rewrite_symbolic(gm: torch.fx.GraphModule, *config, example_inputs: Optional[tuple] = None,
                     **options) -> Tuple[torch.fx.GraphModule, RewriteReport]:
    """Rewrites ``gm`` (from ``torch.fx.symbolic_trace``) **in place**.

    Args:
        gm: a ``torch.fx.GraphModule`` from ``torch.fx.symbolic_trace``.
        config, options: a :class:`~dilated_ops.RewriteConfig`, or its fields
            (``segment_lengths, dilation_rates, mode="groups", implementation="auto",
            select=None, strict=False``); ``select(module_path)`` sees the node's target
            (``"layers.0.attn"``).
        example_inputs: ``gm``'s positional inputs, run once under fake tensors to learn the
            q/k/v shapes of ``F.scaled_dot_product_attention`` calls (nothing is computed);
            without them such calls are refused ("shapes unknown").

    Returns:
        ``(gm, report)``.

    SDPA calls are refused as by the compile backend (masks, GQA, q/k/v of different shapes, too
    few heads), ``select`` seeing the module path of the SDPA call's module (``"blocks.0"``).
    ``nn.MultiheadAttention`` modules inside other leaf modules (``torch.fx`` does not trace into
    ``torch.nn`` modules: a model's ``nn.TransformerEncoder`` is one ``call_module`` node) are
    swapped as :func:`dilated_ops.convert` does, listed under their full path with the leaf's
    node. A module is swapped when every call of it can be: refused (listed with the reason, the
    module and all its calls kept; ``strict=True`` raises) are ``need_weights`` not ``False``
    (MHA's default is True), a float ``key_padding_mask``, an ``attn_mask`` without ``is_causal=True``, a
    use of the weights output, and what :func:`dilated_ops.convert` refuses (``add_bias_kv``,
    ``add_zero_attn``, too few heads). Key and value of another length than the query (unknown
    when tracing) raise ValueError at forward.
    """
    if not isinstance(gm, torch.fx.GraphModule):
        raise TypeError(f"gm must be a torch.fx.GraphModule (from torch.fx.symbolic_trace): got {type(gm).__name__}")
    decider = Decider(RewriteConfig.of(*config, **options))
    calls: Dict[str, List[torch.fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), nn.MultiheadAttention):
            calls.setdefault(node.target, []).append(node)
    for path, nodes in calls.items():
        mha = gm.get_submodule(path)
        problems = {n.name: mha_problem(mha, decider.config) or _call_problem(decider.config, n) for n in nodes}
        if not all([decider.selected(KIND, path, n.name) for n in nodes]):  # each unselected call listed
            continue
        if any(problems.values()):
            for n in nodes:
                decider.refuse(KIND, path, problems[n.name] or "another call of this module is refused", n.name)
            continue
        new = ConvertedMultiheadAttention(mha, decider.config, path)
        parent, _, name = path.rpartition(".")
        setattr(gm.get_submodule(parent) if parent else gm, name, new)
        for n in nodes:
            decider.done(KIND, path, n.name)
    _convert_inside_leaves(gm, decider)
    if example_inputs is not None:
        from torch._subclasses.fake_tensor import FakeTensorMode
        from torch.fx.passes.fake_tensor_prop import FakeTensorProp

        FakeTensorProp(gm, FakeTensorMode(allow_non_fake_inputs=True)).propagate(*example_inputs)
    if rewrite_sdpa(gm, decider):
        gm.graph.lint()
        gm.recompile()
    return gm, decider.report
