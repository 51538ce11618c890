"""v0.2.0 import path (alias of dilated_ops)."""
from dilated_ops import DilatedTransformerEncoderLayer, DilatedTransformerDecoderLayer

__all__ = ["DilatedTransformerEncoderLayer", "DilatedTransformerDecoderLayer"]
