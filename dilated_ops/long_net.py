"""LongNet as v0.2.0 builds it: sub-LN (MAGNETO) encoder and decoder layers over
:class:`MultiheadDilatedAttention`, the encoder-decoder ``LongNet`` and the language model
``LongNetLM``. Activations are ``(batch, seq, d_model)``.

Choices where v0.2.0 differs or is silent:
- The decoder's cross-attention over ``memory`` is dense multi-head attention on
  ``F.scaled_dot_product_attention`` (:class:`CrossAttention`, MAGNETO-initialised like the
  dilated one): dilated attention needs keys as long as queries, memory need not be.
- ``LongNet``'s default dilation rates are ``(1, 2, 4, 8, 16)``: the paper's ``(1, 2, 4, 6,
  12)`` do not divide its segment lengths 16384 and 32768, which SPEC section 1 requires.
- ``LongNetLM`` adds fixed sinusoidal positions to the token embeddings (v0.2.0 used torchscale's
  XPOS, a dependency we do not take) and initialises its output layer as v0.2.0 meant to
  (kaiming-normal weight, zero bias; v0.2.0 defined but never called that init).
- Each layer is constructed on its own (v0.2.0's ``nn.TransformerEncoder`` deep-copied one
  layer, so every layer started from identical weights).
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import _checks
from .factory import create_multihead_dilated_attention
from .modules import init_magneto

Activation = Union[str, Callable[[Tensor], Tensor]]
_ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu}


def _activation(activation: Activation) -> Callable[[Tensor], Tensor]:
    if callable(activation):
        return activation
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be 'relu', 'gelu' or a callable: got {activation!r}")
    return _ACTIVATIONS[activation]


class CrossAttention(nn.Module):
    """Dense multi-head attention of ``x`` ``(batch, tgt_len, embed_dim)`` over ``memory``
    ``(batch, src_len, embed_dim)`` with ``F.scaled_dot_product_attention``; MAGNETO layout and
    init as :class:`MultiheadDilatedAttention` (q/k/v projections with biases, LayerNorm,
    out_proj). The decoder's cross-attention: dilated attention needs keys as long as queries.

    Args:
        embed_dim: the model width (positive int), split into ``num_heads`` heads.
        num_heads: positive int dividing ``embed_dim``.
        dropout: attention-probability dropout in ``[0, 1)``, training mode only.
        layer_norm_eps: eps of the LayerNorm before ``out_proj``.
        gamma_init: xavier-normal gain of ``v_proj`` and ``out_proj`` (:func:`init_magneto`).
        device, dtype: of the parameters.

    Raises:
        TypeError, ValueError: ``embed_dim``/``num_heads`` not positive ints or not dividing,
            ``dropout`` not a number in ``[0, 1)``.
    """

    def __init__(self, embed_dim, num_heads, dropout=0.0, layer_norm_eps=1e-5, gamma_init=1.0,
                 device=None, dtype=None):
        super().__init__()
        _checks.check_embed_dim(embed_dim, num_heads)
        _checks.check_dropout(dropout, "dropout")
        self.num_heads, self.dropout = num_heads, dropout
        kw = {"device": device, "dtype": dtype}
        self.q_proj = nn.Linear(embed_dim, embed_dim, **kw)
        self.k_proj = nn.Linear(embed_dim, embed_dim, **kw)
        self.v_proj = nn.Linear(embed_dim, embed_dim, **kw)
        self.norm = nn.LayerNorm(embed_dim, eps=layer_norm_eps, **kw)
        self.out_proj = nn.Linear(embed_dim, embed_dim, **kw)
        init_magneto(self, gamma_init)

    def forward(self, x: Tensor, memory: Tensor, is_causal: bool = False) -> Tensor:
        """Attention of ``x`` over ``memory``.

        Args:
            x: the queries, ``(batch, tgt_len, embed_dim)``.
            memory: the keys and values, ``(batch, src_len, embed_dim)``.
            is_causal: SDPA's ``is_causal``: query ``i`` sees memory positions ``<= i`` (the
                mask is aligned at the top-left when ``tgt_len != src_len``).

        Returns:
            ``(batch, tgt_len, embed_dim)``.
        """
        # (batch, len, embed) -> (batch, heads, len, head_dim), SDPA's layout
        def heads(t):
            return t.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)

        out = F.scaled_dot_product_attention(
            heads(self.q_proj(x)), heads(self.k_proj(memory)), heads(self.v_proj(memory)),
            dropout_p=self.dropout if self.training else 0.0, is_causal=is_causal,
        )
        return self.out_proj(self.norm(out.transpose(1, 2).flatten(2)))


class _FeedForward(nn.Module):
    """Sub-LN feed-forward: LayerNorm, linear1, activation, dropout, LayerNorm, linear2."""

    def __init__(self, d_model, dim_feedforward, dropout, activation, layer_norm_eps, gamma_init, kw):
        super().__init__()
        self.norm_in = nn.LayerNorm(d_model, eps=layer_norm_eps, **kw)
        self.linear1 = nn.Linear(d_model, dim_feedforward, **kw)
        self.norm_mid = nn.LayerNorm(dim_feedforward, eps=layer_norm_eps, **kw)
        self.linear2 = nn.Linear(dim_feedforward, d_model, **kw)
        self.activation = _activation(activation)
        self.dropout = nn.Dropout(dropout)
        for lin in (self.linear1, self.linear2):
            nn.init.xavier_normal_(lin.weight, gain=gamma_init)
            nn.init.zeros_(lin.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.dropout(self.activation(self.linear1(self.norm_in(x))))
        return self.dropout(self.linear2(self.norm_mid(x)))


def _self_attention(attention_type, d_model, nhead, segment_lengths, dilation_rates, dropout,
                    layer_norm, layer_norm_eps, gamma_init, mode, kw):
    return create_multihead_dilated_attention(
        attention_type, embed_dim=d_model, num_heads=nhead, segment_lengths=segment_lengths,
        dilation_rates=dilation_rates, dropout=dropout, layer_norm=layer_norm,
        layer_norm_eps=layer_norm_eps, gamma_init=gamma_init, mode=mode, **kw,
    )


class DilatedTransformerEncoderLayer(nn.Module):
    """``x + SelfAttn(LN(x))`` then ``x + FF(x)``; the self-attention is a
    :class:`MultiheadDilatedAttention` with its output LayerNorm (sub-LN), the feed-forward
    ``LN, linear1, activation, dropout, LN, linear2, dropout``. Activations are
    ``(batch, seq, d_model)`` (always batch first).

    Args:
        d_model: the model width (positive int).
        nhead: attention heads; divides ``d_model``, and in "groups" mode is at least
            ``len(segment_lengths)``.
        segment_lengths: the branches' segment lengths ``w_i`` (the pattern:
            :func:`dilated_ops.dilated_attention`). Note the order: lengths, then rates, unlike
            :class:`MultiheadDilatedAttention`'s positional order.
        dilation_rates: the branches' rates ``r_i`` (``w_i % r_i == 0``).
        dim_feedforward: the feed-forward's hidden width.
        dropout: in ``[0, 1)``: the attention probabilities, the attention output and the
            feed-forward, training mode only.
        activation: ``"relu"``, ``"gelu"`` or a callable ``Tensor -> Tensor``.
        layer_norm_eps: eps of every LayerNorm.
        gamma_init: MAGNETO gain: xavier-normal gain of ``v_proj``, ``out_proj`` and the two
            feed-forward linears.
        device, dtype: of the parameters.
        attention_type: keyword-only; a name of the variant table (:mod:`dilated_ops.variants`),
            passed to :func:`create_multihead_dilated_attention` (default ``"auto"``).
        mode: keyword-only; ``"groups"`` or ``"longnet"``.

    Raises:
        TypeError, ValueError, NotImplementedError: as
            :func:`create_multihead_dilated_attention` for the attention arguments;
            ValueError for an unknown ``activation`` name.
    """

    def __init__(
        self,
        d_model: int,
        nhead: int,
        segment_lengths: Sequence[int],
        dilation_rates: Sequence[int],
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        activation: Activation = "relu",
        layer_norm_eps: float = 1e-5,
        gamma_init: float = 1.0,
        device=None,
        dtype: Optional[torch.dtype] = None,
        *,
        attention_type: str = "auto",
        mode: str = "groups",
    ):
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.norm1 = nn.LayerNorm(d_model, eps=layer_norm_eps, **kw)
        self.self_attn = _self_attention(
            attention_type, d_model, nhead, segment_lengths, dilation_rates, dropout, True,
            layer_norm_eps, gamma_init, mode, kw,
        )
        self.dropout = nn.Dropout(dropout)
        self.ff = _FeedForward(d_model, dim_feedforward, dropout, activation, layer_norm_eps, gamma_init, kw)

    def forward(self, src: Tensor, is_causal: bool = False) -> Tensor:
        """One encoder layer.

        Args:
            src: ``(batch, seq, d_model)``.
            is_causal: causal dilated self-attention (keys after the query masked inside each
                segment).

        Returns:
            ``(batch, seq, d_model)``.

        Raises:
            ValueError, TypeError: as :meth:`MultiheadDilatedAttention.forward` (e.g. ``src``
                not 3-D or its last dim not ``d_model``).
        """
        h = self.norm1(src)
        src = src + self.dropout(self.self_attn(h, h, h, is_causal=is_causal)[0])
        return src + self.ff(src)


class DilatedTransformerDecoderLayer(nn.Module):
    """``x + SelfAttn(LN(x))`` (dilated, no output LayerNorm as in v0.2.0), then
    ``x + CrossAttn(LN(x), memory)`` (dense, :class:`CrossAttention`), then ``x + FF(x)``.
    Activations are ``(batch, seq, d_model)`` (always batch first).

    Args:
        d_model, nhead, segment_lengths, dilation_rates, dim_feedforward, dropout, activation,
            layer_norm_eps, gamma_init, device, dtype, attention_type, mode: as
            :class:`DilatedTransformerEncoderLayer` (``gamma_init`` also initialises the
            cross-attention's ``v_proj`` and ``out_proj``).

    Raises:
        TypeError, ValueError, NotImplementedError: as
            :class:`DilatedTransformerEncoderLayer`.
    """

    def __init__(
        self,
        d_model: int,
        nhead: int,
        segment_lengths: Sequence[int],
        dilation_rates: Sequence[int],
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        activation: Activation = "relu",
        layer_norm_eps: float = 1e-5,
        gamma_init: float = 1.0,
        device=None,
        dtype: Optional[torch.dtype] = None,
        *,
        attention_type: str = "auto",
        mode: str = "groups",
    ):
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.norm1 = nn.LayerNorm(d_model, eps=layer_norm_eps, **kw)
        self.self_attn = _self_attention(
            attention_type, d_model, nhead, segment_lengths, dilation_rates, dropout, False,
            layer_norm_eps, gamma_init, mode, kw,
        )
        self.norm2 = nn.LayerNorm(d_model, eps=layer_norm_eps, **kw)
        self.multihead_attn = CrossAttention(d_model, nhead, dropout, layer_norm_eps, gamma_init, **kw)
        self.dropout = nn.Dropout(dropout)
        self.ff = _FeedForward(d_model, dim_feedforward, dropout, activation, layer_norm_eps, gamma_init, kw)

    def forward(self, tgt: Tensor, memory: Tensor, tgt_is_causal: bool = False,
                memory_is_causal: bool = False) -> Tensor:
        """One decoder layer.

        Args:
            tgt: ``(batch, tgt_len, d_model)``.
            memory: the encoder output, ``(batch, src_len, d_model)``; any length.
            tgt_is_causal: causal dilated self-attention over ``tgt``.
            memory_is_causal: causal cross-attention: position ``i`` of ``tgt`` sees memory
                positions ``<= i`` (SDPA's ``is_causal``).

        Returns:
            ``(batch, tgt_len, d_model)``.

        Raises:
            ValueError, TypeError: as :meth:`MultiheadDilatedAttention.forward` for ``tgt``.
        """
        h = self.norm1(tgt)
        x = tgt + self.dropout(self.self_attn(h, h, h, is_causal=tgt_is_causal)[0])
        x = x + self.dropout(self.multihead_attn(self.norm2(x), memory, is_causal=memory_is_causal))
        return x + self.ff(x)


class _Stack(nn.Module):
    """Holds ``layers``, so ``model.encoder.layers`` reads as with v0.2.0's nn.TransformerEncoder."""

    def __init__(self, layers):
        super().__init__()
        self.layers = nn.ModuleList(layers)


class LongNet(nn.Module):
    """Encoder-decoder LongNet (paper's base sizes by default, MAGNETO gamma per stack:
    encoder ``sqrt(log(3N) log(2M) / 3)``, decoder ``sqrt(log(3N))`` for M encoder and N
    decoder layers). ``forward(x, is_causal=True)``: ``x`` ``(batch, seq, d_model)`` feeds both
    the encoder and the decoder; ``is_causal`` applies to every attention (encoder, decoder and
    the cross-attention), so with True position i sees only positions <= i.

    Args:
        d_model: the model width.
        nhead: attention heads per layer; divides ``d_model``, and in "groups" mode is at
            least ``len(segment_lengths)``.
        num_encoder_layers: M, a positive int.
        num_decoder_layers: N, a positive int.
        dim_feedforward: the feed-forward's hidden width.
        segment_lengths: the branches' segment lengths (pattern:
            :func:`dilated_ops.dilated_attention`); a sequence shorter than a segment is one
            segment.
        dilation_rates: the branches' rates; ``(1, 2, 4, 8, 16)`` by default, since the paper's
            ``(1, 2, 4, 6, 12)`` do not divide its segment lengths.
        dropout, activation, layer_norm_eps, device, dtype, attention_type, mode: as
            :class:`DilatedTransformerEncoderLayer`, for every layer.

    Raises:
        TypeError, ValueError: a layer count that is not a positive int; and the layers'
            errors (:class:`DilatedTransformerEncoderLayer`), NotImplementedError included.
    """

    def __init__(
        self,
        d_model: int = 768,
        nhead: int = 12,
        num_encoder_layers: int = 12,
        num_decoder_layers: int = 12,
        dim_feedforward: int = 3072,
        segment_lengths: Sequence[int] = (2048, 4096, 8192, 16384, 32768),
        dilation_rates: Sequence[int] = (1, 2, 4, 8, 16),
        dropout: float = 0.0,
        activation: Activation = "relu",
        layer_norm_eps: float = 1e-5,
        device=None,
        dtype: Optional[torch.dtype] = None,
        *,
        attention_type: str = "auto",
        mode: str = "groups",
    ):
        super().__init__()
        _checks.check_positive_int("num_encoder_layers", num_encoder_layers)
        _checks.check_positive_int("num_decoder_layers", num_decoder_layers)
        enc_gamma = math.sqrt(math.log(3 * num_decoder_layers) * math.log(2 * num_encoder_layers) / 3)
        dec_gamma = math.sqrt(math.log(3 * num_decoder_layers))
        common = dict(
            d_model=d_model, nhead=nhead, segment_lengths=segment_lengths, dilation_rates=dilation_rates,
            dim_feedforward=dim_feedforward, dropout=dropout, activation=activation,
            layer_norm_eps=layer_norm_eps, device=device, dtype=dtype, attention_type=attention_type,
            mode=mode,
        )
        self.encoder = _Stack(
            DilatedTransformerEncoderLayer(gamma_init=enc_gamma, **common) for _ in range(num_encoder_layers)
        )
        self.decoder = _Stack(
            DilatedTransformerDecoderLayer(gamma_init=dec_gamma, **common) for _ in range(num_decoder_layers)
        )

    def forward(self, x: Tensor, is_causal: bool = True) -> Tensor:
        """Encoder over ``x``, then decoder over ``x`` attending to the encoder's output.

        Args:
            x: ``(batch, seq, d_model)``.
            is_causal: causal masking in every attention (default True).

        Returns:
            ``(batch, seq, d_model)``: the decoder's output.
        """
        memory = x
        for layer in self.encoder.layers:
            memory = layer(memory, is_causal=is_causal)
        tgt = x
        for layer in self.decoder.layers:
            tgt = layer(tgt, memory, tgt_is_causal=is_causal, memory_is_causal=is_causal)
        return tgt


def sinusoidal_positions(seq_len: int, dim: int, device=None, dtype=None) -> Tensor:
    """Fixed sinusoidal position encodings ``(seq_len, dim)`` (sin on even, cos on odd features)."""
    pos = torch.arange(seq_len, device=device, dtype=torch.float32).unsqueeze(1)
    freq = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / dim))
    angle = pos * freq  # (seq_len, ceil(dim / 2))
    return torch.stack((angle.sin(), angle.cos()), dim=-1).flatten(1)[:, :dim].to(dtype)


class LongNetLM(nn.Module):
    """Language model: token embedding + sinusoidal positions, :class:`LongNet`, LayerNorm,
    output layer. ``forward(tokens, is_causal=True)``: ``tokens`` ``(batch, seq)`` int64 ->
    logits ``(batch, seq, num_tokens)``; causal by default (logits at i depend on tokens <= i).

    Args:
        num_tokens: the vocabulary size (positive int).
        d_model, nhead, num_encoder_layers, num_decoder_layers, dim_feedforward,
            segment_lengths, dilation_rates, dropout, activation, layer_norm_eps, device,
            dtype, attention_type, mode: as :class:`LongNet`.

    Raises:
        TypeError, ValueError: ``num_tokens`` not a positive int; and :class:`LongNet`'s
            errors.
    """

    def __init__(
        self,
        num_tokens: int,
        d_model: int = 768,
        nhead: int = 12,
        num_encoder_layers: int = 12,
        num_decoder_layers: int = 12,
        dim_feedforward: int = 3072,
        segment_lengths: Sequence[int] = (2048, 4096, 8192, 16384, 32768),
        dilation_rates: Sequence[int] = (1, 2, 4, 8, 16),
        dropout: float = 0.0,
        activation: Activation = "relu",
        layer_norm_eps: float = 1e-5,
        device=None,
        dtype: Optional[torch.dtype] = None,
        *,
        attention_type: str = "auto",
        mode: str = "groups",
    ):
        super().__init__()
        _checks.check_positive_int("num_tokens", num_tokens)
        kw = {"device": device, "dtype": dtype}
        self.token_embedding = nn.Embedding(num_tokens, d_model, **kw)
        self.long_net = LongNet(
            d_model, nhead, num_encoder_layers, num_decoder_layers, dim_feedforward, segment_lengths,
            dilation_rates, dropout, activation, layer_norm_eps, device, dtype,
            attention_type=attention_type, mode=mode,
        )
        self.norm = nn.LayerNorm(d_model, eps=layer_norm_eps, **kw)
        self.out = nn.Linear(d_model, num_tokens, **kw)
        nn.init.kaiming_normal_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, tokens: Tensor, is_causal: bool = True) -> Tensor:
        """Next-token logits.

        Args:
            tokens: ``(batch, seq)`` integer token ids in ``[0, num_tokens)``.
            is_causal: causal masking in every attention (default True), so the logits at
                position i depend only on tokens ``<= i``.

        Returns:
            logits ``(batch, seq, num_tokens)``, in the parameters' dtype.
        """
        return self.out(self.norm(self.long_net(self.embed(tokens), is_causal=is_causal)))

    def embed(self, tokens: Tensor, start: int = 0) -> Tensor:
        """Token embeddings plus the sinusoidal positions ``start, start + 1, ...``:
        ``(batch, seq, d_model)`` for ``tokens`` ``(batch, seq)``."""
        x = self.token_embedding(tokens)
        return x + sinusoidal_positions(start + x.shape[1], x.shape[2], x.device, x.dtype)[start:]

    def generate(self, tokens: Tensor, max_new_tokens: int) -> Tensor:
        """Greedy continuation with a KV cache (:mod:`dilated_ops.generation`): each new token
        is the argmax of the causal forward's logits at the last position, computed from the
        cache: the prompt runs once through every layer, then each step only the new token,
        its dilated self-attention reading at most ``w / r`` cached keys per branch
        (:func:`dilated_ops.dilated_attention_decode`).

        Args:
            tokens: ``(batch, prompt)`` integer token ids, at least one per row.
            max_new_tokens: how many tokens to add (positive int).

        Returns:
            ``(batch, prompt + max_new_tokens)``: the prompt, then the new tokens.

        Raises:
            TypeError, ValueError: bad ``tokens`` or ``max_new_tokens``.
            NotImplementedError: a self-attention that is not dilated attention in one process
                (block-sparse, or a process group's).
        """
        from .generation import generate

        return generate(self, tokens, max_new_tokens)
