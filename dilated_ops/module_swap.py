"""Module swapping (issue 4): :func:`convert` replaces ``nn.MultiheadAttention`` submodules by
:class:`ConvertedMultiheadAttention` (in-projection, ``torch.ops.dilated.dilated_attention``,
out-projection) sharing the original Parameters; :func:`export` converts a deep copy, runs
``torch.export.export`` on it and rewrites the SDPA nodes left (functional calls) with the ATen
pass of :mod:`.fx_passes.export`, so the program's attention calls are ``torch.ops.dilated`` nodes.

API layer: imports registrations and fx_passes (its report, selection and config checks).
"""
from __future__ import annotations

import copy
from typing import Callable, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .fx_passes._emit import heads_problem
from .fx_passes.backend import make_target
from .fx_passes.export import rewrite_graph
from .fx_passes.report import Decider, Entry, RewriteRefused, RewriteReport
from .registrations.dilated_attention import dilated_attention

KIND = "nn.MultiheadAttention"


class ConvertedMultiheadAttention(nn.Module):
    """What :func:`convert` puts in place of an ``nn.MultiheadAttention``: the same
    Parameters (the very objects, under the same names, so ``state_dict`` keys are unchanged),
    dilated attention in between. ``forward`` takes ``nn.MultiheadAttention``'s arguments and
    returns ``(output, None)``; ``need_weights=True`` (MHA's default), ``key_padding_mask``, an
    ``attn_mask`` without ``is_causal=True`` (the mask is then taken to be the causal one, as
    PyTorch's hint says) raise ValueError naming the module. key and value must have query's
    length and batch (self-attention, or cross-attention of the same length; ``kdim``/``vdim``
    other than ``embed_dim``, i.e. MHA's separate ``q/k/v_proj_weight``, are supported).

    ``_qkv_same_embed_dim`` is False on purpose: ``nn.TransformerEncoderLayer``'s and
    ``nn.TransformerEncoder``'s fused eval fast paths check it and would otherwise call
    ``torch._transformer_encoder_layer_fwd`` with the packed weights, bypassing this module.
    """

    def __init__(self, mha: nn.MultiheadAttention, segment_lengths: Sequence[int],
                 dilation_rates: Sequence[int], mode: str, backend: str, name: str):
        super().__init__()
        self.embed_dim, self.num_heads = mha.embed_dim, mha.num_heads
        self.kdim, self.vdim = mha.kdim, mha.vdim
        self.head_dim = mha.embed_dim // mha.num_heads
        self.batch_first, self.dropout = mha.batch_first, mha.dropout
        self.packed = mha._qkv_same_embed_dim
        self._qkv_same_embed_dim = False  # keeps the fused fast paths away (see the class doc)
        self.segment_lengths, self.dilation_rates = list(segment_lengths), list(dilation_rates)
        self.mode, self.backend, self.name = mode, backend, name
        # Same registration order and names as nn.MultiheadAttention.
        for p in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight", "in_proj_bias"):
            self.register_parameter(p, getattr(mha, p))
        self.bias_k = self.bias_v = None
        self.add_zero_attn = False
        self.out_proj = mha.out_proj
        self.training = mha.training

    def _refuse(self, what: str):
        return ValueError(
            f"dilated_ops.convert: module {self.name or '<top>'!r} (converted nn.MultiheadAttention) "
            f"got {what}"
        )

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Optional[Tensor] = None,
                need_weights: bool = True, attn_mask: Optional[Tensor] = None,
                average_attn_weights: bool = True, is_causal: bool = False) -> Tuple[Tensor, None]:
        if need_weights:
            raise self._refuse("need_weights=True (MHA's default): dilated attention returns no "
                               "attention weights; call it with need_weights=False")
        if key_padding_mask is not None:
            raise self._refuse("a key_padding_mask, which dilated attention does not support")
        if attn_mask is not None and not is_causal:
            raise self._refuse("an attn_mask without is_causal=True; only causal masking is "
                               "supported (pass is_causal=True, with or without the causal mask)")
        if key.shape[:-1] != query.shape[:-1] or value.shape[:-1] != query.shape[:-1]:
            raise self._refuse(f"key {tuple(key.shape)} / value {tuple(value.shape)} of another length "
                               f"or batch than query {tuple(query.shape)} (dilated attention needs one length)")
        self_attention = query is key and key is value
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = (t.unsqueeze(1) for t in (query, key, value))
        elif self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        # (seq, batch, embed) from here, as F.multi_head_attention_forward.
        b = self.in_proj_bias
        bq, bk, bv = b.chunk(3) if b is not None else (None, None, None)
        if self.packed and self_attention:
            q, k, v = F.linear(query, self.in_proj_weight, b).chunk(3, dim=-1)
        else:
            wq, wk, wv = (self.in_proj_weight.chunk(3) if self.packed
                          else (self.q_proj_weight, self.k_proj_weight, self.v_proj_weight))
            q, k, v = F.linear(query, wq, bq), F.linear(key, wk, bk), F.linear(value, wv, bv)
        heads = (self.num_heads, self.head_dim)
        q, k, v = (t.unflatten(-1, heads).transpose(0, 1) for t in (q, k, v))  # (batch, seq, h, d)
        out = dilated_attention(
            q, k, v, self.segment_lengths, self.dilation_rates, mode=self.mode, is_causal=is_causal,
            dropout_p=self.dropout if self.training else 0.0, backend=self.backend,
        )
        out = self.out_proj(out.flatten(2))  # (batch, seq, embed)
        if unbatched:
            out = out.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        return out, None

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, batch_first={self.batch_first}, "
                f"segment_lengths={self.segment_lengths}, dilation_rates={self.dilation_rates}, "
                f"mode={self.mode!r}, backend={self.backend!r}")


def mha_problem(mha: nn.MultiheadAttention, target) -> Optional[str]:
    if mha.bias_k is not None or mha.bias_v is not None:
        return "add_bias_kv=True is not supported"
    if mha.add_zero_attn:
        return "add_zero_attn=True is not supported"
    return heads_problem(target, mha.num_heads)


def convert(
    model: nn.Module,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    mode: str = "groups",
    implementation: str = "auto",
    select: Optional[Callable[[str], bool]] = None,
    strict: bool = False,
) -> Tuple[nn.Module, RewriteReport]:
    """Replaces ``model``'s ``nn.MultiheadAttention`` submodules by
    :class:`ConvertedMultiheadAttention` sharing their Parameters, **in place** (like
    ``torch.ao.quantization.convert``; deep-copy first to keep the original). Returns
    ``(model, report)``; ``model`` is the converted module itself when it is an
    ``nn.MultiheadAttention`` (the one case not done in place).

    ``implementation``, ``select(module_path) -> bool`` and ``strict`` as in
    :func:`dilated_ops.backend`. Refused (kept, listed in ``report.refused``; ``strict=True``
    raises :class:`RewriteRefused`): ``add_bias_kv``, ``add_zero_attn``, fewer heads than
    dilation groups in "groups" mode. Packed ``in_proj_weight`` and separate ``q/k/v_proj_weight``
    (MHA uses them when ``kdim``/``vdim`` differ from ``embed_dim``) are both supported. What only the call
    shows (``need_weights=True``, ``key_padding_mask``, a mask not declared causal) raises
    ValueError at forward.
    """
    target = make_target(segment_lengths, dilation_rates, mode, implementation)
    report = RewriteReport()
    done = {}  # id(original) -> converted: a module shared by several paths stays shared

    def swap(name: str, mha: nn.MultiheadAttention) -> nn.Module:
        if id(mha) in done:
            return done[id(mha)]
        if select is not None and not select(name):
            report.skipped.append(Entry(KIND, "", name, "not chosen by select"))
            return mha
        problem = mha_problem(mha, target)
        if problem:
            entry = Entry(KIND, "", name, problem)
            report.refused.append(entry)
            if strict:
                raise RewriteRefused(f"dilated_ops: left {entry}")
            return mha
        new = ConvertedMultiheadAttention(mha, target.segment_lengths, target.dilation_rates,
                                          target.mode, target.backend, name)
        report.rewritten.append(Entry(KIND, "", name))
        done[id(mha)] = new
        return new

    if isinstance(model, nn.MultiheadAttention):
        return swap("", model), report
    for parent_name, parent in list(model.named_modules(remove_duplicate=False)):
        for child_name, child in list(parent._modules.items()):  # duplicates included
            if isinstance(child, nn.MultiheadAttention):
                name = f"{parent_name}.{child_name}" if parent_name else child_name
                setattr(parent, child_name, swap(name, child))
    return model, report


def export(
    model: nn.Module,
    args: tuple,
    kwargs: Optional[dict] = None,
    *,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    mode: str = "groups",
    implementation: str = "auto",
    select: Optional[Callable[[str], bool]] = None,
    strict: bool = False,
    dynamic_shapes=None,
    **export_kwargs,
) -> torch.export.ExportedProgram:
    """``torch.export.export`` of ``model`` with its ``nn.MultiheadAttention`` modules turned
    into ``torch.ops.dilated.dilated_attention`` calls.

    Route: :func:`convert` on a deep copy of ``model`` (the model passed in is left as it is;
    the program holds copies of its weights), then ``torch.export.export(copy, args, kwargs,
    dynamic_shapes=..., **export_kwargs)``. The conversion report is the program's attribute
    ``dilated_ops_report`` (in-process only; not saved). The ``aten.scaled_dot_product_attention``
    nodes left in the program (functional ``F.scaled_dot_product_attention`` calls) are then
    rewritten by :func:`dilated_ops.rewrite_exported`'s pass, in the same report (entries of
    kind "scaled_dot_product_attention"; refused ones stay SDPA, ``strict=True`` raises).
    ``select`` is asked in both steps: with MHA module paths, then with the paths of the modules
    whose code calls SDPA (a module it declined to convert is asked again for its SDPA node).
    """
    converted, report = convert(copy.deepcopy(model), segment_lengths, dilation_rates, mode,
                                implementation, select, strict)
    ep = torch.export.export(converted, tuple(args), kwargs, dynamic_shapes=dynamic_shapes, **export_kwargs)
    target = make_target(segment_lengths, dilation_rates, mode, implementation)
    rewrite_graph(ep.graph_module, target, Decider(report, select, strict))
    ep.dilated_ops_report = report
    return ep
