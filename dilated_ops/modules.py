"""The v0.2.0 attention modules, thin over the ``dilated`` ops: each forward is one op call, so
``torch.compile`` and ``torch.export`` see one node per attention call.

Each class names its row of the variant table (``implementation``, :mod:`dilated_ops.variants`),
whose op arguments it passes: standard (``DilatedAttention``, ``MultiheadDilatedAttention``),
improved (``Improved*``), ring (``Ring*``: in one process the op of improved, SPEC section 5;
in a process group each rank's shard, the ring strategy), distributed (``Distributed*``: each
rank's shard of a sequence sharded over a process group, any strategy). The multihead modules run the attention
block of :mod:`dilated_ops.attention_block`.

The modules hold no buffers: the index math is strided views computed per call.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from . import _env, variants
from .attention_block import attention_block
from .config import DilatedAttentionConfig, MultiheadConfig, SparsePatternConfig, check_heads_cover_groups
from .functional import block_sparse_attention, dilated_attention
from .sequence_parallel import check_layout, check_strategy, sequence_parallel_attention

_DIRECT = "constructed directly"


class DilatedAttention(nn.Module):
    """Dilated attention of q, k, v ``(batch, seq, heads, head_dim)``, one
    :func:`dilated_ops.dilated_attention` call per forward. Implementation "standard" (its row
    of :mod:`dilated_ops.variants`): PyTorch's attention kernels on strided segment views.

    Each branch ``(w, r)`` cuts the sequence into segments of ``w`` tokens and, inside each,
    lets every ``r``-th token attend to every ``r``-th token. ``segment_lengths=[4, 8]``,
    ``dilation_rates=[1, 2]``, 8 tokens, 2 heads, ``mode="groups"`` (head group ``i`` runs
    branch ``i`` at offset ``i % r_i``); ``x`` = the positions a head attends among, ``.`` =
    positions that branch gives nothing to::

        head 0, branch (w=4, r=1):  x x x x | x x x x    two segments, dense inside each
        head 1, branch (w=8, r=2):  . x . x . x . x      one segment, every 2nd token, offset 1

    With ``mode="longnet"`` every head runs every branch (head ``j`` at offset ``j % r_i``) and
    the branches are combined by softmax weight.

    Args:
        segment_lengths: the branches' segment lengths ``w_i``; a last segment shorter than
            ``w_i`` (or a sequence shorter than ``w_i``) is attended as it is.
        dilation_rates: the branches' rates ``r_i``, as many as segment_lengths,
            ``w_i % r_i == 0``.
        dropout: attention-probability dropout in ``[0, 1)``, applied in training mode only.
        use_tf32: recorded only, for v0.2.0 compatibility (see :class:`DilatedAttentionConfig`).
        mode: ``"groups"`` (heads split into one contiguous group per branch, v0.2.0's
            numerics) or ``"longnet"`` (every head in every branch, the LongNet paper).

    Raises:
        TypeError, ValueError: from :class:`DilatedAttentionConfig`, naming the argument (e.g. a
            segment length not divisible by its rate, dropout outside ``[0, 1)``).

    Attributes:
        config: the :class:`DilatedAttentionConfig`.
        backend: the op's ``backend`` argument this class passes.
        selection_reason: why the factory picked this class ("constructed directly" otherwise).
    """

    implementation = "standard"

    def __init__(
        self,
        segment_lengths: Sequence[int],
        dilation_rates: Sequence[int],
        dropout: float = 0.0,
        use_tf32: bool = True,
        mode: str = "groups",
    ):
        super().__init__()
        self.config = DilatedAttentionConfig(segment_lengths, dilation_rates, dropout, use_tf32, mode)
        # Plain attributes (lists, as the op's schema takes them): cheap for Dynamo to read.
        self.segment_lengths = list(self.config.segment_lengths)
        self.dilation_rates = list(self.config.dilation_rates)
        self.dropout = self.config.dropout
        self.mode = self.config.mode
        self.op_kwargs = variants.get(self.implementation).op_kwargs
        self.selection_reason = _DIRECT

    @property
    def backend(self) -> str:
        """The op's ``backend`` argument this module passes (from its variant's row)."""
        return self.op_kwargs.get("backend")

    def forward(
        self, query: Tensor, key: Tensor, value: Tensor, is_causal: bool = False,
        attention_mask: Optional[Tensor] = None, key_padding_mask: Optional[Tensor] = None,
    ) -> Tensor:
        """Dilated attention of the already-split heads.

        Args:
            query: ``(batch, seq, heads, head_dim)``; in "groups" mode ``heads`` must be at
                least the number of branches.
            key: ``(batch, seq, heads_kv, head_dim)``, as query or with fewer heads
                (grouped-query attention, as :func:`dilated_ops.dilated_attention`).
            value: as key.
            is_causal: mask keys after the query inside each segment.
            attention_mask: must be None (dilated attention takes no general mask); kept for
                v0.2.0's signature.
            key_padding_mask: ``(batch, seq)`` bool, True = keep the key (as
                :func:`dilated_ops.dilated_attention`; the multihead modules take
                ``nn.MultiheadAttention``'s convention instead).

        Returns:
            ``(batch, seq, heads, head_dim)``, in query's dtype, device and memory order.

        Raises:
            ValueError: ``attention_mask`` is given.
            TypeError, ValueError: bad q, k, v (not 4-D, unsupported dtype, shapes, dtypes or
                devices that differ, fewer heads than branches in "groups" mode), as
                :func:`dilated_ops.dilated_attention`.
            NotImplementedError: q, k or v carries a forward-mode AD tangent.
        """
        if attention_mask is not None:
            raise ValueError(
                "attention_mask is not supported by dilated attention: got a tensor of shape "
                f"{tuple(attention_mask.shape)}; use is_causal=True for causal masking and key_padding_mask for "
                "padding"
            )
        return self._attend(query, key, value, is_causal, key_padding_mask)

    def _attend(self, query: Tensor, key: Tensor, value: Tensor, is_causal: bool,
                key_padding_mask: Optional[Tensor] = None) -> Tensor:
        return dilated_attention(
            query, key, value, self.segment_lengths, self.dilation_rates, mode=self.mode,
            is_causal=is_causal, dropout_p=self.dropout if self.training else 0.0, key_padding_mask=key_padding_mask,
            **self.op_kwargs,
        )

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"implementation={self.implementation!r} ({self.selection_reason}), backend={self.backend!r}, "
            f"segment_lengths={list(c.segment_lengths)}, dilation_rates={list(c.dilation_rates)}, "
            f"mode={c.mode!r}, dropout={c.dropout}, use_tf32={c.use_tf32}"
        )


class ImprovedDilatedAttention(DilatedAttention):
    """:class:`DilatedAttention` on the fastest kernel we have for the device (the op's
    ``backend="auto"``; the "improved" row of :mod:`dilated_ops.variants` says which); where we
    have none faster, the same kernels as "standard". Same arguments, shapes and errors as
    :class:`DilatedAttention`: q, k, v ``(batch, seq, heads, head_dim)`` in, the same shape
    out."""

    implementation = "improved"


def _group_size(process_group) -> int:
    """The size of ``process_group`` (None: the default group's, 1 when none is initialized)."""
    if process_group is not None:
        return torch.distributed.get_world_size(process_group)
    return _env.distributed_world_size()


def _check_group(process_group) -> None:
    if process_group is not None and not isinstance(process_group, torch.distributed.ProcessGroup):
        raise TypeError(f"process_group must be a torch.distributed.ProcessGroup or None: got "
                        f"{type(process_group).__name__}")


class RingDilatedAttention(ImprovedDilatedAttention):
    """Ring dilated attention (SPEC section 5). In one process the ring result is the plain
    result, so this calls the same op as :class:`ImprovedDilatedAttention` (whose memory is
    already linear in the sequence length). In a process group of world size > 1 each rank
    passes its contiguous shard ``(batch, seq / P, heads, head_dim)`` and gets its slice of the
    output: :func:`dilated_ops.sequence_parallel_attention` with ``strategy="ring"`` (each shard
    on the single-device op; the dilated K/V rows of segments that span shards travel the ring).
    Same arguments as :class:`DilatedAttention`, plus the keywords ``process_group`` (None: the
    default group, looked up at each call) and ``layout``: ``"contiguous"`` (default) or
    ``"zigzag"`` (each rank passes chunks ``p`` and ``2P - 1 - p`` of ``2P``, as
    :func:`dilated_ops.shard_sequence` cuts them with ``layout="zigzag"``: with causal attention
    every rank then does the same work).

    Raises:
        ValueError: an unknown ``layout``; at forward in a process group of world size > 1:
            dropout in training mode (the ring op has none), or as
            :func:`dilated_ops.sequence_parallel_attention` (segments that do not fit the shards,
            shards of different shapes).
    """

    implementation = "ring"

    def __init__(self, segment_lengths: Sequence[int], dilation_rates: Sequence[int], dropout: float = 0.0,
                 use_tf32: bool = True, mode: str = "groups", process_group=None, layout: str = "contiguous"):
        super().__init__(segment_lengths, dilation_rates, dropout, use_tf32, mode)
        _check_group(process_group)
        check_layout(layout)
        self.process_group, self.layout = process_group, layout

    def _attend(self, query: Tensor, key: Tensor, value: Tensor, is_causal: bool,
                key_padding_mask: Optional[Tensor] = None) -> Tensor:
        if _group_size(self.process_group) == 1:
            return super()._attend(query, key, value, is_causal, key_padding_mask)
        if self.dropout and self.training:
            raise ValueError(f"dropout must be 0.0 for ring attention across processes (its op has no attention "
                             f"dropout): got {self.dropout!r} in training mode")
        return sequence_parallel_attention(query, key, value, self.segment_lengths, self.dilation_rates,
                                           strategy="ring", mode=self.mode, is_causal=is_causal,
                                           group=self.process_group, layout=self.layout,
                                           key_padding_mask=key_padding_mask)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", in a process group: each rank's shard ({self.layout}), strategy 'ring'"


class DistributedDilatedAttention(ImprovedDilatedAttention):
    """Sequence-parallel dilated attention (SPEC section 5; the "distributed" row of
    :mod:`dilated_ops.variants`): each rank of ``process_group`` passes its contiguous shard of
    the sequence and gets its slice of the single-process result, forward and backward (see
    :func:`dilated_ops.sequence_parallel_attention`, which draws the strategies). Outside a process
    group of world size > 1 it is :class:`ImprovedDilatedAttention` (the same result).

    Args:
        segment_lengths, dilation_rates, use_tf32, mode: as :class:`DilatedAttention`, for the
            whole sequence.
        dropout: must be 0.0 (the sequence-parallel op has no attention dropout).
        process_group: the ``torch.distributed`` group the sequence is sharded over (None: the
            default group, looked up at each call).
        strategy: ``"auto"`` (default: ``"longnet"`` where the segments fit the shards, else
            ``"ulysses"``), ``"longnet"`` (segments inside a shard need no communication; longer
            ones all-gather their dilated K/V rows), ``"ring"`` (those rows passed rank to rank)
            or ``"ulysses"`` (all-to-all over heads: the group's size must divide the heads and
            the KV heads).

    ``forward(query, key, value, is_causal=False, key_padding_mask=None)``: ``(batch, seq / P,
    heads, head_dim)`` in and out, this rank's shard (:func:`dilated_ops.shard_sequence` cuts
    one); key and value may have fewer heads (grouped-query attention), ``key_padding_mask`` is
    this rank's ``(batch, seq / P)`` shard of the bool mask (True = keep).

    Raises:
        ValueError: ``dropout`` > 0, an unknown ``strategy``; at forward, as
            :func:`dilated_ops.sequence_parallel_attention` (a strategy the geometry does not
            allow, shards of different shapes).
    """

    implementation = "distributed"

    def __init__(self, segment_lengths: Sequence[int], dilation_rates: Sequence[int], dropout: float = 0.0,
                 use_tf32: bool = True, mode: str = "groups", process_group=None, strategy: str = "auto"):
        super().__init__(segment_lengths, dilation_rates, dropout, use_tf32, mode)
        if dropout:
            raise ValueError(f"dropout must be 0.0 for distributed (its op has no attention dropout): got {dropout!r}")
        check_strategy(strategy)
        _check_group(process_group)
        self.process_group, self.strategy = process_group, strategy

    def _attend(self, query: Tensor, key: Tensor, value: Tensor, is_causal: bool,
                key_padding_mask: Optional[Tensor] = None) -> Tensor:
        if _group_size(self.process_group) == 1:  # one process: the plain op, the same result
            return dilated_attention(query, key, value, self.segment_lengths, self.dilation_rates, mode=self.mode,
                                     is_causal=is_causal, backend="auto", key_padding_mask=key_padding_mask)
        return sequence_parallel_attention(query, key, value, self.segment_lengths, self.dilation_rates,
                                           strategy=self.strategy, mode=self.mode, is_causal=is_causal,
                                           group=self.process_group, key_padding_mask=key_padding_mask)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", strategy={self.strategy!r}"


def init_magneto(attn: nn.Module, gamma_init: float) -> None:
    """MAGNETO init (https://arxiv.org/abs/2210.06423, Fig. 2) of ``attn``'s ``q_proj``,
    ``k_proj``, ``v_proj``, ``out_proj``: xavier-normal, gain ``gamma_init`` on the value and
    output projections only; zero biases.

    Args:
        attn: a module with ``nn.Linear`` attributes ``q_proj``, ``k_proj``, ``v_proj`` and
            ``out_proj`` (weights ``(out_features, in_features)``, biases optional).
        gamma_init: the xavier-normal gain of ``v_proj`` and ``out_proj``.

    Returns:
        None; the weights and biases are overwritten in place (from the global RNG, so
        ``torch.manual_seed`` makes it repeatable).
    """
    for proj, gain in ((attn.q_proj, 1.0), (attn.k_proj, 1.0), (attn.v_proj, gamma_init),
                       (attn.out_proj, gamma_init)):
        nn.init.xavier_normal_(proj.weight, gain=gain)
        if proj.bias is not None:
            nn.init.zeros_(proj.bias)


class MultiheadDilatedAttention(nn.Module):
    """Multi-head dilated self-attention, MAGNETO style as v0.2.0: separate ``q_proj``,
    ``k_proj``, ``v_proj``; dilated attention per head (:class:`DilatedAttention`, whose
    docstring draws the segments and dilation; "standard" row of :mod:`dilated_ops.variants`);
    optional LayerNorm of the attention output; ``out_proj``. ``gamma_init`` is the
    xavier-normal gain of ``v_proj`` and ``out_proj`` (gain 1 on ``q_proj``/``k_proj``); biases
    start at zero.

    ``forward(query, key=None, value=None, need_weights=False, attn_mask=None,
    is_causal=False)`` takes ``(batch, seq, embed_dim)`` (or ``(seq, batch, embed_dim)`` with
    ``batch_first=False``) and returns ``(output, None)`` with output shaped as query. key and
    value must have query's shape (no cross-attention).

    Args:
        embed_dim: the model width, query's last dim; split into ``num_heads`` heads of
            ``embed_dim // num_heads``.
        num_heads: divides embed_dim; in "groups" mode at least ``len(segment_lengths)`` (one
            head group per branch).
        dilation_rates: the branches' rates ``r_i``. Note the positional order
            ``(embed_dim, num_heads, dilation_rates, segment_lengths, ...)``: v0.2.0's.
        segment_lengths: the branches' segment lengths ``w_i`` (``w_i % r_i == 0``).
        dropout: attention-probability dropout in ``[0, 1)``, training mode only.
        bias: biases of the q/k/v/out projections.
        layer_norm: LayerNorm of the merged heads before ``out_proj`` (MAGNETO's sub-LN).
        layer_norm_eps: that LayerNorm's eps (> 0).
        gamma_init: xavier-normal gain of ``v_proj`` and ``out_proj`` (> 0).
        device, dtype: of the parameters.
        batch_first: keyword-only; True (default): inputs ``(batch, seq, embed_dim)``; False:
            ``(seq, batch, embed_dim)``.
        use_tf32: keyword-only; recorded only (see :class:`DilatedAttentionConfig`).
        mode: keyword-only; ``"groups"`` (v0.2.0's numerics) or ``"longnet"``.

    Raises:
        TypeError, ValueError: from :class:`MultiheadConfig` / :class:`DilatedAttentionConfig`,
            naming the argument: e.g. ``embed_dim`` not divisible by ``num_heads``, fewer heads
            than branches in "groups" mode, a segment length not divisible by its rate.

    Attributes:
        q_proj, k_proj, v_proj, out_proj: ``nn.Linear(embed_dim, embed_dim)``.
        norm: the ``nn.LayerNorm(embed_dim)``, or None with ``layer_norm=False``.
        attention: the :class:`DilatedAttention` (subclass) run on the heads.
        multihead_config, attention_config: the validated configs.
        selection_reason: why the factory picked this class ("constructed directly" otherwise).
    """

    implementation = "standard"
    attention_class = DilatedAttention

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        dilation_rates: Sequence[int],
        segment_lengths: Sequence[int],
        dropout: float = 0.0,
        bias: bool = True,
        layer_norm: bool = True,
        layer_norm_eps: float = 1e-5,
        gamma_init: float = 1.0,
        device=None,
        dtype: Optional[torch.dtype] = None,
        *,
        batch_first: bool = True,
        use_tf32: bool = True,
        mode: str = "groups",
        **attention_options,
    ):
        super().__init__()
        self.multihead_config = MultiheadConfig(
            embed_dim, num_heads, bias, layer_norm, layer_norm_eps, gamma_init, batch_first
        )
        # attention_options: the variant's own options (variants.Variant.options), for its class.
        self.attention = self.attention_class(
            segment_lengths, dilation_rates, dropout=dropout, use_tf32=use_tf32, mode=mode, **attention_options)
        check_heads_cover_groups(self.multihead_config, self.attention.config)
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.head_dim = embed_dim // num_heads
        self.batch_first = batch_first
        self.gamma_init = gamma_init
        kw = {"device": device, "dtype": dtype}
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **kw)
        self.k_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **kw)
        self.v_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **kw)
        self.norm = nn.LayerNorm(embed_dim, eps=layer_norm_eps, **kw) if layer_norm else None
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **kw)
        self.selection_reason = _DIRECT
        self._reset_parameters()

    @property
    def attention_config(self) -> DilatedAttentionConfig:
        """The :class:`DilatedAttentionConfig` of :attr:`attention`."""
        return self.attention.config

    def _reset_parameters(self) -> None:
        init_magneto(self, self.gamma_init)

    def _check_inputs(self, query: Tensor, key: Tensor, value: Tensor) -> None:
        layout = "(batch, seq, embed_dim)" if self.batch_first else "(seq, batch, embed_dim)"
        for name, t in (("query", query), ("key", key), ("value", value)):
            if t.dim() != 3:
                raise ValueError(f"{name} must be 3-D {layout}: got shape {tuple(t.shape)}")
        if query.shape[-1] != self.embed_dim:
            raise ValueError(
                f"query's last dim must be embed_dim ({self.embed_dim}): got shape {tuple(query.shape)}"
            )
        if key.shape != query.shape or value.shape != query.shape:
            raise ValueError(
                f"key and value must have query's shape {layout}: got query {tuple(query.shape)}, "
                f"key {tuple(key.shape)}, value {tuple(value.shape)} (cross-attention with another "
                "key length is not supported by dilated attention)"
            )

    def forward(
        self,
        query: Tensor,
        key: Optional[Tensor] = None,
        value: Optional[Tensor] = None,
        need_weights: bool = False,
        attn_mask: Optional[Tensor] = None,
        is_causal: bool = False,
        key_padding_mask: Optional[Tensor] = None,
    ):
        """Multi-head dilated attention of ``query`` over ``key``/``value`` (self-attention:
        they must have query's shape).

        Args:
            query: ``(batch, seq, embed_dim)``, or ``(seq, batch, embed_dim)`` with
                ``batch_first=False``.
            key: query's shape; None (default) means ``query``.
            value: query's shape; None (default) means ``query``.
            need_weights: ignored: dilated attention has no weight matrix to return, so
                ``need_weights`` changes nothing (as in v0.2.0); the second output is None.
            attn_mask: must be None; use ``is_causal`` for causal masking.
            is_causal: mask keys after the query inside each segment.
            key_padding_mask: ``(batch, seq)`` bool in ``nn.MultiheadAttention``'s convention,
                True = padding (the key is ignored); a query that sees no key gets 0 before the
                output projection.

        Returns:
            ``(output, None)``: ``output`` has query's shape, ``(batch, seq, embed_dim)`` or
            ``(seq, batch, embed_dim)``.

        Raises:
            ValueError: ``attn_mask`` is given; query, key or value is not 3-D; query's last
                dim is not ``embed_dim``; key or value differs from query's shape.
            TypeError, ValueError, NotImplementedError: as :meth:`DilatedAttention.forward`
                for the projected heads (e.g. an unsupported dtype).
        """
        key = query if key is None else key
        value = query if value is None else value
        if attn_mask is not None:
            raise ValueError(
                "attn_mask is not supported by dilated attention: got a tensor of shape "
                f"{tuple(attn_mask.shape)}; use is_causal=True for causal masking and key_padding_mask for "
                "padding"
            )
        self._check_inputs(query, key, value)
        keep = None
        if key_padding_mask is not None:
            if not isinstance(key_padding_mask, Tensor) or key_padding_mask.dtype != torch.bool:
                raise TypeError("key_padding_mask must be a bool tensor (batch, seq), True = padding as in "
                                f"nn.MultiheadAttention: got {getattr(key_padding_mask, 'dtype', type(key_padding_mask))}")
            keep = ~key_padding_mask
        return attention_block(
            query, key, value, lambda q, k, v: (self.q_proj(q), self.k_proj(k), self.v_proj(v)),
            lambda q, k, v: self.attention(q, k, v, is_causal=is_causal, key_padding_mask=keep), self.out_proj,
            self.num_heads,
            self.head_dim, seq_first=not self.batch_first, norm=self.norm,
        ), None

    def extra_repr(self) -> str:
        m = self.multihead_config
        return (
            f"implementation={self.implementation!r} ({self.selection_reason}), "
            f"embed_dim={m.embed_dim}, num_heads={m.num_heads}, batch_first={m.batch_first}, "
            f"layer_norm={m.layer_norm}, gamma_init={m.gamma_init}"
        )


class ImprovedMultiheadDilatedAttention(MultiheadDilatedAttention):
    """:class:`MultiheadDilatedAttention` over :class:`ImprovedDilatedAttention` (the fastest
    kernels we have for the device). Same arguments, shapes (``(batch, seq, embed_dim)`` in,
    ``(output, None)`` out) and errors as :class:`MultiheadDilatedAttention`."""

    implementation = "improved"
    attention_class = ImprovedDilatedAttention


class RingMultiheadDilatedAttention(MultiheadDilatedAttention):
    """:class:`MultiheadDilatedAttention` over :class:`RingDilatedAttention`: in one process the
    same op as "improved"; in a process group of world size > 1 each rank passes its shard
    ``(batch, seq / P, embed_dim)`` (the projections work per token) and the attention runs as a
    ring. Same arguments and shapes as :class:`MultiheadDilatedAttention` (``(output, None)``
    out), plus the keywords ``process_group`` and ``layout`` of :class:`RingDilatedAttention`."""

    implementation = "ring"
    attention_class = RingDilatedAttention


class DistributedMultiheadDilatedAttention(MultiheadDilatedAttention):
    """:class:`MultiheadDilatedAttention` over :class:`DistributedDilatedAttention`: each rank
    passes its contiguous shard ``(batch, seq / P, embed_dim)`` of the sequence (the projections
    are per token) and gets its shard of the output, ``(output, None)``. Same arguments as
    :class:`MultiheadDilatedAttention`, plus the keywords ``process_group`` and ``strategy`` of
    :class:`DistributedDilatedAttention`."""

    implementation = "distributed"
    attention_class = DistributedDilatedAttention


class BlockSparseRingDilatedAttention(DilatedAttention):
    """Block-sparse attention (SPEC section 4; the "block_sparse" row of
    :mod:`dilated_ops.variants`) of q, k, v ``(batch, seq, heads, head_dim)``, v0.2.0's name and
    arguments: the layout is ``sparse_config``'s pattern (see
    :class:`~dilated_ops.SparsePatternConfig` and :func:`dilated_ops.block_sparse_attention`;
    ``dilated_sparse`` reads ``segment_lengths``/``dilation_rates``), one exact softmax over each
    query's active key blocks.

    Args:
        segment_lengths, dilation_rates: the branches ``(w_i, r_i)`` (checked as for dilated
            attention; read by the ``dilated_sparse`` pattern).
        sparse_config: a :class:`~dilated_ops.SparsePatternConfig` (None: its defaults). Its
            ``pattern_type`` may not be ``"mask"`` here (a module has no mask to pass; call
            :func:`dilated_ops.block_sparse_attention` with ``block_mask=``).
        dropout: must be 0.0 (the block-sparse op has no attention dropout).
        use_tf32, mode: kept for the common signature; ``mode`` changes nothing here.

    ``forward(query, key, value, is_causal=False, key_padding_mask=None)`` returns ``(batch, seq,
    heads, head_dim)``; key and value may have fewer heads (grouped-query attention),
    ``key_padding_mask`` ``(batch, seq)`` bool is True for keys to keep.

    Raises:
        ValueError / TypeError: ``dropout`` > 0, a ``sparse_config`` of another type or with
        ``pattern_type="mask"``, bad segments.
    """

    implementation = "block_sparse"

    def __init__(self, segment_lengths: Sequence[int], dilation_rates: Sequence[int],
                 sparse_config: Optional[SparsePatternConfig] = None, dropout: float = 0.0, use_tf32: bool = True,
                 mode: str = "groups"):
        super().__init__(segment_lengths, dilation_rates, dropout, use_tf32, mode)
        if dropout:
            raise ValueError(f"dropout must be 0.0 for block_sparse (its op has no attention dropout): got {dropout!r}")
        sparse_config = SparsePatternConfig() if sparse_config is None else sparse_config
        if not isinstance(sparse_config, SparsePatternConfig):
            raise TypeError(f"sparse_config must be a SparsePatternConfig or None: got {type(sparse_config).__name__}")
        if sparse_config.pattern_type == "mask":
            raise ValueError("sparse_config.pattern_type must name a pattern for a module: got 'mask' (pass "
                             "block_mask= to dilated_ops.block_sparse_attention instead)")
        self.sparse_config = sparse_config

    def _attend(self, query: Tensor, key: Tensor, value: Tensor, is_causal: bool,
                key_padding_mask: Optional[Tensor] = None) -> Tensor:
        return block_sparse_attention(query, key, value, self.sparse_config, is_causal=is_causal,
                                      segment_lengths=self.segment_lengths, dilation_rates=self.dilation_rates,
                                      key_padding_mask=key_padding_mask)

    def extra_repr(self) -> str:
        c = self.config
        return (f"implementation={self.implementation!r} ({self.selection_reason}), {self.sparse_config}, "
                f"segment_lengths={list(c.segment_lengths)}, dilation_rates={list(c.dilation_rates)}")


class BlockSparseRingMultiheadDilatedAttention(MultiheadDilatedAttention):
    """:class:`MultiheadDilatedAttention` over :class:`BlockSparseRingDilatedAttention`, with
    v0.2.0's argument order for this class (``segment_lengths`` before ``dilation_rates``, then
    ``dropout, bias, sparse_config, batch_first``). ``forward`` as
    :meth:`MultiheadDilatedAttention.forward`: ``(batch, seq, embed_dim)`` in, ``(output,
    None)`` out."""

    implementation = "block_sparse"
    attention_class = BlockSparseRingDilatedAttention

    def __init__(self, embed_dim: int, num_heads: int, segment_lengths: Sequence[int], dilation_rates: Sequence[int],
                 dropout: float = 0.0, bias: bool = True, sparse_config: Optional[SparsePatternConfig] = None,
                 batch_first: bool = True, layer_norm: bool = True, layer_norm_eps: float = 1e-5,
                 gamma_init: float = 1.0, device=None, dtype: Optional[torch.dtype] = None, *,
                 use_tf32: bool = True, mode: str = "groups"):
        super().__init__(embed_dim, num_heads, dilation_rates, segment_lengths, dropout, bias, layer_norm,
                         layer_norm_eps, gamma_init, device, dtype, batch_first=batch_first, use_tf32=use_tf32,
                         mode=mode, sparse_config=sparse_config)
