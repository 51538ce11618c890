"""``create_dilated_attention`` / ``create_multihead_dilated_attention`` (the v0.2.0 factory)
and the capability table, as data: the classes each name (and each "auto" choice) builds, the
NotImplementedError texts of what is not built, and the README's table
(:func:`implementations_table`; a test keeps the README in step).

Options come as keywords or as config objects (``attention_config=``,
``multihead_config=``); keywords override the config's fields. Unknown keywords, and
multi-head keywords given to ``create_dilated_attention``, are errors naming them.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch

from . import _checks, _env
from .config import DilatedAttentionConfig, MultiheadConfig, check_heads_cover_groups, field_names
from .modules import (
    DilatedAttention,
    ImprovedDilatedAttention,
    ImprovedMultiheadDilatedAttention,
    MultiheadDilatedAttention,
    RingDilatedAttention,
    RingMultiheadDilatedAttention,
)

# "auto" picks "ring" above this declared sequence length (max_seq_len=). In one process ring
# computes what improved computes; the threshold marks where sharding the sequence over
# devices (ring across processes, not built yet) is what one would want: a million tokens.
RING_MIN_SEQ_LEN = 1_000_000


@dataclass(frozen=True)
class Implementation:
    """One row of the capability table. ``missing`` is set when the capability is not built:
    the factory then raises NotImplementedError with that text (never a silent fallback)."""

    name: str
    summary: str
    runs_on: str
    dilated: Optional[type] = None
    multihead: Optional[type] = None
    missing: Optional[str] = None


IMPLEMENTATIONS: Dict[str, Implementation] = {
    impl.name: impl
    for impl in (
        Implementation(
            "standard",
            "PyTorch's own attention kernels on strided segment views (op backend='sdpa')",
            "CPU and CUDA; float32, float64; float16/bfloat16 on CUDA; any head_dim",
            DilatedAttention, MultiheadDilatedAttention,
        ),
        Implementation(
            "improved",
            "the fastest kernel we have for the device (op backend='auto'); elsewhere as standard",
            "as standard, plus our Triton forward for CUDA (sm80+) float16/bfloat16, head_dim 64, "
            "groups mode, no dropout",
            ImprovedDilatedAttention, ImprovedMultiheadDilatedAttention,
        ),
        Implementation(
            "ring",
            "one process: the same op as improved (SPEC section 5: ring result = plain result)",
            "as improved, in one process; NotImplementedError in a process group of world size > 1",
            RingDilatedAttention, RingMultiheadDilatedAttention,
        ),
        Implementation(
            "distributed",
            "LongNet's sequence-parallel attention across processes",
            "not built",
            missing="distributed: sequence-parallel dilated attention across processes (SPEC section 5) "
            "is not built yet",
        ),
        Implementation(
            "block_sparse",
            "block-sparse attention",
            "not built",
            missing="block_sparse: block-sparse attention (SPEC section 4) is not built yet",
        ),
    )
}
NAMES = ("auto",) + tuple(IMPLEMENTATIONS)

_ATTENTION_FIELDS = field_names(DilatedAttentionConfig)
_MULTIHEAD_FIELDS = field_names(MultiheadConfig)
_MULTIHEAD_ONLY = _MULTIHEAD_FIELDS + ("multihead_config", "device", "dtype")


def implementations_table() -> str:
    """The capability table as Markdown (the README's copy is checked against it)."""
    rows = ["| name | what it runs | where |", "| --- | --- | --- |"]
    rows += [f"| `{i.name}` | {i.summary} | {i.runs_on} |" for i in IMPLEMENTATIONS.values()]
    return "\n".join(rows)


def choose_implementation(max_seq_len: Optional[int] = None, device=None) -> Tuple[str, str]:
    """What "auto" picks, and why: distributed when a process group of world size > 1 is
    initialized; ring when the declared ``max_seq_len`` exceeds :data:`RING_MIN_SEQ_LEN`;
    improved on CUDA (``device`` if given, else whether CUDA is available); standard otherwise."""
    world = _env.distributed_world_size()
    if world > 1:
        return "distributed", f"auto: a torch.distributed process group of world size {world} is initialized"
    if max_seq_len is not None and max_seq_len > RING_MIN_SEQ_LEN:
        return "ring", f"auto: max_seq_len={max_seq_len} > {RING_MIN_SEQ_LEN}"
    if device is not None:
        if torch.device(device).type == "cuda":
            return "improved", f"auto: device={str(device)!r} is CUDA"
        return "standard", f"auto: device={str(device)!r} is not CUDA, where improved runs standard's kernels"
    if _env.cuda_available():
        return "improved", "auto: CUDA is available"
    return "standard", "auto: no CUDA device, where improved runs standard's kernels"


def _resolve(attention_type, max_seq_len, device) -> Tuple[Implementation, str]:
    if attention_type not in NAMES:
        names = ", ".join(map(repr, NAMES))
        raise ValueError(f"attention_type must be one of {names}: got {attention_type!r}")
    if max_seq_len is not None:
        _checks.check_positive_int("max_seq_len", max_seq_len)
    if attention_type == "auto":
        name, reason = choose_implementation(max_seq_len, device)
    else:
        name, reason = attention_type, "requested by name"
    impl = IMPLEMENTATIONS[name]
    if impl.missing:
        raise NotImplementedError(impl.missing + ("" if attention_type != "auto" else f" ({reason})"))
    return impl, reason


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
    """A dilated attention module (q, k, v ``(batch, seq, heads, head_dim)`` in, same out).

    ``attention_type``: one of :data:`NAMES`. Keywords: the fields of
    :class:`DilatedAttentionConfig` (override ``attention_config``'s); ``max_seq_len``: the
    longest sequence you will run, read by "auto" only.
    """
    caller = "create_dilated_attention"
    multihead = sorted(set(kwargs) & set(_MULTIHEAD_ONLY))
    if multihead:
        raise TypeError(
            f"{caller}() got multi-head option(s) {', '.join(map(repr, multihead))}; "
            "use create_multihead_dilated_attention for those"
        )
    unknown = set(kwargs) - set(_ATTENTION_FIELDS)
    if unknown:
        raise _unknown(caller, unknown, _ATTENTION_FIELDS + ("attention_config", "max_seq_len"))
    config = _build_config(DilatedAttentionConfig, attention_config, kwargs, "attention_config", caller)
    impl, reason = _resolve(attention_type, max_seq_len, None)
    return _mark(impl.dilated(**dataclasses.asdict(config)), reason)


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
    """A multi-head dilated attention module (``(batch, seq, embed_dim)`` in,
    ``(output, None)`` out).

    ``attention_type``: one of :data:`NAMES`. Keywords: the fields of
    :class:`DilatedAttentionConfig` and :class:`MultiheadConfig` (each overrides its config
    object's); ``device``/``dtype`` of the parameters (``device`` also informs "auto");
    ``max_seq_len``: the longest sequence you will run, read by "auto" only.
    """
    caller = "create_multihead_dilated_attention"
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
    impl, reason = _resolve(attention_type, max_seq_len, device)
    module = impl.multihead(
        **dataclasses.asdict(mh), **dataclasses.asdict(att), device=device, dtype=dtype
    )
    return _mark(module, reason)
