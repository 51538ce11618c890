"""The ``dilated`` ops: importing this package registers every one of them."""
from . import dilated_attention

__all__ = ["dilated_attention"]
