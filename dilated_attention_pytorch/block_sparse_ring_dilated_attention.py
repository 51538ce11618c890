"""v0.2.0's ``block_sparse_ring_dilated_attention`` (alias of dilated_ops)."""
from dilated_ops import BlockSparseRingDilatedAttention, SparsePatternConfig

__all__ = ["BlockSparseRingDilatedAttention", "SparsePatternConfig"]
