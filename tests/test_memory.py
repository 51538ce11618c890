"""get_memory_pool_info / clear_memory_pool report and clear the library's own caches."""
import threading

import torch

import dilated_ops
from dilated_ops import clear_memory_pool, get_memory_pool_info, memory


def run(heads, segs, rates, mode="groups"):
    q = torch.randn(1, 24, heads, 8)
    dilated_ops.dilated_attention(q, q, q, segs, rates, mode=mode)


def test_counts_follow_patterns_cached_and_cleared():
    clear_memory_pool()
    assert get_memory_pool_info()["total_buffers"] == 0
    run(4, [8, 16], [1, 2])
    after_one = get_memory_pool_info()["total_buffers"]
    assert after_one == 1
    run(4, [8, 16], [1, 2])  # same pattern: served from the cache
    assert get_memory_pool_info()["total_buffers"] == after_one
    run(4, [8, 16], [1, 2], mode="longnet")
    run(6, [8, 16], [1, 2])
    info = get_memory_pool_info()
    assert info["total_buffers"] == after_one + 2
    assert info["total_buffers"] == sum(c["entries"] for c in info["caches"].values())
    clear_memory_pool()
    assert get_memory_pool_info()["total_buffers"] == 0


def test_modules_cache_through_the_op_and_hold_no_buffers():
    clear_memory_pool()
    m = dilated_ops.create_multihead_dilated_attention("standard", embed_dim=32, num_heads=4,
                                                       segment_lengths=[8, 16], dilation_rates=[1, 2])
    assert list(m.buffers()) == []
    assert get_memory_pool_info()["total_buffers"] == 0  # construction caches nothing
    x = torch.randn(2, 20, 32)
    m(x, x, x)
    assert get_memory_pool_info()["total_buffers"] == 1


def test_memory_counts_tensor_bytes_of_caches(monkeypatch):
    """The plan cache holds Python data (0 MB); a cache of tensors reports its bytes."""
    held = [torch.ones(1024, 256)]  # 1 MiB of float32
    fake = memory.Cache(entries=lambda: len(held), tensor_bytes=lambda: sum(t.nbytes for t in held),
                        clear=held.clear, holds="test tensors")
    monkeypatch.setitem(memory.CACHES, "test", fake)
    clear_memory_pool()
    assert get_memory_pool_info()["total_memory_mb"] == 0.0
    held.append(torch.ones(512, 256))
    info = get_memory_pool_info()
    assert info["caches"]["test"]["tensor_bytes"] == held[0].nbytes
    assert info["total_memory_mb"] == held[0].nbytes / 2**20
    assert info["caches"]["kernels.segments.plan"]["tensor_bytes"] == 0
    clear_memory_pool()
    assert held == [] and get_memory_pool_info()["total_buffers"] == 0


def test_thread_safe_under_concurrent_use():
    errors = []

    def work(i):
        try:
            for j in range(10):
                run(2 + (i + j) % 5, [4, 8], [1, 2])
                info = get_memory_pool_info()
                assert info["total_buffers"] == sum(c["entries"] for c in info["caches"].values())
                if j % 3 == 0:
                    clear_memory_pool()
        except Exception as e:  # reported below, with the thread's index
            errors.append((i, repr(e)))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    clear_memory_pool()
    assert get_memory_pool_info()["total_buffers"] == 0
