"""Sequence-parallel dilated attention (issue 20) on CPU processes over gloo: each rank's output
slice and q/k/v gradients equal the single-process op's (float64, 1e-10)."""
import operator
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# Shards shorter and longer than segments, windows cutting head groups and offset classes.
CASES = [
    # (seq, heads, segment_lengths, dilation_rates)
    (32, 4, [4, 8, 32], [1, 2, 4]),
    (48, 8, [8, 64], [2, 8]),
    (24, 12, [3, 6, 12], [1, 3, 2]),
]


def _ulysses_worker(rank: int, world_size: int, init_file: str) -> None:
    import dilated_ops
    from dilated_ops.sequence_parallel import ulysses_dilated_attention

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        for n, h, segs, rates in CASES:
            if h % world_size:
                continue
            for mode in ("groups", "longnet"):
                for is_causal in (False, True):
                    torch.manual_seed(0)  # the same full inputs on every rank
                    full = [torch.randn(2, n, h, 8, dtype=torch.float64, requires_grad=True) for _ in range(3)]
                    g = torch.randn(2, n, h, 8, dtype=torch.float64)
                    out = dilated_ops.dilated_attention(*full, segs, rates, mode=mode, is_causal=is_causal)
                    grads = torch.autograd.grad(out, full, g)
                    s = n // world_size
                    mine = slice(rank * s, (rank + 1) * s)
                    shards = [t.detach()[:, mine].clone().requires_grad_() for t in full]
                    got = ulysses_dilated_attention(*shards, segs, rates, mode=mode, is_causal=is_causal)
                    got_grads = torch.autograd.grad(got, shards, g[:, mine])
                    where = f"rank {rank}/{world_size}, n={n}, h={h}, {segs}, {rates}, {mode}, causal={is_causal}"
                    torch.testing.assert_close(got, out[:, mine], rtol=1e-10, atol=1e-10, msg=where)
                    for x, want in zip(got_grads, grads):
                        torch.testing.assert_close(x, want[:, mine], rtol=1e-10, atol=1e-10, msg=where)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world_size", [2, 4])
def test_ulysses_equals_the_single_process_op(world_size):
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_ulysses_worker, args=(world_size, os.path.join(tmp, "init")), nprocs=world_size, join=True)


def _failing_worker(rank: int, world_size: int, init_file: str) -> None:
    import datetime

    from dilated_ops.sequence_parallel import ulysses_dilated_attention

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=60))
    q = torch.randn(1, 8, 4, 8, dtype=torch.float64)
    rates = [1, 2] if rank == 0 else [1, 3]  # rank 1 passes a bad rate (8 % 3 != 0)
    ulysses_dilated_attention(q, q, q, [4, 8], rates)


def test_a_rank_that_raises_fails_the_job_with_its_error_and_no_hang():
    """The arguments are checked before any collective, so the rank with bad input raises at
    once; the launcher (here mp.spawn, torchrun alike) then stops the rank waiting in the
    all-to-all: the job fails with that rank's message, well before the group's timeout."""
    import time

    start = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        with pytest.raises(mp.ProcessRaisedException, match=r"segment_lengths\[1\] \(8\) must be divisible"):
            mp.spawn(_failing_worker, args=(2, os.path.join(tmp, "init")), nprocs=2, join=True)
    assert time.monotonic() - start < 50


def _compile_worker(rank: int, world_size: int, init_file: str) -> None:
    from dilated_ops.sequence_parallel import ulysses_dilated_attention

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        torch.manual_seed(rank)
        eager_in = [torch.randn(2, 12, 4, 8, dtype=torch.float64, requires_grad=True) for _ in range(3)]
        compiled_in = [t.detach().clone().requires_grad_() for t in eager_in]
        g = torch.randn(2, 12, 4, 8, dtype=torch.float64)

        def fn(q, k, v):
            return ulysses_dilated_attention(q, k, v, [4, 8, 24], [1, 2, 4], mode="longnet", is_causal=True)

        want = fn(*eager_in)
        want_grads = torch.autograd.grad(want, eager_in, g)
        got = torch.compile(fn, fullgraph=True, backend="aot_eager")(*compiled_in)
        got_grads = torch.autograd.grad(got, compiled_in, g)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        for x, y in zip(got_grads, want_grads):
            torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12)
        # torch.export: the op is one node (the group recorded by name), saved and loaded
        class Attention(torch.nn.Module):
            def forward(self, q, k, v):
                return fn(q, k, v)

        ep = torch.export.export(Attention(), tuple(t.detach() for t in eager_in))
        calls = [n.target for n in ep.graph.nodes if n.op == "call_function" and n.target is not operator.getitem]
        assert calls == [torch.ops.dilated.ulysses_attention.default], calls
        path = os.path.join(os.path.dirname(init_file), f"ulysses{rank}.pt2")
        torch.export.save(ep, path)
        torch.testing.assert_close(torch.export.load(path).module()(*(t.detach() for t in eager_in)), want.detach(),
                                   rtol=0, atol=0)
        # a world_size that is not the group's: a clear error on every rank, before any collective
        with pytest.raises(ValueError, match=r"world_size \(4\) must be the size of process group"):
            torch.ops.dilated.ulysses_attention(*eager_in, [4, 8, 24], [1, 2, 4], "longnet", True, None,
                                                dist.group.WORLD.group_name, 4)
        # every rank runs opcheck's calls in the same order, so their collectives pair up
        torch.library.opcheck(torch.ops.dilated.ulysses_attention.default,
                              (*compiled_in, [4, 8, 24], [1, 2, 4], "longnet", True, None,
                               dist.group.WORLD.group_name, world_size))
    finally:
        dist.destroy_process_group()


def test_ulysses_compiles_exports_and_passes_opcheck():
    """torch.compile(fullgraph=True) with the op as one node, results equal to eager, forward
    and backward; torch.export with the op as one node, saved and loaded; torch.library.opcheck
    of the op (fake kernel, autograd, AOT dispatch) in a 2-rank group."""
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_compile_worker, args=(2, os.path.join(tmp, "init")), nprocs=2, join=True)
