"""The v0.2.0 attention modules, thin over the ``dilated`` ops: each forward is one op call, so
``torch.compile`` and ``torch.export`` see one node per attention call.

Each class names its row of the variant table (``implementation``, :mod:`dilated_ops.variants`),
whose op arguments it passes: standard (``DilatedAttention``, ``MultiheadDilatedAttention``),
improved (``Improved*``), ring (``Ring*``: in one process the op of improved, SPEC section 5;
across processes not built yet, NotImplementedError). The multihead modules run the attention
block of :mod:`dilated_ops.attention_block`.

The modules hold no buffers: the index math is strided views computed per call.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from . import _env, variants
from .attention_block import attention_block
from .config import DilatedAttentionConfig, MultiheadConfig, check_heads_cover_groups
from .functional import dilated_attention

_DIRECT = "constructed directly"


class DilatedAttention(nn.Module):
    """Dilated attention of q, k, v ``(batch, seq, heads, head_dim)`` (see
    :func:`dilated_ops.dilated_attention` for the pattern). Implementation "standard":
    PyTorch's attention kernels.

    Args:
        segment_lengths, dilation_rates: the branches ``(w_i, r_i)``.
        dropout: attention-probability dropout, in training mode only.
        use_tf32: recorded only (see :class:`DilatedAttentionConfig`).
        mode: "groups" (v0.2.0's numerics) or "longnet".

    ``forward(query, key, value, is_causal=False)`` returns ``(batch, seq, heads, head_dim)``.
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
        attention_mask: Optional[Tensor] = None,
    ) -> Tensor:
        if attention_mask is not None:
            raise ValueError(
                "attention_mask is not supported by dilated attention: got a tensor of shape "
                f"{tuple(attention_mask.shape)}; use is_causal=True for causal masking"
            )
        return dilated_attention(
            query, key, value, self.segment_lengths, self.dilation_rates, mode=self.mode,
            is_causal=is_causal, dropout_p=self.dropout if self.training else 0.0, **self.op_kwargs,
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
    ``backend="auto"``); where we have none faster, the same kernels as "standard"."""

    implementation = "improved"


def _check_single_process(owner: str) -> None:
    world = _env.distributed_world_size()
    if world > 1:
        raise NotImplementedError(
            f"{owner}: ring attention across processes (SPEC section 5) is not built yet; a "
            f"torch.distributed process group of world size {world} is initialized. In one "
            "process ring equals 'improved' (create_*_dilated_attention('improved', ...))."
        )


class RingDilatedAttention(ImprovedDilatedAttention):
    """Ring dilated attention, single process: SPEC section 5 fixes the ring result to equal
    plain dilated attention, so this calls the same op as :class:`ImprovedDilatedAttention`
    (whose memory is already linear in the sequence length). With a torch.distributed process
    group of world size > 1 it raises NotImplementedError: ring attention across processes is
    not built yet."""

    implementation = "ring"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        _check_single_process(type(self).__name__)

    def forward(self, query, key, value, is_causal=False, attention_mask=None):
        if not torch.compiler.is_compiling():  # a process group created after construction
            _check_single_process(type(self).__name__)
        return super().forward(query, key, value, is_causal, attention_mask)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", single process: same op as 'improved'"


def init_magneto(attn: nn.Module, gamma_init: float) -> None:
    """MAGNETO init (https://arxiv.org/abs/2210.06423, Fig. 2) of ``attn``'s ``q_proj``,
    ``k_proj``, ``v_proj``, ``out_proj``: xavier-normal, gain ``gamma_init`` on the value and
    output projections only; zero biases."""
    for proj, gain in ((attn.q_proj, 1.0), (attn.k_proj, 1.0), (attn.v_proj, gamma_init),
                       (attn.out_proj, gamma_init)):
        nn.init.xavier_normal_(proj.weight, gain=gain)
        if proj.bias is not None:
            nn.init.zeros_(proj.bias)


class MultiheadDilatedAttention(nn.Module):
    """Multi-head dilated self-attention, MAGNETO style as v0.2.0: separate ``q_proj``,
    ``k_proj``, ``v_proj``; dilated attention per head; optional LayerNorm of the attention
    output; ``out_proj``. ``gamma_init`` is the xavier-normal gain of ``v_proj`` and
    ``out_proj`` (gain 1 on ``q_proj``/``k_proj``); biases start at zero.

    The positional order ``(embed_dim, num_heads, dilation_rates, segment_lengths, ...)`` is
    v0.2.0's. ``forward(query, key, value)`` takes ``(batch, seq, embed_dim)`` (or
    ``(seq, batch, embed_dim)`` with ``batch_first=False``) and returns ``(output, None)`` with
    output shaped as query. key and value must have query's shape (no cross-attention).
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
    ):
        super().__init__()
        self.multihead_config = MultiheadConfig(
            embed_dim, num_heads, bias, layer_norm, layer_norm_eps, gamma_init, batch_first
        )
        self.attention = self.attention_class(segment_lengths, dilation_rates, dropout, use_tf32, mode)
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
    ):
        """Returns ``(output, None)``: dilated attention has no weight matrix to return, so
        ``need_weights`` changes nothing (as in v0.2.0). ``key``/``value`` default to ``query``."""
        key = query if key is None else key
        value = query if value is None else value
        if attn_mask is not None:
            raise ValueError(
                "attn_mask is not supported by dilated attention: got a tensor of shape "
                f"{tuple(attn_mask.shape)}; use is_causal=True for causal masking"
            )
        self._check_inputs(query, key, value)
        return attention_block(
            query, key, value, lambda q, k, v: (self.q_proj(q), self.k_proj(k), self.v_proj(v)),
            lambda q, k, v: self.attention(q, k, v, is_causal=is_causal), self.out_proj, self.num_heads,
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
    """:class:`MultiheadDilatedAttention` over :class:`ImprovedDilatedAttention`."""

    implementation = "improved"
    attention_class = ImprovedDilatedAttention


class RingMultiheadDilatedAttention(MultiheadDilatedAttention):
    """:class:`MultiheadDilatedAttention` over :class:`RingDilatedAttention`: in one process the
    same op as "improved"; across processes NotImplementedError (not built yet)."""

    implementation = "ring"
    attention_class = RingDilatedAttention
