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
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch.fx
from torch import nn

from .fx_passes.backend import make_target
from .fx_passes.mha import weights_output_problem
from .fx_passes.report import Decider, Entry, RewriteRefused, RewriteReport
from .fx_passes.sdpa import rewrite_sdpa
from .module_swap import KIND, ConvertedMultiheadAttention, convert, mha_problem

_SIGNATURE = inspect.signature(nn.MultiheadAttention.forward)


def _call_problem(node: torch.fx.Node) -> Optional[str]:
    try:
        bound = _SIGNATURE.bind(None, *node.args, **node.kwargs)
    except TypeError as err:
        return f"arguments do not bind: {err}"
    bound.apply_defaults()
    a = bound.arguments
    if a["need_weights"] is not False:
        return "need_weights is not False (MHA's default is True; the dilated op returns no weights)"
    if a["key_padding_mask"] is not None:
        return "key_padding_mask is not supported by dilated attention"
    if not isinstance(a["is_causal"], bool):
        return f"is_causal {a['is_causal']!r} is not a Python bool"
    if a["attn_mask"] is not None and not a["is_causal"]:
        return "attn_mask without is_causal=True (an arbitrary mask) is not supported"
    return weights_output_problem(node)


def _convert_inside_leaves(gm, segment_lengths, dilation_rates, mode, implementation, select, strict,
                           report: RewriteReport) -> None:
    """Leaf modules of symbolic tracing (every ``torch.nn`` module, e.g. an
    ``nn.TransformerEncoder`` inside a model) hide their ``nn.MultiheadAttention`` calls in one
    ``call_module`` node: those MHAs are swapped by :func:`dilated_ops.convert`, whose calls the
    leaf's own code makes (what only a call shows raises ValueError at forward)."""
    done = set()
    for node in gm.graph.nodes:
        if node.op != "call_module" or node.target in done:
            continue
        leaf = gm.get_submodule(node.target)
        if isinstance(leaf, nn.MultiheadAttention) or not any(
                isinstance(m, nn.MultiheadAttention) for m in leaf.modules()):
            continue
        done.add(node.target)
        prefix = node.target + "."
        _, sub = convert(leaf, segment_lengths, dilation_rates, mode, implementation,
                         select=None if select is None else (lambda name: select(prefix + name)), strict=strict)
        for mine, theirs in ((report.rewritten, sub.rewritten), (report.refused, sub.refused),
                             (report.skipped, sub.skipped)):
            mine.extend(Entry(e.kind, node.name, prefix + e.module_path, e.reason) for e in theirs)


def rewrite_symbolic(
    gm: torch.fx.GraphModule,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    mode: str = "groups",
    implementation: str = "auto",
    select: Optional[Callable[[str], bool]] = None,
    strict: bool = False,
    example_inputs: Optional[tuple] = None,
) -> Tuple[torch.fx.GraphModule, RewriteReport]:
    """Rewrites ``gm`` (from ``torch.fx.symbolic_trace``) **in place**; returns ``(gm, report)``.

    ``F.scaled_dot_product_attention`` calls are rewritten when ``example_inputs`` (``gm``'s
    positional inputs) are given: they are run once under fake tensors to learn q/k/v shapes
    (nothing is computed); without them such calls are refused ("shapes unknown"). Their
    refusals are the compile backend's (masks, GQA, q/k/v of different shapes, too few heads),
    and ``select`` sees the module path of the SDPA call's module (``"blocks.0"``).

    ``nn.MultiheadAttention`` modules inside other leaf modules (``torch.fx`` does not trace into
    ``torch.nn`` modules: a model's ``nn.TransformerEncoder`` is one ``call_module`` node) are
    swapped as :func:`dilated_ops.convert` does, listed under their full path with the leaf's
    node.

    A module is swapped when every call of it can be: refused (listed with the reason, the
    module and all its calls kept; ``strict=True`` raises :class:`RewriteRefused`) are
    ``need_weights`` not ``False`` (MHA's default is True), ``key_padding_mask``, an
    ``attn_mask`` without ``is_causal=True``, a use of the weights output, and what
    :func:`dilated_ops.convert` refuses (``add_bias_kv``, ``add_zero_attn``, too few heads).
    Key and value of another length than the query (unknown when tracing) raise ValueError at
    forward. ``select(module_path)`` sees the node's target (``"layers.0.attn"``).
    """
    if not isinstance(gm, torch.fx.GraphModule):
        raise TypeError(f"gm must be a torch.fx.GraphModule (from torch.fx.symbolic_trace): got {type(gm).__name__}")
    target = make_target(segment_lengths, dilation_rates, mode, implementation)
    report = RewriteReport()
    calls: Dict[str, List[torch.fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), nn.MultiheadAttention):
            calls.setdefault(node.target, []).append(node)
    for path, nodes in calls.items():
        if select is not None and not select(path):
            report.skipped.extend(Entry(KIND, n.name, path, "not chosen by select") for n in nodes)
            continue
        mha = gm.get_submodule(path)
        problems = {n.name: mha_problem(mha, target) or _call_problem(n) for n in nodes}
        if any(problems.values()):
            for n in nodes:
                entry = Entry(KIND, n.name, path, problems[n.name] or "another call of this module is refused")
                report.refused.append(entry)
                if strict:
                    raise RewriteRefused(f"dilated_ops: left {entry}")
            continue
        new = ConvertedMultiheadAttention(mha, target.segment_lengths, target.dilation_rates,
                                          target.mode, target.backend, path)
        parent, _, name = path.rpartition(".")
        setattr(gm.get_submodule(parent) if parent else gm, name, new)
        report.rewritten.extend(Entry(KIND, n.name, path) for n in nodes)
    _convert_inside_leaves(gm, segment_lengths, dilation_rates, mode, implementation, select, strict, report)
    if example_inputs is not None:
        from torch._subclasses.fake_tensor import FakeTensorMode
        from torch.fx.passes.fake_tensor_prop import FakeTensorProp

        FakeTensorProp(gm, FakeTensorMode(allow_non_fake_inputs=True)).propagate(*example_inputs)
    if rewrite_sdpa(gm, target, Decider(report, select, strict)):
        gm.graph.lint()
        gm.recompile()
    return gm, report
