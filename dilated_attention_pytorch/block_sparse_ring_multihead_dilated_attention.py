"""v0.2.0's ``block_sparse_ring_multihead_dilated_attention`` (alias of dilated_ops)."""
from dilated_ops import BlockSparseRingMultiheadDilatedAttention, SparsePatternConfig

__all__ = ["BlockSparseRingMultiheadDilatedAttention", "SparsePatternConfig"]
