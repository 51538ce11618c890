"""Argument validation with the error messages of SPEC section 1: one place, used by the ops
(real and fake kernels, so compile-time tracing reports the same errors), configs and modules."""
from __future__ import annotations

import math
import numbers
from typing import List, Optional, Sequence, Tuple

import torch

from . import _env

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MODES = ("groups", "longnet")
BACKENDS = ("auto", "sdpa")
# The longest segment: segment lengths times the sequence stride go into as_strided's int64
# strides and offsets (and int32 sequence lengths in the attention kernels), which a length near
# 2**62 overflows.
MAX_SEGMENT_LENGTH = 2**31 - 1


def _shape(t: torch.Tensor) -> tuple:
    return tuple(t.shape)


def _is_int(x) -> bool:
    """A Python int or a numpy integer scalar (``numbers.Integral``), never a bool."""
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_int_sequence(values) -> bool:
    if type(values) in (list, tuple):
        return True
    if isinstance(values, (str, bytes)):
        return False
    # A 1-D numpy array, which the ops' List[int] schema takes too.
    return isinstance(values, Sequence) or (type(values).__module__ == "numpy" and getattr(values, "ndim", None) == 1)


def check_int_list(name: str, values) -> list:
    """A non-empty list of positive ints, returned as Python ints: numpy integers are converted
    (the ops' ``List[int]`` schema converts them too), bools are refused (``True`` is not a
    length)."""
    if not _is_int_sequence(values):
        raise TypeError(f"{name} must be a list of positive ints: got {values!r}")
    values = list(values)
    if not values:
        raise ValueError(f"{name} must not be empty: got {values!r}")
    if not all(_is_int(x) for x in values):
        raise TypeError(f"{name} must be a list of positive ints: got {values!r}")
    ints = [int(x) for x in values]
    if any(x < 1 for x in ints):
        raise ValueError(f"{name} must be positive: got {values!r}")
    return ints


def check_segments(segment_lengths, dilation_rates) -> Tuple[List[int], List[int]]:
    """``1 <= w_i <= MAX_SEGMENT_LENGTH``, ``r_i >= 1``, ``w_i % r_i == 0``, equal lengths
    (SPEC section 1). Returns both lists as Python ints."""
    segment_lengths = check_int_list("segment_lengths", segment_lengths)
    dilation_rates = check_int_list("dilation_rates", dilation_rates)
    for i, w in enumerate(segment_lengths):
        if w > MAX_SEGMENT_LENGTH:
            raise ValueError(
                f"segment_lengths[{i}] ({w}) is too large: at most 2**31 - 1 ({MAX_SEGMENT_LENGTH})"
            )
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
    return segment_lengths, dilation_rates


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


def _check_attention_tensor(name: str, t) -> None:
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


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gqa: bool = False) -> None:
    """q, k, v: tensors of one supported float dtype, one device, one shape
    ``(batch, seq, heads, head_dim)``; with ``gqa``, k and v may have ``heads_kv`` heads, a
    divisor of q's (grouped-query attention, SPEC section 8)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_attention_tensor(name, t)
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must share one dtype: got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k and v must be on one device: got {q.device}, {k.device}, {v.device}")
    if gqa and _shape(k) == _shape(v) and _shape(k)[:2] + _shape(k)[3:] == _shape(q)[:2] + _shape(q)[3:]:
        h, h_kv = q.shape[2], k.shape[2]
        if h_kv == 0 or h % h_kv:
            raise ValueError(f"k and v have {h_kv} heads, which must divide q's {h} heads (grouped-query "
                             f"attention): got q {_shape(q)}, k {_shape(k)}, v {_shape(v)}")
        return
    if not (_shape(q) == _shape(k) == _shape(v)):
        if gqa:
            raise ValueError(
                "k and v must have one shape (batch, seq, heads_kv, head_dim), q the same but for its heads "
                f"(a multiple of heads_kv): got q {_shape(q)}, k {_shape(k)}, v {_shape(v)} (cross-attention with "
                "another key length is not supported by dilated attention)")
        raise ValueError(
            "q, k and v must have the same shape (batch, seq, heads, head_dim): got "
            f"q {_shape(q)}, k {_shape(k)}, v {_shape(v)} (cross-attention with another key "
            "length is not supported by dilated attention)"
        )


def check_scale(scale) -> Optional[float]:
    """None, or a finite real number (Python or numpy, not bool), returned as a Python float."""
    if scale is None:
        return None
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a float or None: got {scale!r}")
    value = float(scale)
    if not math.isfinite(value):
        raise ValueError(f"scale must be a finite float or None: got {scale!r}")
    return value


def check_dropout_seed(dropout_seed) -> None:
    """None, or the one-element int64 tensor the ops seed their dropout masks with."""
    if dropout_seed is None:
        return
    if not isinstance(dropout_seed, torch.Tensor):
        raise TypeError(f"dropout_seed must be a one-element int64 tensor or None: got {type(dropout_seed).__name__}")
    if dropout_seed.dtype != torch.int64:
        raise TypeError(
            f"dropout_seed must be a one-element int64 tensor: got {dropout_seed.dtype} of shape {_shape(dropout_seed)}"
        )
    if dropout_seed.numel() != 1:
        raise ValueError(f"dropout_seed must be a one-element int64 tensor: got shape {_shape(dropout_seed)}")


def check_device(device) -> None:
    """A module's ``device=``: None, a ``torch.device``, a device string or index, that exists
    here (CUDA asked of :func:`dilated_ops._env.cuda_available`)."""
    if device is None:
        return
    if isinstance(device, bool) or not isinstance(device, (str, int, torch.device)):
        raise TypeError(f"device must be a torch.device, a device string, an int or None: got {device!r}")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as e:
        raise ValueError(f"device must be a valid torch.device: got {device!r} ({e})") from None
    if dev.type == "cuda" and not _env.cuda_available():
        shown = f"torch.device({str(dev)!r})" if isinstance(device, torch.device) else repr(device)
        raise ValueError(f"device {shown} is not available: torch.cuda.is_available() is False")


def check_param_dtype(dtype) -> None:
    """A module's ``dtype=``: None or a floating point dtype the ops run in."""
    if dtype is not None and (not isinstance(dtype, torch.dtype) or dtype not in SUPPORTED_DTYPES):
        raise TypeError(
            "dtype must be a floating point torch.dtype (torch.float16, torch.bfloat16, torch.float32 or "
            f"torch.float64) or None: got {dtype!r}"
        )


def check_num_groups(num_heads: int, num_groups: int) -> None:
    if num_heads < num_groups:
        raise ValueError(
            f"num_heads ({num_heads}) must be >= number of segment groups ({num_groups})"
        )


def check_key_padding_mask(key_padding_mask, q: torch.Tensor) -> None:
    """None, or a bool tensor ``(batch, seq)`` on q's device (True = keep the key)."""
    if key_padding_mask is None:
        return
    if not isinstance(key_padding_mask, torch.Tensor):
        raise TypeError(f"key_padding_mask must be a bool tensor (batch, seq) or None: got "
                        f"{type(key_padding_mask).__name__}")
    if key_padding_mask.dtype != torch.bool:
        raise TypeError(f"key_padding_mask must be a bool tensor (True = keep the key): got dtype "
                        f"{key_padding_mask.dtype}")
    want = (q.shape[0], q.shape[1])
    if _shape(key_padding_mask) != want:
        raise ValueError(f"key_padding_mask must have shape (batch, seq) = {want}: got {_shape(key_padding_mask)}")
    if key_padding_mask.device != q.device:
        raise ValueError(f"key_padding_mask must be on q's device ({q.device}): got {key_padding_mask.device}")


def check_cu_seqlens(cu_seqlens, q: torch.Tensor, values: bool = True) -> Optional[List[int]]:
    """None, or a 1-D int32/int64 tensor of document boundaries ``[0, ..., seq]``, non-decreasing
    (flash-attn's varlen convention; the same boundaries for every batch row). With ``values``,
    its values are read (a host sync for a CUDA tensor) and returned as a list."""
    if cu_seqlens is None:
        return None
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"cu_seqlens must be an int tensor or None: got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64) or cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 2:
        raise ValueError(f"cu_seqlens must be a 1-D int32 or int64 tensor [0, ..., seq] of at least 2 entries: got "
                         f"dtype {cu_seqlens.dtype}, shape {_shape(cu_seqlens)}")
    if not values:
        return None
    bounds = cu_seqlens.tolist()
    n = q.shape[1]
    if bounds[0] != 0 or bounds[-1] != n or any(a > b for a, b in zip(bounds, bounds[1:])):
        shown = bounds if len(bounds) <= 8 else bounds[:4] + ["..."] + bounds[-3:]
        raise ValueError(f"cu_seqlens must rise from 0 to the sequence length ({n}) without falling: got {shown}")
    return bounds


def check_dilated_args(
    q, k, v, segment_lengths, dilation_rates, mode, scale: Optional[float], dropout_p,
    backend: str = "auto", *, is_causal=False, dropout_seed=None, head_start=0, total_heads=0,
    key_padding_mask=None, cu_seqlens=None,
) -> Tuple[List[int], List[int], Optional[float]]:
    """Everything :func:`dilated_attention` and the op take, checked in SPEC section 1's and
    section 8's terms (cu_seqlens' values are checked where they are read). Returns
    ``(segment_lengths, dilation_rates, scale)`` as Python ints and float (numpy scalars
    converted), what the kernels are given."""
    check_qkv(q, k, v, gqa=True)
    check_key_padding_mask(key_padding_mask, q)
    check_cu_seqlens(cu_seqlens, q, values=False)
    segment_lengths, dilation_rates = check_segments(segment_lengths, dilation_rates)
    check_mode(mode)
    check_bool("is_causal", is_causal)
    scale = check_scale(scale)
    check_dropout(dropout_p)
    check_dropout_seed(dropout_seed)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or 'sdpa': got {backend!r}")
    check_head_window(q.shape[2], head_start, total_heads)
    ratio = q.shape[2] // k.shape[2]
    if head_start % ratio:
        raise ValueError(f"head_start ({head_start}) must be a multiple of heads / heads_kv ({ratio}) with "
                         f"grouped-query attention, so that the window holds whole KV heads")
    if mode == "groups":
        check_num_groups(total_heads or q.shape[2], len(segment_lengths))
    return segment_lengths, dilation_rates, scale


def check_decode_args(q, k, v, segment_lengths, dilation_rates, mode, scale, is_causal, key_padding_mask):
    """The decode op's arguments (SPEC section 9): q ``(batch, sq, heads, head_dim)``, the last
    ``sq`` positions of k, v ``(batch, skv, heads_kv, head_dim)`` (``sq <= skv``, ``heads_kv``
    dividing ``heads``); ``key_padding_mask`` ``(batch, skv)``. Returns ``(segment_lengths,
    dilation_rates, scale)`` as :func:`check_dilated_args` does."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_attention_tensor(name, t)
    if _shape(k) != _shape(v):
        raise ValueError(f"k and v must have one shape (batch, skv, heads_kv, head_dim): got k {_shape(k)}, "
                         f"v {_shape(v)}")
    b, sq, h, d = _shape(q)
    if (k.shape[0], k.shape[3]) != (b, d):
        raise ValueError(f"k and v must have q's batch ({b}) and head_dim ({d}): got q {_shape(q)}, k {_shape(k)}")
    if sq > k.shape[1]:
        raise ValueError(f"q's length ({sq}) must be at most the cache's (k and v: {k.shape[1]}): the queries are "
                         f"the last positions of the keys")
    h_kv = k.shape[2]
    if h_kv == 0 or h % h_kv:
        raise ValueError(f"k and v have {h_kv} heads, which must divide q's {h} heads (grouped-query attention): "
                         f"got q {_shape(q)}, k {_shape(k)}, v {_shape(v)}")
    # dtypes and device as the op's, on the cache's last sq positions (views)
    check_qkv(q, k[:, k.shape[1] - sq:], v[:, v.shape[1] - sq:], gqa=True)
    check_key_padding_mask(key_padding_mask, k)
    segment_lengths, dilation_rates = check_segments(segment_lengths, dilation_rates)
    check_mode(mode)
    check_bool("is_causal", is_causal)
    scale = check_scale(scale)
    if mode == "groups":
        check_num_groups(h, len(segment_lengths))
    return segment_lengths, dilation_rates, scale


def check_head_window(num_heads: int, head_start, total_heads) -> None:
    """q's ``num_heads`` heads as heads ``[head_start, head_start + num_heads)`` of a
    ``total_heads``-head call (0: the call's own heads)."""
    for name, value in (("head_start", head_start), ("total_heads", total_heads)):
        if isinstance(value, bool) or not isinstance(value, (int, torch.SymInt)) or value < 0:
            raise ValueError(f"{name} must be an int >= 0: got {value!r}")
    if total_heads == 0 and head_start != 0:
        raise ValueError(f"head_start ({head_start}) needs total_heads (the call's head count): got total_heads=0")
    if total_heads and head_start + num_heads > total_heads:
        raise ValueError(f"heads [{head_start}, {head_start + num_heads}) of q are not inside total_heads "
                         f"({total_heads})")


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
