"""Hugging Face transformers: ``attn_implementation="dilated"`` (issue 22).

:func:`register` adds ``"dilated"`` to transformers' ``AttentionInterface`` (the attention
function) and ``AttentionMaskInterface`` (its mask function), so ``from_config(cfg,
attn_implementation="dilated")`` and ``model.set_attn_implementation("dilated")`` run dilated
attention. ``import dilated_ops`` calls it when transformers is already imported (importing it
costs seconds, so we do not import it ourselves); otherwise call it once.

The segments come from one config attribute, ``config.dilated_attention = {"segment_lengths":
[...], "dilation_rates": [...], "mode": "longnet"}`` (``mode`` optional, default ``"longnet"``:
every head sees every branch, the paper's combine); without it, :func:`default_config` of
``max_position_embeddings``.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..functional import dilated_attention, dilated_attention_decode

NAME = "dilated"


def default_config(max_positions: int) -> dict:
    """Segments of ``min(2048, max_positions)`` keys at rate 1, then 4 times longer at 4 times
    the rate while they fit ``max_positions``: every branch reads ``w / r`` keys per query."""
    w, r = min(2048, max_positions), 1
    segs, rates = [w], [r]
    while w * 4 <= max_positions:
        w, r = w * 4, r * 4
        segs.append(w)
        rates.append(r)
    return {"segment_lengths": segs, "dilation_rates": rates, "mode": "longnet"}


def _settings(config) -> dict:
    settings = getattr(config, "dilated_attention", None)
    if settings is None:
        return default_config(int(config.max_position_embeddings))
    if not isinstance(settings, dict) or not {"segment_lengths", "dilation_rates"} <= set(settings):
        raise ValueError("config.dilated_attention must be a dict with 'segment_lengths' and 'dilation_rates' (and "
                         f"optionally 'mode'): got {settings!r}")
    return {"mode": "longnet", **settings}


def attention_forward(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor,
                      attention_mask: Optional[Tensor], dropout: float = 0.0, scaling: Optional[float] = None,
                      is_causal: Optional[bool] = None, **kwargs):
    """transformers' attention function: query ``(batch, heads, sq, head_dim)``, key and value
    ``(batch, heads_kv, skv, head_dim)`` (grouped-query attention native), ``attention_mask``
    what :func:`mask_function` made (``(batch, skv)`` bool, True = keep, or None). Returns
    ``(out (batch, sq, heads, head_dim), None)``. ``sq == skv``: :func:`dilated_attention`;
    ``sq < skv`` (queries at the end of a cache): :func:`dilated_attention_decode`."""
    if kwargs.get("softcap") is not None:
        raise ValueError("attn_implementation='dilated' does not support softcap: got "
                         f"softcap={kwargs['softcap']!r}")
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError("attn_implementation='dilated' takes a key padding mask (batch, seq); got an attention mask "
                         f"of shape {tuple(attention_mask.shape)} (a custom 4-D mask is not dilated attention)")
    settings = _settings(module.config)
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # (batch, seq, heads, head_dim) views
    segs, rates, mode = settings["segment_lengths"], settings["dilation_rates"], settings["mode"]
    if q.shape[1] == k.shape[1]:
        out = dilated_attention(q, k, v, segs, rates, mode=mode, is_causal=causal, scale=scaling, dropout_p=dropout,
                                key_padding_mask=attention_mask)
    else:
        if dropout:
            raise ValueError(f"attn_implementation='dilated' has no dropout for queries at the end of a cache: got "
                             f"dropout={dropout!r} with {q.shape[1]} queries and {k.shape[1]} keys")
        out = dilated_attention_decode(q, k, v, segs, rates, mode=mode, is_causal=causal, scale=scaling,
                                       key_padding_mask=attention_mask)
    return out, None


def mask_function(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset: int = 0,
                  mask_function=None, attention_mask: Optional[Tensor] = None, **kwargs) -> Optional[Tensor]:
    """transformers' mask function for ``"dilated"``: the ``(batch, kv_length)`` padding mask
    (bool, True = keep) or None, never a 4-D mask; the dilated pattern and causality are the
    attention function's. Sliding-window, chunked or other overlay masks are refused."""
    from transformers.masking_utils import bidirectional_mask_function, causal_mask_function

    if mask_function is not None and mask_function not in (causal_mask_function, bidirectional_mask_function):
        raise ValueError(f"attn_implementation='dilated' takes causal or bidirectional attention with padding only: "
                         f"got the mask function {getattr(mask_function, '__qualname__', mask_function)!r} (sliding-"
                         "window, chunked, packed or overlay masks are not dilated attention)")
    if kwargs.get("local_size") is not None:
        raise ValueError(f"attn_implementation='dilated' does not take sliding-window attention: got local_size="
                         f"{kwargs['local_size']!r}")
    if isinstance(q_offset, Tensor) or q_offset + q_length != kv_offset + kv_length:
        # a static cache: keys preallocated past the queries, which the decode op does not take yet
        raise ValueError("attn_implementation='dilated' needs the queries at the end of the keys (a dynamic cache): "
                         f"got {q_length} queries from position {q_offset} and {kv_length} keys from position "
                         f"{kv_offset} (a static cache is not supported yet)")
    if attention_mask is None:
        return None
    return attention_mask[:, kv_offset:kv_offset + kv_length].to(torch.bool)


def register() -> None:
    """Adds ``"dilated"`` to transformers' attention and mask interfaces (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, mask_function)
