"""v0.2.0 import path (alias of dilated_ops)."""
from dilated_ops import LongNet, LongNetLM

__all__ = ["LongNet", "LongNetLM"]
