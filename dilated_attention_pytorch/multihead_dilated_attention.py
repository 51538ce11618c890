"""v0.2.0 import path (alias of dilated_ops)."""
from dilated_ops import MultiheadDilatedAttention

__all__ = ["MultiheadDilatedAttention"]
