"""``create_dilated_attention`` / ``create_multihead_dilated_attention`` (the v0.2.0 factory).
What each name builds, and what "auto" picks, is the variant table (:mod:`dilated_ops.variants`);
this file turns options into configs and configs into modules.

Options come as keywords or as config objects (``attention_config=``,
``multihead_config=``); keywords override the config's fields. Unknown keywords, and
multi-head keywords given to ``create_dilated_attention``, are errors naming them.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

import torch

from . import _checks, modules, variants
from .config import DilatedAttentionConfig, MultiheadConfig, check_heads_cover_groups, field_names
from .variants import NAMES, RING_MIN_SEQ_LEN, choose as choose_implementation  # noqa: F401 (v0.2.0-era names)

_ATTENTION_FIELDS = field_names(DilatedAttentionConfig)
_MULTIHEAD_FIELDS = field_names(MultiheadConfig)
_MULTIHEAD_ONLY = _MULTIHEAD_FIELDS + ("multihead_config", "device", "dtype")


def implementations_table() -> str:
    """The README's table of implementations (:func:`dilated_ops.variants.markdown_table`)."""
    return variants.markdown_table()


def _resolve(attention_type, max_seq_len, device) -> Tuple[variants.Variant, str]:
    if attention_type not in NAMES:
        names = ", ".join(map(repr, NAMES))
        raise ValueError(f"attention_type must be one of {names}: got {attention_type!r}")
    if max_seq_len is not None:
        _checks.check_positive_int("max_seq_len", max_seq_len)
    if attention_type == "auto":
        name, reason = choose_implementation(max_seq_len, device)
    else:
        name, reason = attention_type, "requested by name"
    variant = variants.VARIANTS[name]
    if not variant.built:
        raise NotImplementedError(variant.missing + ("" if attention_type != "auto" else f" ({reason})"))
    return variant, reason


def _build_config(cls, base, overrides: dict, base_name: str, caller: str):
    if base is not None and not isinstance(base, cls):
        raise TypeError(f"{base_name} must be a {cls.__name__}: got {type(base).__name__}")
    if base is not None:
        return dataclasses.replace(base, **overrides)
    required = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING]
    missing = [name for name in required if name not in overrides]
    if missing:
        raise TypeError(
            f"{caller}() needs {', '.join(required)} (as keywords or in {base_name}=): missing "
            f"{', '.join(missing)}"
        )
    return cls(**overrides)


def _variant_options(attention_type: str, kwargs: dict) -> dict:
    """Takes out of ``kwargs`` the options of the variant named ``attention_type`` (its row's
    ``options``, e.g. block_sparse's ``sparse_config``)."""
    row = variants.VARIANTS.get(attention_type)
    names = row.options if row is not None else ()
    return {name: kwargs.pop(name) for name in names if name in kwargs}


def _unknown(caller: str, names, known) -> TypeError:
    return TypeError(
        f"{caller}() got unknown keyword argument(s) {', '.join(map(repr, sorted(names)))}; "
        f"known: {', '.join(known)}"
    )


def _mark(module, reason: str):
    module.selection_reason = reason
    if hasattr(module, "attention"):
        module.attention.selection_reason = reason
    return module


def create_dilated_attention(
    attention_type: str = "auto",
    *,
    attention_config: Optional[DilatedAttentionConfig] = None,
    max_seq_len: Optional[int] = None,
    **kwargs,
):
    """A dilated attention module: q, k, v ``(batch, seq, heads, head_dim)`` in, the same shape
    out (the pattern: :func:`dilated_ops.dilated_attention`)::

        attn = create_dilated_attention("auto", segment_lengths=[2048, 4096], dilation_rates=[1, 2])
        out = attn(q, k, v, is_causal=True)      # (batch, seq, heads, head_dim)

    The names are the rows of the variant table, :data:`dilated_ops.variants.VARIANTS` (the
    README's table of implementations, :func:`implementations_table`): "standard"
    (:class:`~dilated_ops.modules.DilatedAttention`), "improved"
    (:class:`~dilated_ops.modules.ImprovedDilatedAttention`), "ring"
    (:class:`~dilated_ops.modules.RingDilatedAttention`); "distributed" and "block_sparse" are
    listed but not built. "auto" asks :func:`dilated_ops.variants.choose`: "distributed" in a
    torch.distributed process group of world size > 1, "ring" when ``max_seq_len`` exceeds
    :data:`RING_MIN_SEQ_LEN`, "improved" when CUDA is available, "standard" otherwise.

    Args:
        attention_type: one of :data:`NAMES` (default ``"auto"``).
        attention_config: a :class:`DilatedAttentionConfig` whose fields are the defaults; the
            keywords override them (re-validated).
        max_seq_len: the longest sequence you will run (a positive int), read by "auto" only.
        **kwargs: the fields of :class:`DilatedAttentionConfig`: ``segment_lengths`` and
            ``dilation_rates`` (required unless ``attention_config`` is given), ``dropout``,
            ``use_tf32``, ``mode``.

    Returns:
        the module (an ``nn.Module``): ``forward(query, key, value, is_causal=False)`` on
        ``(batch, seq, heads, head_dim)`` tensors returns ``(batch, seq, heads, head_dim)``. Its
        ``selection_reason`` says why that variant ("requested by name", or what "auto" saw).

    Raises:
        TypeError: a multi-head option (``embed_dim``, ``num_heads``, ..., ``multihead_config``,
            ``device``, ``dtype``: use :func:`create_multihead_dilated_attention`), an unknown
            keyword, ``segment_lengths``/``dilation_rates`` missing, ``attention_config`` not a
            :class:`DilatedAttentionConfig`, or a field or ``max_seq_len`` of the wrong type.
        ValueError: an unknown ``attention_type``, ``max_seq_len < 1``, or a bad field value
            (e.g. a segment length not divisible by its rate).
        NotImplementedError: the variant is not built ("distributed", "block_sparse", or what
            "auto" picks in a process group of world size > 1), or "ring" in a process group
            of world size > 1.
    """
    caller = "create_dilated_attention"
    multihead = sorted(set(kwargs) & set(_MULTIHEAD_ONLY))
    if multihead:
        raise TypeError(
            f"{caller}() got multi-head option(s) {', '.join(map(repr, multihead))}; "
            "use create_multihead_dilated_attention for those"
        )
    options = _variant_options(attention_type, kwargs)
    unknown = set(kwargs) - set(_ATTENTION_FIELDS)
    if unknown:
        raise _unknown(caller, unknown, _ATTENTION_FIELDS + ("attention_config", "max_seq_len"))
    config = _build_config(DilatedAttentionConfig, attention_config, kwargs, "attention_config", caller)
    variant, reason = _resolve(attention_type, max_seq_len, None)
    return _mark(getattr(modules, variant.module)(**dataclasses.asdict(config), **options), reason)


def create_multihead_dilated_attention(
    attention_type: str = "auto",
    *,
    multihead_config: Optional[MultiheadConfig] = None,
    attention_config: Optional[DilatedAttentionConfig] = None,
    max_seq_len: Optional[int] = None,
    device=None,
    dtype: Optional[torch.dtype] = None,
    **kwargs,
):
    """A multi-head dilated attention module: ``(batch, seq, embed_dim)`` in (or
    ``(seq, batch, embed_dim)`` with ``batch_first=False``), ``(output, None)`` out::

        mha = create_multihead_dilated_attention(
            "auto", embed_dim=768, num_heads=12, segment_lengths=[2048, 4096], dilation_rates=[1, 2]
        )
        out, _ = mha(x, x, x, is_causal=True)    # (batch, seq, 768)

    ``attention_type`` names a row of the variant table, as for
    :func:`create_dilated_attention`: "standard"
    (:class:`~dilated_ops.modules.MultiheadDilatedAttention`), "improved"
    (:class:`~dilated_ops.modules.ImprovedMultiheadDilatedAttention`), "ring"
    (:class:`~dilated_ops.modules.RingMultiheadDilatedAttention`); "auto" as there, except that
    a given ``device`` decides between "improved" (CUDA) and "standard" (anything else).

    Args:
        attention_type: one of :data:`NAMES` (default ``"auto"``).
        multihead_config: a :class:`MultiheadConfig` whose fields are the defaults.
        attention_config: a :class:`DilatedAttentionConfig` whose fields are the defaults.
        max_seq_len: the longest sequence you will run (a positive int), read by "auto" only.
        device: of the parameters (a ``torch.device``, a device string or index, one this
            machine has); also read by "auto".
        dtype: of the parameters: ``torch.float16``, ``torch.bfloat16``, ``torch.float32`` or
            ``torch.float64``.
        **kwargs: the fields of :class:`MultiheadConfig` (``embed_dim``, ``num_heads``
            required unless ``multihead_config`` is given; ``bias``, ``layer_norm``,
            ``layer_norm_eps``, ``gamma_init``, ``batch_first``) and of
            :class:`DilatedAttentionConfig` (``segment_lengths``, ``dilation_rates`` required
            unless ``attention_config`` is given; ``dropout``, ``use_tf32``, ``mode``); each
            overrides its config object's.

    Returns:
        the module (an ``nn.Module``): ``forward(query, key=None, value=None,
        need_weights=False, attn_mask=None, is_causal=False)`` returns ``(output, None)``,
        output shaped as query; key and value must have query's shape. Its
        ``selection_reason`` says why that variant.

    Raises:
        TypeError: an unknown keyword, a required field missing, a config object of the wrong
            class, a field or ``max_seq_len`` of the wrong type, or a ``dtype`` that is not
            one of the four floating point dtypes.
        ValueError: an unknown ``attention_type``, ``max_seq_len < 1``, a bad field value
            (e.g. ``embed_dim`` not divisible by ``num_heads``), fewer heads than branches
            in "groups" mode, or a ``device`` that is malformed or absent (CUDA without CUDA).
        NotImplementedError: as :func:`create_dilated_attention`.
    """
    caller = "create_multihead_dilated_attention"
    options = _variant_options(attention_type, kwargs)
    unknown = set(kwargs) - set(_ATTENTION_FIELDS) - set(_MULTIHEAD_FIELDS)
    if unknown:
        raise _unknown(
            caller, unknown,
            _MULTIHEAD_FIELDS + _ATTENTION_FIELDS
            + ("multihead_config", "attention_config", "max_seq_len", "device", "dtype"),
        )
    mh = _build_config(
        MultiheadConfig, multihead_config, {k: v for k, v in kwargs.items() if k in _MULTIHEAD_FIELDS},
        "multihead_config", caller,
    )
    att = _build_config(
        DilatedAttentionConfig, attention_config,
        {k: v for k, v in kwargs.items() if k in _ATTENTION_FIELDS}, "attention_config", caller,
    )
    check_heads_cover_groups(mh, att)
    _checks.check_device(device)
    _checks.check_param_dtype(dtype)
    variant, reason = _resolve(attention_type, max_seq_len, device)
    module = getattr(modules, variant.multihead_module)(
        **dataclasses.asdict(mh), **dataclasses.asdict(att), device=device, dtype=dtype, **options
    )
    return _mark(module, reason)
