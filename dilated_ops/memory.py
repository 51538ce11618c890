"""What this library itself caches, reported and cleared: ``get_memory_pool_info`` /
``clear_memory_pool`` (the v0.2.0 names).

There is no memory pool: tensors come from PyTorch's caching allocator (see
``torch.cuda.memory_stats`` for that). The library's own caches are listed in :data:`CACHES`;
today those are the launch plans of ``kernels.segments.plan`` (Python data: which heads use
which segment, rate and offset; no tensors, since the index math is strided views), the
block-sparse layouts of named patterns with their gather plans (tensors, counted in bytes) and,
where Triton is installed, the recorded launches of the Triton forward per input layout
(integers and references to compiled kernels) and the Triton decode kernel's chunk tables (small
int32 tensors).
"""
from __future__ import annotations

import sys
import threading
from typing import Callable, Dict, NamedTuple

from .kernels import block_sparse, segments


class Cache(NamedTuple):
    """A cache the library keeps: ``entries()`` (number of cached items), ``tensor_bytes()``
    (bytes of the tensors it holds), ``clear()``."""

    entries: Callable[[], int]
    tensor_bytes: Callable[[], int]
    clear: Callable[[], None]
    holds: str


def _module_cache(module: str, attribute: str, empty):
    """A function that calls ``attribute`` of ``kernels.<module>`` once a call has loaded that
    module, and returns ``empty`` before (the Triton modules: importing them here would load Triton
    with the package) and on installs without Triton."""
    def call():
        loaded = sys.modules.get(f"{__package__}.kernels.{module}")
        return getattr(loaded, attribute)() if loaded is not None else empty
    return call


CACHES: Dict[str, Cache] = {
    "kernels.segments.plan": Cache(
        # every dilated op call goes through gqa_plan (which fills plan): one entry per call shape
        entries=lambda: segments.gqa_plan.cache_info().currsize,
        tensor_bytes=lambda: 0,  # Python tuples of BranchCall, no tensors
        clear=lambda: (segments.gqa_plan.cache_clear(), segments.plan.cache_clear()),
        holds="attention launch plans per (heads, heads_kv, segment_lengths, dilation_rates, mode): Python data",
    ),
    "kernels.block_sparse.layouts": Cache(
        entries=block_sparse.cache_entries,
        tensor_bytes=block_sparse.cache_bytes,
        clear=block_sparse.cache_clear,
        holds="block-sparse layouts of named patterns per (pattern, length, heads, device), with their "
              "gather plans: bool and int64 tensors on the inputs' device",
    ),
    "kernels.triton_replay.launches": Cache(
        entries=_module_cache("triton_replay", "num_recorded", 0),
        tensor_bytes=lambda: 0,  # offsets, strides and compiled-kernel handles, no tensors
        clear=_module_cache("triton_replay", "clear_recorded", None),
        holds="Triton forward launches recorded per input layout (shapes, strides, alignment, config), with the "
              "C launcher's arguments for up to 16 sets of base pointers each (host TMA descriptors): Python data",
    ),
    "kernels.triton_decode.tables": Cache(
        entries=_module_cache("triton_decode", "cache_entries", 0),
        tensor_bytes=_module_cache("triton_decode", "cache_bytes", 0),
        clear=_module_cache("triton_decode", "cache_clear", None),
        holds="the Triton decode kernel's chunk tables per (segment_lengths, dilation_rates, mode, heads, device): "
              "int32 tensors on the cache's device",
    ),
}

# One lock so a report is a consistent snapshot and never interleaves with a clear.
_LOCK = threading.Lock()


def get_memory_pool_info() -> dict:
    """What the library's own caches (:data:`CACHES`) hold now; a consistent snapshot, taken
    under the lock :func:`clear_memory_pool` takes.

    Returns:
        a dict:

        - ``total_buffers`` (int): cached entries over all the library's caches;
        - ``total_memory_mb`` (float): MiB of tensors those caches hold (0.0 while they hold
          only Python data, whose size is not counted);
        - ``caches`` (dict): per cache name, ``{"entries": int, "tensor_bytes": int,
          "holds": str}`` (what it holds);
        - ``allocator`` (str): a reminder that PyTorch's caching allocator, where the tensors
          live, is not part of this report (see ``torch.cuda.memory_stats`` for that).
    """
    with _LOCK:
        caches = {
            name: {"entries": c.entries(), "tensor_bytes": c.tensor_bytes(), "holds": c.holds}
            for name, c in CACHES.items()
        }
    total_bytes = sum(c["tensor_bytes"] for c in caches.values())
    return {
        "total_buffers": sum(c["entries"] for c in caches.values()),
        "total_memory_mb": total_bytes / 2**20,
        "caches": caches,
        "allocator": "PyTorch's caching allocator (not part of this report)",
    }


def clear_memory_pool() -> None:
    """Empty every cache the library keeps (:data:`CACHES`; they refill on the next calls).
    Frees no tensor memory of PyTorch's caching allocator (``torch.cuda.empty_cache`` does).

    Returns:
        None.
    """
    with _LOCK:
        for c in CACHES.values():
            c.clear()
