"""Argument validation with the error messages of SPEC section 1: one place, used by the ops
(real and fake kernels, so compile-time tracing reports the same errors), configs and modules."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MODES = ("groups", "longnet")
BACKENDS = ("auto", "sdpa")


def _shape(t: torch.Tensor) -> tuple:
    return tuple(t.shape)


def check_int_list(name: str, values) -> list:
    if type(values) not in (list, tuple) and (isinstance(values, (str, bytes)) or not isinstance(values, Sequence)):
        raise TypeError(f"{name} must be a list of positive ints: got {values!r}")
    values = list(values)
    if not values:
        raise ValueError(f"{name} must not be empty: got {values!r}")
    for x in values:
        if isinstance(x, bool) or not isinstance(x, int):
            raise TypeError(f"{name} must be a list of positive ints: got {values!r}")
        if x < 1:
            raise ValueError(f"{name} must be positive: got {values!r}")
    return values


def check_segments(segment_lengths, dilation_rates) -> None:
    """``w_i >= 1``, ``r_i >= 1``, ``w_i % r_i == 0``, equal lengths (SPEC section 1)."""
    segment_lengths = check_int_list("segment_lengths", segment_lengths)
    dilation_rates = check_int_list("dilation_rates", dilation_rates)
    if len(segment_lengths) != len(dilation_rates):
        raise ValueError(
            "segment_lengths and dilation_rates must have same length: "
            f"got {len(segment_lengths)} and {len(dilation_rates)}"
        )
    for i, (w, r) in enumerate(zip(segment_lengths, dilation_rates)):
        if w % r:
            raise ValueError(
                f"segment_lengths[{i}] ({w}) must be divisible by dilation_rates[{i}] ({r})"
            )


def check_mode(mode) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be 'groups' or 'longnet': got {mode!r}")


def check_dropout(dropout_p, name: str = "dropout_p") -> None:
    """``name``: the argument as the caller spells it (``dropout`` in configs and modules)."""
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)):
        raise TypeError(f"{name} must be a float in [0, 1): got {dropout_p!r}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"{name} must be in [0, 1): got {dropout_p!r}")


def check_bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool: got {value!r}")


def check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be a positive int: got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be a positive int: got {value!r}")


def check_positive_float(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a positive float: got {value!r}")
    if not value > 0.0:
        raise ValueError(f"{name} must be > 0: got {value!r}")


def check_embed_dim(embed_dim, num_heads) -> None:
    """Positive ints, ``embed_dim % num_heads == 0`` (SPEC section 1's message)."""
    check_positive_int("embed_dim", embed_dim)
    check_positive_int("num_heads", num_heads)
    if embed_dim % num_heads:
        raise ValueError(
            f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads}). "
            f"Got head_dim={embed_dim / num_heads:.2f}"
        )


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """q, k, v: tensors of one supported float dtype, one device, one shape
    ``(batch, seq, heads, head_dim)``."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor: got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(
                f"{name} must be 4-D (batch, seq, heads, head_dim): got shape {_shape(t)}"
            )
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(
                f"{name} must be float16, bfloat16, float32 or float64: got {t.dtype}"
            )
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must share one dtype: got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k and v must be on one device: got {q.device}, {k.device}, {v.device}")
    if not (_shape(q) == _shape(k) == _shape(v)):
        raise ValueError(
            "q, k and v must have the same shape (batch, seq, heads, head_dim): got "
            f"q {_shape(q)}, k {_shape(k)}, v {_shape(v)} (cross-attention with another key "
            "length is not supported by dilated attention)"
        )


def check_num_groups(num_heads: int, num_groups: int) -> None:
    if num_heads < num_groups:
        raise ValueError(
            f"num_heads ({num_heads}) must be >= number of segment groups ({num_groups})"
        )


def check_dilated_args(
    q, k, v, segment_lengths, dilation_rates, mode, scale: Optional[float], dropout_p,
    backend: str = "auto",
) -> None:
    """Everything :func:`dilated_attention` takes, checked in SPEC section 1's terms."""
    check_qkv(q, k, v)
    check_segments(segment_lengths, dilation_rates)
    check_mode(mode)
    check_dropout(dropout_p)
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
        raise TypeError(f"scale must be a float or None: got {scale!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or 'sdpa': got {backend!r}")
    if mode == "groups":
        check_num_groups(q.shape[2], len(segment_lengths))


PATTERNS = ("local_window", "global_local", "dilated_sparse", "mask")


def check_sparse_pattern(pattern_type, sparsity_ratio, block_size, local_window_size, global_tokens) -> None:
    """The fields of a block-sparse pattern (SPEC section 4, v0.2.0's ``SparsePatternConfig``)."""
    if pattern_type not in PATTERNS:
        raise ValueError(f"pattern_type must be one of {', '.join(map(repr, PATTERNS))}: got {pattern_type!r}")
    if isinstance(sparsity_ratio, bool) or not isinstance(sparsity_ratio, (int, float)):
        raise TypeError(f"sparsity_ratio must be a float in (0, 1]: got {sparsity_ratio!r}")
    if not 0.0 < sparsity_ratio <= 1.0:
        raise ValueError(f"sparsity_ratio must be in (0, 1]: got {sparsity_ratio!r}")
    check_positive_int("block_size", block_size)
    if local_window_size is not None:
        check_positive_int("local_window_size", local_window_size)
    if isinstance(global_tokens, bool) or not isinstance(global_tokens, int) or global_tokens < 0:
        raise ValueError(f"global_tokens must be an int >= 0: got {global_tokens!r}")


def check_block_mask(block_mask, q: torch.Tensor, block_size: int) -> None:
    """A user's block layout: bool ``(heads or 1, nb, nb)``, ``nb = ceil(seq / block_size)``."""
    if not isinstance(block_mask, torch.Tensor):
        raise TypeError(f"block_mask must be a bool torch.Tensor (heads or 1, nb, nb): got {type(block_mask).__name__}")
    nb = -(-q.shape[1] // block_size)
    h = q.shape[2]
    if block_mask.dtype != torch.bool or block_mask.dim() != 3 or block_mask.shape[0] not in (1, h) or \
            tuple(block_mask.shape[1:]) != (nb, nb):
        raise ValueError(
            f"block_mask must be a bool tensor of shape ({h} or 1, {nb}, {nb}) for seq {q.shape[1]} and "
            f"block_size {block_size}: got {block_mask.dtype} of shape {_shape(block_mask)}"
        )
