"""The ``dilated`` ops: importing this package registers every one of them."""
from . import (block_sparse_attention, decode_attention, dilated_attention, longnet_attention, ring_attention,
               ulysses_attention)

__all__ = ["dilated_attention", "decode_attention", "block_sparse_attention", "ulysses_attention", "longnet_attention", "ring_attention"]
