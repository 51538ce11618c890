"""dilated_ops: LongNet dilated attention as torch.compile- and torch.export-clean custom ops.

Importing this package registers the ``torch.ops.dilated`` namespace. Layers, each importing
only those below it: the API (``functional``, ``sequence_parallel``, ``config``, ``factory``, ``modules``, ``long_net``,
``memory``, ``module_swap``, ``symbolic``, ``cli``); the graph passes (``fx_passes``); the variant
table and the attention block (``variants``, ``attention_block``); the ops (``registrations``);
the math (``kernels``).
"""
from .functional import block_sparse_attention, dilated_attention, dilated_attention_decode
from .config import DilatedAttentionConfig, MultiheadConfig, SparsePatternConfig
from .modules import (
    BlockSparseRingDilatedAttention,
    BlockSparseRingMultiheadDilatedAttention,
    DilatedAttention,
    DistributedDilatedAttention,
    DistributedMultiheadDilatedAttention,
    ImprovedDilatedAttention,
    ImprovedMultiheadDilatedAttention,
    MultiheadDilatedAttention,
    RingDilatedAttention,
    RingMultiheadDilatedAttention,
)
from .sequence_parallel import sequence_parallel_attention, shard_sequence, unshard_sequence
from .factory import create_dilated_attention, create_multihead_dilated_attention
from .long_net import DilatedTransformerDecoderLayer, DilatedTransformerEncoderLayer, LongNet, LongNetLM
from .memory import clear_memory_pool, get_memory_pool_info
from .fx_passes import RewriteConfig, RewriteReport, backend, rewrite_exported
from .module_swap import ConvertedMultiheadAttention, convert, export
from .symbolic import rewrite_symbolic
from .integrations import transformers as _hf

# attn_implementation="dilated": registered now if transformers is already imported (importing it
# ourselves would cost every `import dilated_ops` seconds); else dilated_ops.register_transformers().
register_transformers = _hf.register
if "transformers" in __import__("sys").modules:
    register_transformers()

__version__ = "0.1.0"
__all__ = [
    "dilated_attention",
    "dilated_attention_decode",
    "block_sparse_attention",
    "DilatedAttentionConfig",
    "MultiheadConfig",
    "SparsePatternConfig",
    "DilatedAttention",
    "ImprovedDilatedAttention",
    "RingDilatedAttention",
    "MultiheadDilatedAttention",
    "ImprovedMultiheadDilatedAttention",
    "RingMultiheadDilatedAttention",
    "BlockSparseRingDilatedAttention",
    "BlockSparseRingMultiheadDilatedAttention",
    "DistributedDilatedAttention",
    "DistributedMultiheadDilatedAttention",
    "sequence_parallel_attention",
    "shard_sequence",
    "unshard_sequence",
    "create_dilated_attention",
    "create_multihead_dilated_attention",
    "DilatedTransformerEncoderLayer",
    "DilatedTransformerDecoderLayer",
    "LongNet",
    "LongNetLM",
    "get_memory_pool_info",
    "clear_memory_pool",
    "backend",
    "RewriteConfig",
    "RewriteReport",
    "rewrite_exported",
    "convert",
    "export",
    "ConvertedMultiheadAttention",
    "rewrite_symbolic",
    "register_transformers",
    "__version__",
]
