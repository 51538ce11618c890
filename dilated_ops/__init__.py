"""dilated_ops: LongNet dilated attention as torch.compile- and torch.export-clean custom ops.

Importing this package registers the ``torch.ops.dilated`` namespace.
"""
from .registrations import dilated_attention

__version__ = "0.1.0"
__all__ = ["dilated_attention", "__version__"]
