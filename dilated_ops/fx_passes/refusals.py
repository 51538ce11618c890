"""Why an attention call cannot become dilated attention: the refusal rules of each call kind,
in one place. Each function returns the reason as text, or None when the call can be rewritten.
The compile passes, the export pass, ``convert`` (at conversion and at its module's forward) and
``rewrite_symbolic`` all ask these.
"""
from __future__ import annotations

import operator
from typing import Optional

import torch
import torch.fx

from .config import RewriteConfig
from .provenance import bool_padding, example_value


def example_shape(arg) -> Optional[tuple]:
    """The shape recorded on an FX node (Dynamo's ``example_value`` or export's ``val``)."""
    if isinstance(arg, torch.fx.Node):
        value = example_value(arg)
        if value is not None and hasattr(value, "shape"):
            return tuple(value.shape)
    return None


def dropout_problem(config: RewriteConfig, dropout_p) -> Optional[str]:
    """Attention dropout where the variant's row says it has none."""
    if not config.variant.dropout and dropout_p:
        return f"dropout_p={dropout_p} is not supported by implementation {config.variant.name!r}"
    return None


def heads_problem(config: RewriteConfig, num_heads: int) -> Optional[str]:
    """Why the op would reject ``num_heads`` heads for this config."""
    if config.mode == "groups" and num_heads < config.num_groups:
        return f"{num_heads} heads cannot cover {config.num_groups} dilation groups (mode 'groups')"
    return None


# nn.MultiheadAttention --------------------------------------------------------------------

def mha_module_problem(config: RewriteConfig, num_heads, bias_k, bias_v, add_zero_attn, dropout) -> Optional[str]:
    """What an ``nn.MultiheadAttention`` (its attributes, or the same values passed to
    ``F.multi_head_attention_forward``; ``dropout`` as the call would apply it) asks for that
    the configured variant does not do."""
    if bias_k is not None or bias_v is not None:
        return "add_bias_kv=True is not supported"
    if add_zero_attn:
        return "add_zero_attn=True is not supported"
    return dropout_problem(config, dropout) or heads_problem(config, num_heads)


def mha_call_problem(variant, need_weights, key_padding_mask, attn_mask, is_causal) -> Optional[str]:
    """What one call of an ``nn.MultiheadAttention`` asks for that dilated attention does not
    do. An ``attn_mask`` with ``is_causal=True`` is taken to be the causal mask, as PyTorch's
    hint says. A bool ``key_padding_mask`` (True = padding) is taken where ``variant``'s row (of
    :data:`dilated_ops.variants.VARIANTS`) has masks; a float one (added to the scores) is refused."""
    if need_weights is not False:
        return ("need_weights=True (MHA's default): dilated attention returns no attention weights; "
                "pass need_weights=False")
    if key_padding_mask is not None:
        if not variant.masks:
            return f"key_padding_mask is not supported by implementation {variant.name!r}"
        dtype = getattr(example_value(key_padding_mask), "dtype", None)  # unknown on symbolic traces
        if dtype is not None and dtype != torch.bool:
            return (f"a {dtype} key_padding_mask (added to the scores) is not supported: pass a bool mask "
                    "(True = padding)")
    if not isinstance(is_causal, bool):
        return f"is_causal {is_causal!r} is not a Python bool"
    if attn_mask is not None and not is_causal:
        return "attn_mask without is_causal=True (an arbitrary mask) is not supported"
    return None


def static_heads_problem(embed_dim, num_heads) -> Optional[str]:
    if not (isinstance(embed_dim, int) and isinstance(num_heads, int)) or embed_dim % num_heads:
        return f"embed_dim {embed_dim!r} / num_heads {num_heads!r} not static ints dividing evenly"
    return None


def mha_functional_problem(config: RewriteConfig, a: dict, node: torch.fx.Node) -> Optional[str]:
    """A ``F.multi_head_attention_forward`` node with bound arguments ``a`` (Dynamo graphs)."""
    return (
        mha_call_problem(config.variant, a["need_weights"], bool_padding(a["key_padding_mask"]), a["attn_mask"],
                         a["is_causal"])
        or ("static_k/static_v are not supported" if a["static_k"] is not None or a["static_v"] is not None else None)
        or (None if a["query"] is a["key"] is a["value"] else "cross-attention (key/value not the query) is not supported")
        or _three_d_problem(a["query"])
        or static_heads_problem(a["embed_dim_to_check"], a["num_heads"])
        or mha_module_problem(config, a["num_heads"], a["bias_k"], a["bias_v"], a["add_zero_attn"],
                              a["dropout_p"] if a["training"] else 0.0)
        or weights_output_problem(node)
    )


def _three_d_problem(query) -> Optional[str]:
    shape = example_shape(query)
    if shape is not None and len(shape) != 3:
        return f"unbatched or non-3-D query (shape {shape}) is not supported"
    return None


def weights_output_problem(node: torch.fx.Node) -> Optional[str]:
    """Why an MHA call's ``(output, weights)`` result is used in a way the rewrite cannot keep:
    anything but ``getitem 0`` (and an unused ``getitem 1``)."""
    for user in node.users:
        if user.op != "call_function" or user.target is not operator.getitem or user.args[1] not in (0, 1):
            return f"the call's result is used by {user.format_node()} (expected getitem 0)"
        if user.args[1] == 1 and user.users:
            return "the attention weights output is used"
    return None


# F.scaled_dot_product_attention ----------------------------------------------------------

def sdpa_problem(config: RewriteConfig, a: dict) -> Optional[str]:
    """An SDPA call with bound arguments ``a`` (q ``(batch, heads, seq, head_dim)``, k and v
    with ``heads_kv`` heads): its scalar arguments and shapes. The mask, repeated K/V heads and
    where q, k, v come from are read off the graph by :func:`.sdpa.plan`."""
    variant = config.variant
    if a["attn_mask"] is not None and not variant.masks:
        return f"an attn_mask is not supported by implementation {variant.name!r}"
    if a["enable_gqa"] and not variant.gqa:
        return f"enable_gqa=True is not supported by implementation {variant.name!r}"
    if not isinstance(a["dropout_p"], (int, float)) or not isinstance(a["is_causal"], bool):
        return "dropout_p / is_causal are not Python constants"
    if not isinstance(a["enable_gqa"], bool):
        return "enable_gqa is not a Python constant"
    if a["scale"] is not None and not isinstance(a["scale"], float):
        return f"scale {a['scale']!r} is not a Python float"
    problem = dropout_problem(config, a["dropout_p"])
    if problem:
        return problem
    shapes = [example_shape(a[n]) for n in ("query", "key", "value")]
    if any(s is None for s in shapes):
        return "q/k/v shapes unknown (no shape metadata; for a symbolic_trace graph pass example_inputs)"
    # Compared as text: SymInt sizes (dynamic shapes) are unhashable, and comparing them here
    # would add guards after Dynamo has installed its own.
    q, k, v = ([str(x) for x in s] for s in shapes)
    if len(q) != 4 or len(k) != 4 or k != v or q[0] != k[0] or q[3] != k[3]:
        return f"q, k, v must be 4-D (batch, heads, seq, head_dim), k and v of one shape: got {shapes}"
    if q[2] != k[2]:
        return (f"query length {shapes[0][2]} differs from key length {shapes[1][2]} (cross-attention, or a "
                "decode step against a cache): dilated attention needs them equal")
    if q[1] != k[1] and not a["enable_gqa"]:
        return f"q has {shapes[0][1]} heads and k, v {shapes[1][1]} without enable_gqa=True"
    return heads_problem(config, shapes[0][1]) if isinstance(shapes[0][1], int) else None


def exported_sdpa_problem(a: dict, has_fake_values: bool) -> Optional[str]:
    """What the export pass refuses besides :func:`sdpa_problem`."""
    if a["dropout_p"] != 0.0:
        return f"dropout_p={a['dropout_p']} in an exported program (export in eval mode)"
    if not has_fake_values:
        return "no fake-tensor metadata (meta['val']) on the node"
    return None


# torch._transformer_encoder_layer_fwd (the encoder's fused eval fast path) ---------------

def encoder_fast_path_problem(config: RewriteConfig, a: dict) -> Optional[str]:
    """A fused encoder-layer node with bound arguments ``a``. A mask reaches the node merged,
    as a tensor, without the ``is_causal`` hint, so a causal mask cannot be told from an
    arbitrary one."""
    if a["mask"] is not None:
        return ("a mask (src_mask or src_key_padding_mask) reaches the fused fast path as a merged "
                "tensor without the is_causal hint, so it cannot be told from an arbitrary mask")
    shape = example_shape(a["src"])
    if shape is not None and len(shape) != 3:
        return f"non-3-D source (shape {shape}) is not supported"
    problem = static_heads_problem(a["embed_dim"], a["num_heads"])
    if problem:
        return problem
    if not all(isinstance(a[n], bool) for n in ("use_gelu", "norm_first")):
        return "use_gelu / norm_first are not Python constants"
    # eps: a float, or a graph input (a SymFloat under dynamic=True, before Dynamo specializes it).
    if not isinstance(a["eps"], (float, torch.fx.Node)):
        return f"eps {a['eps']!r} is neither a float nor a graph value"
    return heads_problem(config, a["num_heads"])
