"""Frozen, validated configuration objects of the v0.2.0 API (migration guide, "Type-Safe
Configuration"). Lists are normalised to tuples, so configs are hashable and can be shared
between modules; every field is checked at construction with the messages of ``_checks``.
``dataclasses.replace(config, field=value)`` re-validates.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional, Tuple

from . import _checks


@dataclass(frozen=True)
class DilatedAttentionConfig:
    """What dilated attention computes (SPEC sections 1-3), for q, k, v
    ``(batch, seq, heads, head_dim)``.

    Each branch ``(w_i, r_i)`` cuts the sequence into segments of ``w_i`` tokens and, inside
    each segment, lets every ``r_i``-th token attend to every ``r_i``-th token (offset per
    head). ``segment_lengths=(4, 8)``, ``dilation_rates=(1, 2)``, 8 tokens, ``x`` = the
    positions one head of each branch attends among::

        branch (w=4, r=1):  x x x x | x x x x      two segments, dense inside each
        branch (w=8, r=2):  x . x . x . x .        one segment, every 2nd token (offset 0)

    Args:
        segment_lengths: the branches' ``w_i`` (positive ints; a list is stored as a tuple).
        dilation_rates: the branches' ``r_i`` (positive ints), as many as segment_lengths,
            ``w_i % r_i == 0``.
        dropout: attention-probability dropout in ``[0, 1)``, applied by the modules in
            training mode only.
        use_tf32: kept for v0.2.0 compatibility and shown in ``repr``; it changes no global
            state. TF32 for float32 matmuls on CUDA (the projections) is PyTorch's
            ``torch.backends.cuda.matmul.allow_tf32`` / ``torch.set_float32_matmul_precision``,
            which stay yours to set.
        mode: ``"groups"`` (v0.2.0's numerics, default: heads split into one contiguous group
            per branch, group ``i`` at offset ``i % r_i``) or ``"longnet"`` (the paper's
            Eq. 10: every head in every branch, head ``j`` at offset ``j % r_i``, combined by
            softmax weight).

    Raises:
        TypeError: a field of the wrong type (e.g. a non-int segment length, a non-bool
            ``use_tf32``).
        ValueError: empty or non-positive segment_lengths / dilation_rates, different
            lengths, a ``w_i`` not divisible by its ``r_i``, dropout outside ``[0, 1)``, an
            unknown mode.
    """

    segment_lengths: Tuple[int, ...]
    dilation_rates: Tuple[int, ...]
    dropout: float = 0.0
    use_tf32: bool = True
    mode: str = "groups"

    def __post_init__(self):
        _checks.check_segments(self.segment_lengths, self.dilation_rates)
        # frozen: normalise through object.__setattr__, once, here.
        object.__setattr__(self, "segment_lengths", tuple(self.segment_lengths))
        object.__setattr__(self, "dilation_rates", tuple(self.dilation_rates))
        _checks.check_dropout(self.dropout, "dropout")
        _checks.check_bool("use_tf32", self.use_tf32)
        _checks.check_mode(self.mode)

    @property
    def num_groups(self) -> int:
        """The number of branches (head groups in "groups" mode)."""
        return len(self.segment_lengths)


@dataclass(frozen=True)
class MultiheadConfig:
    """The multi-head wrapper (MAGNETO, as v0.2.0), around a :class:`DilatedAttentionConfig`.

    Args:
        embed_dim: the model width (positive int), the inputs' last dim; split into
            ``num_heads`` heads of ``embed_dim // num_heads`` (:attr:`head_dim`).
        num_heads: positive int dividing ``embed_dim``. In "groups" mode it must also be at
            least the number of branches, checked where both configs meet (the modules and
            the factory), not here.
        bias: biases of the q/k/v/out projections.
        layer_norm: LayerNorm of the attention output before ``out_proj`` (MAGNETO's sub-LN).
        layer_norm_eps: that LayerNorm's eps (> 0).
        gamma_init: gain (> 0) of the xavier-normal init of ``v_proj`` and ``out_proj``.
        batch_first: inputs ``(batch, seq, embed_dim)`` when True (default), else
            ``(seq, batch, embed_dim)``.

    Raises:
        TypeError: a field of the wrong type (a non-int ``embed_dim``/``num_heads``, a
            non-bool flag, a non-number eps or gain).
        ValueError: ``embed_dim``/``num_heads`` below 1, ``embed_dim`` not divisible by
            ``num_heads``, ``layer_norm_eps`` or ``gamma_init`` not > 0.
    """

    embed_dim: int
    num_heads: int
    bias: bool = True
    layer_norm: bool = True
    layer_norm_eps: float = 1e-5
    gamma_init: float = 1.0
    batch_first: bool = True

    def __post_init__(self):
        _checks.check_embed_dim(self.embed_dim, self.num_heads)
        _checks.check_bool("bias", self.bias)
        _checks.check_bool("layer_norm", self.layer_norm)
        _checks.check_positive_float("layer_norm_eps", self.layer_norm_eps)
        _checks.check_positive_float("gamma_init", self.gamma_init)
        _checks.check_bool("batch_first", self.batch_first)

    @property
    def head_dim(self) -> int:
        """``embed_dim // num_heads``."""
        return self.embed_dim // self.num_heads


@dataclass(frozen=True)
class SparsePatternConfig:
    """A block-sparse pattern (SPEC section 4), with v0.2.0's field names and meanings. The
    sequence is cut into blocks of ``block_size`` tokens (the last may be partial); query block
    ``i`` reads key block ``j`` where the pattern says so, with one softmax over all the keys it
    reads. ``local_window``, 16 tokens in blocks of 4 (``local_window_size=8``: one block each
    side; ``x`` = block read)::

        x x . .
        x x x .
        . x x x
        . . x x

    Args:
        pattern_type: ``"local_window"`` (a band: ``|i - j| <= (local_window_size //
            block_size) // 2``), ``"global_local"`` (that band plus the first ``global_tokens
            // block_size`` blocks, which read every block and are read by every block),
            ``"dilated_sparse"`` (the dilated pattern of the module's ``segment_lengths`` /
            ``dilation_rates`` at block granularity: for each branch ``(w, r)``, blocks of one
            segment of ``w // block_size`` blocks whose position in the segment is ``h % r``
            for head ``h``; the union over branches) or ``"mask"`` (a boolean block mask the
            caller passes, per head or shared). Causal calls also drop key blocks after the
            query block, and mask keys after the query inside it.
        sparsity_ratio: the fraction of blocks a query row reads, in (0, 1], where the pattern
            leaves it free: ``local_window``/``global_local`` with ``local_window_size=None``
            take the widest band of at most ``sparsity_ratio * num_blocks`` blocks per row.
            Patterns whose fields fix the layout do not read it.
        block_size: tokens per block (positive int).
        local_window_size: tokens covered by the band, or None (see ``sparsity_ratio``).
        global_tokens: tokens of the global blocks of ``global_local`` (int >= 0).

    Raises:
        ValueError / TypeError naming the field.
    """

    pattern_type: str = "dilated_sparse"
    sparsity_ratio: float = 0.1
    block_size: int = 128
    local_window_size: Optional[int] = 512
    global_tokens: int = 64

    def __post_init__(self):
        _checks.check_sparse_pattern(self.pattern_type, self.sparsity_ratio, self.block_size,
                                     self.local_window_size, self.global_tokens)


def field_names(cls) -> Tuple[str, ...]:
    return tuple(f.name for f in fields(cls))


def check_heads_cover_groups(multihead: MultiheadConfig, attention: DilatedAttentionConfig) -> None:
    """Groups mode needs one head per branch at least (SPEC section 3); fail at construction
    rather than at the first forward."""
    if attention.mode == "groups":
        _checks.check_num_groups(multihead.num_heads, attention.num_groups)

