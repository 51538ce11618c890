"""Where an attention call's inputs come from, read off the graph (issue 21): what a boolean
``attn_mask`` is (:func:`explain_mask`), K/V heads repeated for grouped-query attention
(:func:`unrepeated_kv`), the bool key padding mask behind ``nn.MultiheadAttention``'s float one
(:func:`bool_padding`), and whether q, k, v are projections of the same hidden states
(:func:`cross_attention_problem`). Works on Dynamo graphs (torch functions and methods) and on
exported ATen graphs alike.
"""
from __future__ import annotations

import operator
from typing import List, NamedTuple, Optional, Set, Union

import torch
import torch.fx

# A mask is inspected by running the graph nodes that build it on probe inputs; above this many
# elements (the mask materialized at the graph's own sizes) it is not.
MAX_PROBE_ELEMENTS = 2**28


def example_value(node):
    """The value recorded on an FX node (Dynamo's ``example_value`` or export's ``val``), or
    ``node`` itself when it is not a node."""
    if isinstance(node, torch.fx.Node):
        return node.meta.get("example_value", node.meta.get("val"))
    return node


def _concrete(x) -> int:
    """A size as an int (a SymInt's hint under dynamic shapes)."""
    if isinstance(x, torch.SymInt):
        return int(x.node.hint)
    return int(x)


def _walk(node: torch.fx.Node, stop=lambda n: False) -> Set[torch.fx.Node]:
    """``node`` and the nodes it depends on, not walking past nodes where ``stop(n)``."""
    seen: Set[torch.fx.Node] = set()
    stack = [node]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if not stop(n):
            stack.extend(n.all_input_nodes)
    return seen


def _ancestors(node: torch.fx.Node) -> List[torch.fx.Node]:
    """``node`` and every node it depends on, in graph order."""
    seen = _walk(node)
    return [n for n in node.graph.nodes if n in seen]


class MaskMeaning(NamedTuple):
    """A boolean ``attn_mask`` explained: causal or not, and the ``(batch, seq)`` key padding
    input it reads (True/nonzero = keep), or None."""

    is_causal: bool
    padding: Optional[torch.fx.Node]


def explain_mask(gm: torch.fx.GraphModule, mask: torch.fx.Node, batch: int, q_len: int,
                 k_len: int) -> Union[MaskMeaning, str]:
    """What a boolean ``attn_mask`` node of an SDPA call with q ``(batch, ., q_len, .)`` and k
    of ``k_len`` keys is: causal, key padding (built from one ``(batch, k_len)`` graph input, as
    transformers' ``sdpa_mask`` and ``create_causal_mask`` build it, or a broadcast ``(batch,
    1, 1, seq)`` padding mask), or both; else the reason it is refused, naming what it is.

    The nodes that build the mask are run on probe values of that input (every key kept, random
    keys kept, a batch row with none) and the result compared with each explanation; a mask
    from more than one input, or from no input but not causal, is refused."""
    value = example_value(mask)
    if value is None or not hasattr(value, "dtype"):
        return "an attn_mask without shape metadata"
    if value.dtype != torch.bool:
        return "a float attn_mask (an additive bias) is not supported by dilated attention (use is_causal=True)"
    try:
        batch, q_len, k_len = (_concrete(x) for x in (batch, q_len, k_len))
        numel = 1
        for x in value.shape:
            numel *= _concrete(x)
    except (TypeError, AttributeError):
        return "a boolean attn_mask of unknown size"
    if numel > MAX_PROBE_ELEMENTS:
        return (f"a boolean attn_mask of {numel} elements, too large to inspect (at most {MAX_PROBE_ELEMENTS}); "
                "pass no mask and is_causal=True, or the padding through the op's key_padding_mask")
    nodes = _ancestors(mask)
    inputs = [n for n in nodes if n.op == "placeholder" and isinstance(example_value(n), torch.Tensor)]
    if len(inputs) > 1:
        return (f"a boolean attn_mask built from {len(inputs)} inputs ({', '.join(n.name for n in inputs)}): not a "
                "key padding mask")
    pad = inputs[0] if inputs else None
    if pad is not None:
        shape = tuple(_concrete(x) for x in example_value(pad).shape)
        if shape != (batch, k_len):
            return (f"a boolean attn_mask built from input {pad.name} of shape {shape}, not a (batch, seq) = "
                    f"{(batch, k_len)} key padding mask")
    probe = _probe_module(gm, nodes, mask)
    if probe is None:
        return "a boolean attn_mask whose construction could not be run on probe values"
    g = torch.Generator().manual_seed(0)
    keeps = [torch.ones(batch, k_len, dtype=torch.bool), torch.rand(batch, k_len, generator=g) > 0.4]
    keeps[1][0] = False
    causal = torch.ones(q_len, k_len, dtype=torch.bool).tril(k_len - q_len)
    fits = {(c, p): True for c in (False, True) for p in ((False, True) if pad is not None else (False,))}
    for keep in keeps:
        try:
            got = probe(keep, pad, nodes)
        except Exception:  # noqa: BLE001 - any failure means the mask is not understood
            return "a boolean attn_mask whose construction could not be run on probe values"
        try:  # (batch or 1, heads or 1, q_len or 1, k_len)
            got = got.cpu().expand(batch, got.shape[1], q_len, k_len)
        except RuntimeError:
            got = None
        if got is None or got.dim() != 4:
            return f"a boolean attn_mask that does not broadcast to (batch, heads, {q_len}, {k_len})"
        for c, p in fits:
            want = (causal if c else torch.ones_like(causal)) & (keep[:, None, None, :] if p else True)
            fits[(c, p)] = fits[(c, p)] and torch.equal(got, want.expand_as(got))
    for (c, p), ok in sorted(fits.items(), key=lambda kv: (kv[0][1], kv[0][0])):  # the simplest first
        if ok:
            return MaskMeaning(c, pad if p else None)
    return ("a boolean attn_mask that is neither causal, key padding nor both (a sliding-window, chunked, "
            "packed-document or arbitrary mask)")


def _probe_module(gm: torch.fx.GraphModule, nodes: List[torch.fx.Node], mask: torch.fx.Node):
    """A runner of the mask's construction: ``run(keep, pad_node, nodes)`` evaluates ``nodes``
    with ``pad_node`` (if any) set to ``keep`` in its dtype and device, sizes at their hints."""
    def run(keep, pad, nodes):
        env = {}
        for n in nodes:
            if n.op == "placeholder":
                v = example_value(n)
                if n is pad:
                    env[n] = keep.to(device=v.device, dtype=v.dtype)
                elif isinstance(v, (torch.SymInt, int)):
                    env[n] = _concrete(v)
                else:
                    raise ValueError(f"unexpected input {n.name}")
            elif n.op == "get_attr":
                target = gm
                for part in n.target.split("."):
                    target = getattr(target, part)
                env[n] = target
            elif n.op in ("call_function", "call_method"):
                args, kwargs = torch.fx.node.map_arg((n.args, n.kwargs), lambda x: env[x])
                env[n] = (n.target(*args, **kwargs) if n.op == "call_function"
                          else getattr(args[0], n.target)(*args[1:], **kwargs))
            else:
                raise ValueError(f"unexpected node {n.op}")
        return env[mask]

    if any(n.op == "call_module" for n in nodes):
        return None
    return run


# K/V heads repeated for grouped-query attention ---------------------------------------------

_UNSQUEEZE_2 = (slice(None), slice(None), None, slice(None), slice(None))


def _fill_target(node) -> bool:
    return (node.op == "call_method" and node.target in ("masked_fill_", "masked_fill")) or (
        node.op == "call_function" and node.target in (torch.masked_fill, torch.Tensor.masked_fill_,
                                                       torch.Tensor.masked_fill))


def bool_padding(node):
    """``nn.MultiheadAttention`` turns a bool ``key_padding_mask`` into a float one before
    ``F.multi_head_attention_forward`` (``F._canonical_mask``: zeros with ``-inf`` where True):
    for such a node, the bool mask it was made of; ``node`` itself otherwise (a bool mask
    passed as it is, or a float mask of other making)."""
    if not isinstance(node, torch.fx.Node) or not _fill_target(node) or len(node.args) != 3:
        return node
    base, where, fill = node.args
    if not (isinstance(fill, float) and fill == float("-inf") and isinstance(base, torch.fx.Node)
            and isinstance(where, torch.fx.Node)):
        return node
    zeros = base.op == "call_function" and base.target in (torch.zeros_like, torch.ops.aten.zeros_like.default)
    kept = getattr(example_value(where), "dtype", None) == torch.bool
    return where if zeros and base.args and base.args[0] is where and kept else node


def _is_getitem_none_at_2(node) -> bool:
    if node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[1], tuple):
        index = node.args[1]
        return len(index) == 5 and index[2] is None and all(
            isinstance(i, slice) and i == slice(None) for j, i in enumerate(index) if j != 2)
    return (node.op == "call_method" and node.target == "unsqueeze" and node.args[1:] == (2,)) or (
        node.op == "call_function" and node.target in (torch.unsqueeze, torch.ops.aten.unsqueeze.default)
        and node.args[1:] == (2,))


def unrepeated_kv(node) -> Optional[torch.fx.Node]:
    """The ``(batch, heads_kv, seq, head_dim)`` tensor whose heads ``node`` repeats, when ``node``
    is ``x[:, :, None].expand(b, h_kv, n_rep, s, d).reshape(b, h_kv * n_rep, s, d)`` (transformers'
    ``repeat_kv``, each KV head repeated for its query heads in order), else None."""
    if not isinstance(node, torch.fx.Node) or node.op not in ("call_method", "call_function"):
        return None
    names = ("reshape", "view")
    if not (node.op == "call_method" and node.target in names or node.target in (
            torch.reshape, torch.ops.aten.reshape.default, torch.ops.aten.view.default)):
        return None
    expand = node.args[0]
    if not isinstance(expand, torch.fx.Node) or not (
            (expand.op == "call_method" and expand.target == "expand")
            or expand.target is torch.ops.aten.expand.default):
        return None
    inner = expand.args[0]
    if not isinstance(inner, torch.fx.Node) or not _is_getitem_none_at_2(inner):
        return None
    source = inner.args[0]
    src, out = example_value(source), example_value(node)
    if src is None or out is None or src.dim() != 4 or out.dim() != 4:
        return None
    if str(src.shape[0]) != str(out.shape[0]) or str(src.shape[2:]) != str(out.shape[2:]):
        return None
    return source


# self- or cross-attention ------------------------------------------------------------------

_LINEARS = {torch._C._nn.linear: 0, torch.nn.functional.linear: 0, torch.ops.aten.linear.default: 0,
            torch.addmm: 1, torch.ops.aten.addmm.default: 1}


def _projection_inputs(node: torch.fx.Node) -> Set[torch.fx.Node]:
    """The inputs of the nearest projections (linear layers) ``node`` is computed from."""
    def is_projection(n):
        return n.op == "call_function" and n.target in _LINEARS

    return {_through_reshapes(n.args[_LINEARS[n.target]]) for n in _walk(node, is_projection) if is_projection(n)}


_LAYOUT_METHODS = ("view", "reshape", "transpose", "permute", "contiguous")
_LAYOUT_FUNCTIONS = (torch.reshape, torch.transpose, torch.permute, torch.ops.aten.view.default,
                     torch.ops.aten.reshape.default, torch.ops.aten.transpose.int, torch.ops.aten.permute.default,
                     torch.ops.aten.clone.default)


def _through_reshapes(node):
    # The hidden states behind a projection's input: GPT-2's Conv1D projects x.view(-1, nx),
    # nn.MultiheadAttention(batch_first=True) transposes query, key and value one by one.
    while isinstance(node, torch.fx.Node) and (
            (node.op == "call_method" and node.target in _LAYOUT_METHODS)
            or (node.op == "call_function" and node.target in _LAYOUT_FUNCTIONS)):
        node = node.args[0]
    return node


def cross_attention_problem(q, k, v) -> Optional[str]:
    """Why q, k, v are not self-attention: k or v is projected from other states than q (an encoder's states in a decoder's cross-attention), whatever the shapes. None
    when they share their source, or when no projection is found (q, k, v given as they are)."""
    sources = [_projection_inputs(x) if isinstance(x, torch.fx.Node) else set() for x in (q, k, v)]
    if not sources[0]:
        return None
    for name, src in (("key", sources[1]), ("value", sources[2])):
        if src and not (src & sources[0]):
            return (f"cross-attention: the {name} is projected from {', '.join(sorted(n.name for n in src))}, "
                    f"the query from {', '.join(sorted(n.name for n in sources[0]))} (dilated attention is "
                    "self-attention only)")
    return None
