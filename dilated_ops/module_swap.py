"""Module swapping (issue 4): :func:`convert` replaces ``nn.MultiheadAttention`` submodules by
:class:`ConvertedMultiheadAttention` (the attention block of :mod:`dilated_ops.attention_block`
on the original's Parameters, with the configured variant's op); :func:`export` converts a deep
copy, runs ``torch.export.export`` on it and rewrites the SDPA nodes left (functional calls)
with the ATen pass of :mod:`.fx_passes.export`, so the program's attention calls are
``torch.ops.dilated`` nodes.

API layer: imports the ops' public function, the attention block and fx_passes' public names.
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from . import modules, variants
from .attention_block import attention_block, packed_in_projection
from .fx_passes import Decider, RewriteConfig, RewriteReport, rewrite_graph
from .fx_passes.refusals import mha_call_problem, mha_module_problem

KIND = "nn.MultiheadAttention"


class ConvertedMultiheadAttention(nn.Module):
    """What :func:`convert` puts in place of an ``nn.MultiheadAttention``: the same
    Parameters (the very objects, under the same names, so ``state_dict`` keys are unchanged),
    dilated attention in between. ``forward`` takes ``nn.MultiheadAttention``'s arguments and
    returns ``(output, None)``; a bool ``key_padding_mask`` (True = padding) hides those keys
    (a row with every key padded gets zeros); ``need_weights=True`` (MHA's default), a float
    ``key_padding_mask``, an ``attn_mask`` without ``is_causal=True`` (the mask is then taken to be the causal one, as
    PyTorch's hint says) raise ValueError naming the module. key and value must have query's
    length and batch (self-attention, or cross-attention of the same length; ``kdim``/``vdim``
    other than ``embed_dim``, i.e. MHA's separate ``q/k/v_proj_weight``, are supported).

    ``_qkv_same_embed_dim`` is False on purpose: ``nn.TransformerEncoderLayer``'s and
    ``nn.TransformerEncoder``'s fused eval fast paths check it and would otherwise call
    ``torch._transformer_encoder_layer_fwd`` with the packed weights, bypassing this module.
    """

    def __init__(self, mha: nn.MultiheadAttention, config: RewriteConfig, name: str):
        super().__init__()
        self.embed_dim, self.num_heads = mha.embed_dim, mha.num_heads
        self.kdim, self.vdim = mha.kdim, mha.vdim
        self.head_dim = mha.embed_dim // mha.num_heads
        self.batch_first, self.dropout = mha.batch_first, mha.dropout
        self.packed = mha._qkv_same_embed_dim
        self._qkv_same_embed_dim = False  # keeps the fused fast paths away (see the class doc)
        self.implementation, self.name = config.variant.name, name
        # The variant's single-head module (parameter-free: no state_dict keys) runs the op.
        self.attention = getattr(modules, config.variant.module)(
            config.segment_lengths, config.dilation_rates, dropout=mha.dropout, mode=config.mode, **config.options)
        self.attention.train(mha.training)
        self.attention.selection_reason = f"by dilated_ops.convert at {name or '<top>'}"
        # Same registration order and names as nn.MultiheadAttention.
        for p in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight", "in_proj_bias"):
            self.register_parameter(p, getattr(mha, p))
        self.bias_k = self.bias_v = None
        self.add_zero_attn = False
        self.out_proj = mha.out_proj
        self.training = mha.training

    def _refuse(self, what: str):
        return ValueError(
            f"dilated_ops.convert: module {self.name or '<top>'!r} (converted nn.MultiheadAttention): {what}"
        )

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Optional[Tensor] = None,
                need_weights: bool = True, attn_mask: Optional[Tensor] = None,
                average_attn_weights: bool = True, is_causal: bool = False) -> Tuple[Tensor, None]:
        problem = mha_call_problem(variants.VARIANTS[self.implementation], need_weights, key_padding_mask,
                                   attn_mask, is_causal)
        if problem:
            raise self._refuse(problem)
        if key.shape[:-1] != query.shape[:-1] or value.shape[:-1] != query.shape[:-1]:
            raise self._refuse(f"key {tuple(key.shape)} / value {tuple(value.shape)} of another length "
                               f"or batch than query {tuple(query.shape)} (dilated attention needs one length)")
        unbatched = query.dim() == 2
        if unbatched:  # (seq, embed) -> (seq, 1, embed), keeping self-attention's one tensor
            if query is key and key is value:
                query = key = value = query.unsqueeze(1)
            else:
                query, key, value = (t.unsqueeze(1) for t in (query, key, value))
        keep = None
        if key_padding_mask is not None:  # MHA's (batch, seq), True = padding; the op's True = keep
            keep = ~(key_padding_mask.unsqueeze(0) if unbatched else key_padding_mask)
        separate = None if self.packed else (self.q_proj_weight, self.k_proj_weight, self.v_proj_weight)
        out = attention_block(
            query, key, value,
            lambda q, k, v: packed_in_projection(q, k, v, self.in_proj_weight, self.in_proj_bias, separate),
            lambda q, k, v: self.attention(q, k, v, is_causal=is_causal, key_padding_mask=keep), self.out_proj,
            self.num_heads, self.head_dim, seq_first=unbatched or not self.batch_first)
        return (out.squeeze(1) if unbatched else out), None

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, batch_first={self.batch_first}"


def mha_problem(mha: nn.MultiheadAttention, config: RewriteConfig) -> Optional[str]:
    return mha_module_problem(config, mha.num_heads, mha.bias_k, mha.bias_v, mha.add_zero_attn, mha.dropout)


def convert(model: nn.Module, *config, **options) -> Tuple[nn.Module, RewriteReport]:
    """Replaces ``model``'s ``nn.MultiheadAttention`` submodules by
    :class:`ConvertedMultiheadAttention` sharing their Parameters, **in place** (like
    ``torch.ao.quantization.convert``; deep-copy first to keep the original).

    Args:
        model: any ``nn.Module`` (an ``nn.MultiheadAttention`` itself included).
        config, options: a :class:`~dilated_ops.RewriteConfig`, or its fields
            (``segment_lengths, dilation_rates, mode="groups", implementation="auto",
            select=None, strict=False``), as :func:`dilated_ops.backend` takes them.

    Returns:
        ``(model, report)``; ``model`` is the converted module itself when it is an
        ``nn.MultiheadAttention`` (the one case not done in place).

    Refused (kept, listed in ``report.refused``; ``strict=True`` raises
    :class:`~dilated_ops.fx_passes.RewriteRefused`): ``add_bias_kv``, ``add_zero_attn``, fewer
    heads than dilation groups in "groups" mode. Packed ``in_proj_weight`` and separate
    ``q/k/v_proj_weight`` (MHA uses them when ``kdim``/``vdim`` differ from ``embed_dim``) are
    both supported. What only the call shows (``need_weights=True``, a float ``key_padding_mask``, a mask
    not declared causal) raises ValueError at forward.
    """
    return swap_modules(model, Decider(RewriteConfig.of(*config, **options)))


def swap_modules(model: nn.Module, decider: Decider, prefix: str = "") -> Tuple[nn.Module, RewriteReport]:
    """:func:`convert` recording in ``decider`` (shared with :mod:`dilated_ops.symbolic`), the
    module paths under ``prefix``."""
    done = {}  # id(original) -> converted: a module shared by several paths stays shared

    def swap(name: str, mha: nn.MultiheadAttention) -> nn.Module:
        if id(mha) in done:
            return done[id(mha)]
        path = prefix + name
        if not decider.consider(KIND, path, lambda: mha_problem(mha, decider.config)):
            return mha
        new = ConvertedMultiheadAttention(mha, decider.config, path)
        decider.done(KIND, path)
        done[id(mha)] = new
        return new

    if isinstance(model, nn.MultiheadAttention):
        return swap("", model), decider.report
    for parent_name, parent in list(model.named_modules(remove_duplicate=False)):
        for child_name, child in list(parent._modules.items()):  # duplicates included
            if isinstance(child, nn.MultiheadAttention):
                name = f"{parent_name}.{child_name}" if parent_name else child_name
                setattr(parent, child_name, swap(name, child))
    return model, decider.report


_CONFIG_FIELDS = tuple(f.name for f in dataclasses.fields(RewriteConfig))


def export(model: nn.Module, args: tuple, kwargs: Optional[dict] = None, *, config: Optional[RewriteConfig] = None,
           dynamic_shapes=None, **options) -> torch.export.ExportedProgram:
    """``torch.export.export`` of ``model`` with its attention calls turned into
    ``torch.ops.dilated`` calls.

    Args:
        model, args, kwargs, dynamic_shapes: as ``torch.export.export`` takes them.
        config: a :class:`~dilated_ops.RewriteConfig`; or, among ``options``, its fields
            (``segment_lengths, dilation_rates, mode, implementation, select, strict``; given
            with ``config`` they override it). Other ``options`` go to ``torch.export.export``.

    Returns:
        the ``ExportedProgram``; its attribute ``dilated_ops_report`` (in-process only; not
        saved) is the :class:`~dilated_ops.RewriteReport` of both steps below.

    Route: :func:`convert` on a deep copy of ``model`` (the model passed in is left as it is;
    the program holds copies of its weights), then ``torch.export.export``; the
    ``aten.scaled_dot_product_attention`` nodes left in the program (functional
    ``F.scaled_dot_product_attention`` calls) are then rewritten by
    :func:`dilated_ops.rewrite_exported`'s pass, in the same report (entries of kind
    "scaled_dot_product_attention"; refused ones stay SDPA, ``strict=True`` raises). ``select``
    is asked in both steps: with MHA module paths, then with the paths of the modules whose
    code calls SDPA (a module it declined to convert is asked again for its SDPA node).
    """
    fields = {name: options.pop(name) for name in _CONFIG_FIELDS if name in options}
    decider = Decider(RewriteConfig.of(config, **fields) if config is not None else RewriteConfig.of(**fields))
    converted, _ = swap_modules(copy.deepcopy(model), decider)
    ep = torch.export.export(converted, tuple(args), kwargs, dynamic_shapes=dynamic_shapes, **options)
    rewrite_graph(ep.graph_module, decider)
    ep.dilated_ops_report = decider.report
    return ep
