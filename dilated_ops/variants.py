"""The one table of dilated attention variants: for each factory name, the op it calls, the op
arguments it fixes, what it supports, and the modules it builds.

Read by the factory and its "auto" choice (:mod:`dilated_ops.factory`), the graph rewrites'
target (:mod:`dilated_ops.fx_passes.config`), the modules, the CLI's ``bench`` and the tests'
opcheck matrix; the README's table of implementations is :func:`markdown_table` (a test keeps it
in step). Adding a variant: a kernel file, a registration file, one row here.

Below the API and the graph passes: it imports the ops (``registrations``) and names the module
classes as strings, which :mod:`dilated_ops.factory` looks up in :mod:`dilated_ops.modules`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Dict, NamedTuple, Optional, Tuple

import torch

from . import _checks, _env
from .registrations import ulysses_attention  # importing registrations registers torch.ops.dilated
from .config import SparsePatternConfig

_ALL_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# "auto" picks "ring" above this declared sequence length (max_seq_len=): in one process ring
# computes what improved computes; the threshold marks where sharding the sequence over devices
# (ring across processes) is what one would want, a million tokens.
RING_MIN_SEQ_LEN = 1_000_000


class Call(NamedTuple):
    """One attention call as the graph rewrites describe it to a variant (the tensors are FX
    nodes there); ``options`` holds the variant's own options (``Variant.options``)."""

    q: Any
    k: Any
    v: Any
    segment_lengths: Tuple[int, ...]
    dilation_rates: Tuple[int, ...]
    mode: str
    is_causal: bool
    scale: Optional[float]
    dropout_p: float
    dropout_seed: Any
    options: Dict[str, Any]
    key_padding_mask: Any = None  # (batch, seq) bool, True = keep; for rows with ``masks``


def _dilated_args(call: Call) -> tuple:
    return (call.q, call.k, call.v, list(call.segment_lengths), list(call.dilation_rates), call.mode,
            bool(call.is_causal), call.scale, float(call.dropout_p), call.dropout_seed)


def _block_sparse_args(call: Call) -> tuple:
    p = call.options.get("sparse_config") or SparsePatternConfig()
    return (call.q, call.k, call.v, p.pattern_type, p.block_size, p.local_window_size, p.global_tokens,
            float(p.sparsity_ratio), list(call.segment_lengths), list(call.dilation_rates), bool(call.is_causal),
            call.scale)


def _ulysses_args(call: Call) -> tuple:
    group_name, world_size = ulysses_attention.group_args(call.options.get("process_group"))
    return (call.q, call.k, call.v, list(call.segment_lengths), list(call.dilation_rates), call.mode,
            bool(call.is_causal), call.scale, group_name, world_size)


@dataclass(frozen=True)
class Variant:
    """One row. ``op`` is the ``torch.ops.dilated`` packet the modules' functions and the
    rewritten graphs call: positional arguments ``args(call)``, keyword arguments ``op_args``
    (those the row fixes). ``options``: keyword options the factory, the modules and the
    rewrites take for this row besides the common configuration. A row with ``missing`` set is
    not built: asking for it raises NotImplementedError with that text, never a silent
    fallback."""

    name: str
    summary: str
    op: Optional[object] = None
    args: Optional[Callable[[Call], tuple]] = None
    op_args: Tuple[Tuple[str, object], ...] = ()
    options: Tuple[str, ...] = ()
    devices: Tuple[Tuple[str, Tuple[torch.dtype, ...]], ...] = ()  # (device type, dtypes)
    head_dims: str = "any"
    causal: bool = False
    dropout: bool = False
    masks: bool = False
    gqa: bool = False
    process_group: bool = False
    module: Optional[str] = None            # single-head: q, k, v (batch, seq, heads, head_dim)
    multihead_module: Optional[str] = None  # multihead: (batch, seq, embed_dim), projections
    notes: str = ""
    missing: Optional[str] = None

    @property
    def built(self) -> bool:
        return self.missing is None

    @property
    def needs_group(self) -> bool:
        """Whether the row's op itself runs across processes (takes a ``group_name``): the
        row's modules still run alone, but its op does not."""
        return self.op is not None and any(a.name == "group_name" for a in self.op.default._schema.arguments)

    @property
    def op_kwargs(self) -> Dict[str, object]:
        return dict(self.op_args)

    def dtypes(self, device_type: str) -> Tuple[torch.dtype, ...]:
        """The dtypes this variant runs on ``device_type`` ("cpu", "cuda"); () if none."""
        return dict(self.devices).get(device_type, ())

    def bind(self, call: Call) -> Tuple[tuple, Dict[str, object]]:
        """``(args, kwargs)`` of ``self.op`` for ``call``."""
        kwargs = self.op_kwargs
        if call.key_padding_mask is not None:
            kwargs["key_padding_mask"] = call.key_padding_mask
        return self.args(call), kwargs


def _on_dilated_op(name: str, summary: str, backend: str, module: str, notes: str = "") -> Variant:
    """A row over ``torch.ops.dilated.dilated_attention`` with the op's ``backend`` argument."""
    return Variant(
        name, summary, op=torch.ops.dilated.dilated_attention, args=_dilated_args, op_args=(("backend", backend),),
        devices=(("cpu", _ALL_DTYPES), ("cuda", _ALL_DTYPES)), causal=True, dropout=True, masks=True, gqa=True,
        module=f"{module}DilatedAttention", multihead_module=f"{module}MultiheadDilatedAttention", notes=notes,
    )


VARIANTS: Dict[str, Variant] = {
    v.name: v
    for v in (
        _on_dilated_op("standard", "PyTorch's own attention kernels on strided segment views", "sdpa", ""),
        _on_dilated_op("improved", "the fastest kernels we have for the device; elsewhere as standard", "auto",
                       "Improved", "our Triton forward on CUDA (sm80+) for float16/bfloat16, head_dim 64, groups "
                       "mode, no dropout"),
        dataclasses.replace(
            _on_dilated_op("ring", "ring attention (SPEC section 5): in one process the op of improved; in a "
                           "process group each rank passes its contiguous shard", "auto", "Ring",
                           "in a process group: the ring strategy of `distributed` (segments spanning shards "
                           "pass their dilated K/V rows rank to rank), no dropout there; the table's op is the "
                           "one-process one"),
            options=("process_group", "layout"), process_group=True),
        Variant(
            "distributed", "sequence-parallel attention over the ranks of a process group (SPEC section 5): "
            "each rank passes its contiguous shard",
            op=torch.ops.dilated.ulysses_attention, args=_ulysses_args, options=("process_group", "strategy"),
            devices=(("cpu", _ALL_DTYPES), ("cuda", _ALL_DTYPES)), causal=True, masks=True, gqa=True,
            process_group=True, module="DistributedDilatedAttention",
            multihead_module="DistributedMultiheadDilatedAttention",
            notes="strategy 'longnet' (the single-device op per shard, dilated K/V rows of segments spanning "
                  "shards all-gathered), 'ring' (those rows passed rank to rank) or 'ulysses' (all-to-all over "
                  "heads); 'auto' picks longnet or ulysses; rewrites emit the Ulysses op; GQA and key padding in "
                  "every strategy (ulysses: the group's size divides the KV heads); one process: the op of "
                  "improved",
        ),
        Variant(
            "block_sparse", "attention over the active blocks of a block layout (SPEC section 4)",
            op=torch.ops.dilated.block_sparse_attention, args=_block_sparse_args, options=("sparse_config",),
            devices=(("cpu", _ALL_DTYPES), ("cuda", _ALL_DTYPES)), causal=True, masks=True, gqa=True,
            module="BlockSparseRingDilatedAttention", multihead_module="BlockSparseRingMultiheadDilatedAttention",
            notes="patterns of `SparsePatternConfig` (local_window, global_local, dilated_sparse, a block mask); "
                  "active blocks gathered per query block",
        ),
    )
}
NAMES = ("auto",) + tuple(VARIANTS)


def get(name: str) -> Variant:
    """The built variant called ``name`` (not "auto": see :func:`choose`). ValueError for an
    unknown name, NotImplementedError for one not built yet."""
    if name not in VARIANTS:
        names = ("auto",) + tuple(VARIANTS)
        raise ValueError(f"implementation must be one of {', '.join(map(repr, names))}: got {name!r}")
    variant = VARIANTS[name]
    if variant.missing:
        raise NotImplementedError(variant.missing)
    return variant


def choose(max_seq_len: Optional[int] = None, device=None) -> Tuple[str, str]:
    """What "auto" picks, and why: distributed when a process group of world size > 1 is
    initialized; ring when the declared ``max_seq_len`` exceeds :data:`RING_MIN_SEQ_LEN`;
    improved on CUDA (``device`` if given, else whether CUDA is available); standard otherwise."""
    if max_seq_len is not None:
        _checks.check_positive_int("max_seq_len", max_seq_len)
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


def _dtype_names(dtypes) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def markdown_table() -> str:
    """The table as Markdown (the README's copy is checked against it)."""
    yes = {True: "yes", False: "no"}
    rows = ["| name | what it runs | devices: dtypes | head_dim | causal | dropout | masks | GQA | "
            "process group | modules | notes |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for v in VARIANTS.values():
        if not v.built:
            rows.append(f"| `{v.name}` | {v.summary} | not built | | | | | | | | {v.missing} |")
            continue
        devices = "; ".join(f"{dev}: {_dtype_names(dts)}" for dev, dts in v.devices)
        rows.append(
            f"| `{v.name}` | {v.summary} | {devices} | {v.head_dims} | {yes[v.causal]} | {yes[v.dropout]} | "
            f"{yes[v.masks]} | {yes[v.gqa]} | {yes[v.process_group]} | `{v.module}`, `{v.multihead_module}` | "
            f"{v.notes} |"
        )
    return "\n".join(rows)
