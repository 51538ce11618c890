"""Greedy generation with a KV cache for :class:`~dilated_ops.LongNetLM` (issue 22).

The prompt runs once through every layer, as the model's forward does, and each attention
call keeps its keys and values. Each new token then runs through the layers alone: its
dilated self-attention reads the cache through :func:`dilated_ops.dilated_attention_decode`
(per branch the at most ``w / r`` keys of its segment and offset class, so a step's work does
not grow with the context), and the decoder's cross-attention reads the cached projections of
the encoder's output rows so far (causal: the new position sees them all). Every logit equals
the full forward's at that position.
"""
from __future__ import annotations

from typing import Dict, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from . import _checks
from .attention_block import attention_block
from .functional import dilated_attention_decode
from .modules import (DilatedAttention, DistributedDilatedAttention, ImprovedDilatedAttention,
                      MultiheadDilatedAttention, RingDilatedAttention)

Cache = Dict[int, Tuple[Tensor, Tensor]]  # id of an attention module -> its keys, values so far


def _one_process_dilated(attention: nn.Module) -> bool:
    """The attention the decode op continues: dilated attention (standard, improved) or a ring /
    distributed one outside a process group of more than one rank (then it is improved's);
    block-sparse is another pattern."""
    if type(attention) in (DilatedAttention, ImprovedDilatedAttention):
        return True
    if isinstance(attention, (RingDilatedAttention, DistributedDilatedAttention)):
        return not dist.is_initialized() or dist.get_world_size(attention.process_group) == 1
    return False


def _append(cache: Cache, module: nn.Module, k: Tensor, v: Tensor, dim: int) -> Tuple[Tensor, Tensor]:
    """``module``'s cached keys and values with ``k``, ``v`` appended along the sequence ``dim``."""
    if id(module) in cache:
        old_k, old_v = cache[id(module)]
        k, v = torch.cat([old_k, k], dim=dim), torch.cat([old_v, v], dim=dim)
    cache[id(module)] = (k, v)
    return k, v


def _self_attention(mha: nn.Module, x: Tensor, cache: Cache) -> Tensor:
    """Causal multi-head dilated self-attention of ``x`` ``(batch, new, embed)``, the positions
    after the ones ``cache`` holds for ``mha``, as :meth:`MultiheadDilatedAttention.forward`
    computes them over the whole sequence."""
    attention = mha.attention

    def attend(q, k, v):
        k, v = _append(cache, mha, k, v, 1)
        if q.shape[1] == k.shape[1]:  # the prompt: the module's own forward
            return attention(q, k, v, is_causal=True)
        return dilated_attention_decode(q, k, v, attention.segment_lengths, attention.dilation_rates,
                                        mode=attention.mode, is_causal=True)

    return attention_block(x, x, x, lambda q, k, v: (mha.q_proj(q), mha.k_proj(k), mha.v_proj(v)), attend,
                           mha.out_proj, mha.num_heads, mha.head_dim, norm=mha.norm)


def _cross_attention(cross: nn.Module, x: Tensor, memory: Tensor, cache: Cache) -> Tensor:
    """:class:`CrossAttention` with ``is_causal`` of ``x`` (new positions) over the encoder's
    output rows at those positions appended to the cached ones."""
    def heads(t):
        return t.unflatten(-1, (cross.num_heads, -1)).transpose(1, 2)

    k, v = _append(cache, cross, heads(cross.k_proj(memory)), heads(cross.v_proj(memory)), 2)
    q = heads(cross.q_proj(x))
    # The prompt: query i sees memory <= i; a new position sees every row cached so far.
    out = F.scaled_dot_product_attention(q, k, v, is_causal=q.shape[2] == k.shape[2] and q.shape[2] > 1)
    return cross.out_proj(cross.norm(out.transpose(1, 2).flatten(2)))


def _step(model: nn.Module, tokens: Tensor, start: int, cache: Cache) -> Tensor:
    """Logits ``(batch, new, num_tokens)`` of ``tokens`` ``(batch, new)`` at positions
    ``start, start + 1, ...``, given the cache of the positions before (updated in place)."""
    x = model.embed(tokens, start)
    memory = x
    for layer in model.long_net.encoder.layers:
        memory = memory + layer.dropout(_self_attention(layer.self_attn, layer.norm1(memory), cache))
        memory = memory + layer.ff(memory)
    for layer in model.long_net.decoder.layers:
        x = x + layer.dropout(_self_attention(layer.self_attn, layer.norm1(x), cache))
        x = x + layer.dropout(_cross_attention(layer.multihead_attn, layer.norm2(x), memory, cache))
        x = x + layer.ff(x)
    return model.out(model.norm(x))


@torch.no_grad()
def generate(model: nn.Module, tokens: Tensor, max_new_tokens: int) -> Tensor:
    """Greedy continuation of ``tokens`` ``(batch, prompt)`` by ``max_new_tokens`` tokens:
    ``(batch, prompt + max_new_tokens)``. Token ``t`` is the argmax of the full causal
    forward's logits at position ``t - 1``, computed from the cache."""
    if not isinstance(tokens, Tensor) or tokens.dim() != 2 or tokens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"tokens must be an integer tensor (batch, seq): got "
                        f"{getattr(tokens, 'dtype', type(tokens).__name__)} of shape "
                        f"{tuple(getattr(tokens, 'shape', ()))}")
    if tokens.shape[1] == 0:
        raise ValueError("tokens must hold a prompt of at least one token: got shape "
                         f"{tuple(tokens.shape)}")
    _checks.check_positive_int("max_new_tokens", max_new_tokens)
    for name, module in model.named_modules():
        if isinstance(module, MultiheadDilatedAttention) and not _one_process_dilated(module.attention):
            raise NotImplementedError(f"generate runs dilated self-attention from a cache; {name} is "
                                      f"{type(module).__name__}, whose attention is not dilated attention in one "
                                      "process")
    cache: Cache = {}
    logits = _step(model, tokens, 0, cache)
    out = [tokens]
    for i in range(max_new_tokens):
        out.append(logits[:, -1].argmax(-1, keepdim=True).to(tokens.dtype))
        if i + 1 < max_new_tokens:
            logits = _step(model, out[-1], tokens.shape[1] + i, cache)
    return torch.cat(out, dim=1)
