"""The ``dilated`` ops: importing this package registers every one of them."""
from .dilated_attention import dilated_attention, dilated_attention_backward_op, dilated_attention_op

__all__ = ["dilated_attention", "dilated_attention_op", "dilated_attention_backward_op"]
