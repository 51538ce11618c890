"""v0.2.0's ``core``: factory, configs, memory report (alias of dilated_ops)."""
from dilated_ops import (
    DilatedAttentionConfig,
    MultiheadConfig,
    clear_memory_pool,
    create_dilated_attention,
    create_multihead_dilated_attention,
    get_memory_pool_info,
)

__all__ = [
    "create_dilated_attention",
    "create_multihead_dilated_attention",
    "DilatedAttentionConfig",
    "MultiheadConfig",
    "get_memory_pool_info",
    "clear_memory_pool",
]
