"""v0.2.0 import path (alias of dilated_ops)."""
from dilated_ops import ImprovedMultiheadDilatedAttention

__all__ = ["ImprovedMultiheadDilatedAttention"]
