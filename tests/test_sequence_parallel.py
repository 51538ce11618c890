"""Sequence-parallel dilated attention (issue 20) on CPU processes over gloo: each rank's output
slice and q/k/v gradients equal the single-process op's (float64, 1e-10)."""
import itertools
import operator
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from models import process_group

# Shards shorter and longer than segments, windows cutting head groups and offset classes; for
# longnet, segments inside a shard, spanning all shards, spanning 2 of 4, longer than the sequence.
CASES = [
    # (seq, heads, segment_lengths, dilation_rates)
    (32, 4, [4, 8, 32], [1, 2, 4]),
    (48, 8, [8, 64], [2, 8]),
    (24, 12, [3, 6, 12], [1, 3, 2]),
    (64, 3, [8, 32, 128], [1, 2, 8]),
]


def _fits(strategy: str, n: int, h: int, segs, rates, world_size: int, layout: str = "contiguous") -> bool:
    from dilated_ops.kernels.distributed import longnet_geometry_error

    if strategy == "ulysses":
        return h % world_size == 0
    chunks = world_size * (2 if layout == "zigzag" else 1)
    return n % chunks == 0 and longnet_geometry_error(n // chunks, chunks, segs, rates) is None


def _strategy_equals_single_process(strategy: str, rank: int, world_size: int) -> None:
    import dilated_ops
    from dilated_ops.sequence_parallel import sequence_parallel_attention, shard_sequence, unshard_sequence

    strategy, _, layout = strategy.partition("-")  # "ring-zigzag": the ring on zigzag shards
    layout = layout or "contiguous"
    ran = 0
    for n, h, segs, rates in CASES:
        s = n // world_size
        if not _fits(strategy, n, h, segs, rates, world_size, layout):
            # refused with a clear error on every rank, before any collective
            q = torch.randn(1, s, h, 8, dtype=torch.float64)
            with pytest.raises(ValueError, match="must divide num_heads" if strategy == "ulysses" else
                               "the longnet and ring strategies need each segment length to divide the shard"):
                sequence_parallel_attention(q, q, q, segs, rates, strategy=strategy, layout=layout)
            continue
        ran += 1
        for mode in ("groups", "longnet"):
            for is_causal in (False, True):
                torch.manual_seed(0)  # the same full inputs on every rank
                full = [torch.randn(2, n, h, 8, dtype=torch.float64, requires_grad=True) for _ in range(3)]
                g = torch.randn(2, n, h, 8, dtype=torch.float64)
                out = dilated_ops.dilated_attention(*full, segs, rates, mode=mode, is_causal=is_causal)
                grads = torch.autograd.grad(out, full, g)

                def mine(t):
                    return shard_sequence(t.detach(), layout=layout)

                shards = [mine(t).clone().requires_grad_() for t in full]
                got = sequence_parallel_attention(*shards, segs, rates, strategy=strategy, mode=mode,
                                                  is_causal=is_causal, layout=layout)
                got_grads = torch.autograd.grad(got, shards, mine(g))
                where = (f"{strategy} {layout}, rank {rank}/{world_size}, n={n}, h={h}, {segs}, {rates}, "
                         f"{mode}, causal={is_causal}")
                torch.testing.assert_close(got, mine(out), rtol=1e-10, atol=1e-10, msg=where)
                for x, want in zip(got_grads, grads):
                    torch.testing.assert_close(x, mine(want), rtol=1e-10, atol=1e-10, msg=where)
                torch.testing.assert_close(unshard_sequence(got, layout=layout), out, rtol=1e-10, atol=1e-10,
                                           msg=where)
    assert ran >= 2, f"{strategy} {layout} on {world_size} ranks ran {ran} of the cases"


@pytest.mark.parametrize("world_size", [2, 4, 8])
def test_zigzag_shards_even_out_the_causal_ring(world_size):
    """Causal, one segment over the whole sequence: the other chunks whose rows a rank's queries
    read as they pass. Contiguous shards: rank p reads p (the last rank does all the work while
    the first idles); zigzag: every rank reads 2P - 1."""
    from dilated_ops.kernels.distributed import _ring_setup, chunks

    q = torch.empty(1, 16, 2, 4)

    def reads(layout):
        every, out = range(chunks(world_size, layout)), []
        for rank in range(world_size):
            ring = _ring_setup(q, world_size, rank, [16 * world_size], [1], "groups", layout)
            out.append(sum(len(ring.peers(0, c, True, every)) for c in ring.mine))
        return out

    assert reads("contiguous") == list(range(world_size))
    assert reads("zigzag") == [2 * world_size - 1] * world_size


# (seq, heads, heads_kv, segment_lengths, dilation_rates) per world size: grouped-query attention
# whose head groups and offset classes cut KV heads' query heads apart, segments inside a shard
# and spanning 2, 4 and all chunks (zigzag included); P divides heads_kv (ulysses).
MASKED_GQA_CASES = {2: (32, 4, 2, [4, 8, 32], [1, 2, 4]), 4: (32, 8, 4, [8, 16, 32], [1, 2, 4])}


def _masked_gqa_equals_single_process(rank: int, world_size: int) -> None:
    import dilated_ops
    from dilated_ops.sequence_parallel import sequence_parallel_attention, shard_sequence

    n, h, hkv, segs, rates = MASKED_GQA_CASES[world_size]
    for mode, is_causal in itertools.product(("groups", "longnet"), (False, True)):
        torch.manual_seed(0)  # the same full inputs on every rank
        q = torch.randn(2, n, h, 8, dtype=torch.float64, requires_grad=True)
        k, v = (torch.randn(2, n, hkv, 8, dtype=torch.float64, requires_grad=True) for _ in range(2))
        g = torch.randn(2, n, h, 8, dtype=torch.float64)
        mask = torch.rand(2, n) > 0.3
        mask[1, :n // 2 + 3] = False  # left padding past the first shard: rows that see no key
        out = dilated_ops.dilated_attention(q, k, v, segs, rates, mode=mode, is_causal=is_causal,
                                            key_padding_mask=mask)
        grads = torch.autograd.grad(out, (q, k, v), g)
        rows = out[1].abs().sum(dim=(-2, -1))
        # rows that see no key (0, not NaN), except where longnet's whole-sequence segment reaches a kept key
        assert not out.isnan().any() and (rows > 0).any()
        assert (rows == 0).any() == (is_causal or mode == "groups")
        for strategy, layout in (("ulysses", "contiguous"), ("longnet", "contiguous"), ("ring", "contiguous"),
                                 ("ring", "zigzag")):
            def mine(t):
                return shard_sequence(t.detach(), layout=layout)

            shards = [mine(t).clone().requires_grad_() for t in (q, k, v)]
            mask_shard = mine(mask)
            got = sequence_parallel_attention(*shards, segs, rates, strategy=strategy, mode=mode,
                                              is_causal=is_causal, layout=layout, key_padding_mask=mask_shard)
            got_grads = torch.autograd.grad(got, shards, mine(g))
            where = f"{strategy} {layout}, rank {rank}/{world_size}, {mode}, causal={is_causal}"
            torch.testing.assert_close(got, mine(out), rtol=1e-10, atol=1e-10, msg=where)
            for x, want in zip(got_grads, grads):
                torch.testing.assert_close(x, mine(want), rtol=1e-10, atol=1e-10, msg=where)
            assert torch.equal(mask_shard, mine(mask))  # the caller's mask is not modified


def _ulysses_refusals() -> None:
    from dilated_ops.sequence_parallel import sequence_parallel_attention

    q, kv = torch.randn(1, 8, 4, 8, dtype=torch.float64), torch.randn(1, 8, 1, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"must divide the KV heads of grouped-query attention \(1\)"):
        sequence_parallel_attention(q, kv, kv, [8], [1], strategy="ulysses")
    with pytest.raises(ValueError, match=r"key_padding_mask must have shape \(batch, seq\) = \(1, 8\): got "
                                         r"\(1, 16\)"):
        sequence_parallel_attention(q, q, q, [8], [1], strategy="longnet",
                                    key_padding_mask=torch.ones(1, 16, dtype=torch.bool))


STRATEGIES = ["ulysses", "longnet", "ring", "ring-zigzag"]


def _equality_worker(rank: int, world_size: int, init_file: str) -> None:
    with process_group(rank, world_size, init_file):
        for strategy in STRATEGIES:
            _strategy_equals_single_process(strategy, rank, world_size)
        _masked_gqa_equals_single_process(rank, world_size)
        if world_size == 2:
            _ulysses_refusals()


@pytest.mark.parametrize("world_size", [2, 4])
def test_each_strategy_equals_the_single_process_op(world_size):
    """Each rank's output slice and q/k/v gradients equal the single-process op's (float64,
    1e-10), in every strategy: plain heads over shards shorter and longer than segments; then
    (issue 21) k, v with fewer heads (each (KV head, offset) pair's rows travel once; ulysses
    moves KV head shards) and a key padding mask given as each rank's shard, with rows that see
    no key; on 2 ranks also Ulysses' refusals (KV heads the group does not divide, a whole-sequence
    mask). One spawn per group size: starting the processes costs more than a strategy's cases;
    a mismatch names its strategy, layout, rank and case."""
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_equality_worker, args=(world_size, os.path.join(tmp, "init")), nprocs=world_size, join=True)


def _failing_worker(rank: int, world_size: int, init_file: str, check_shards: bool, out_dir: str) -> None:
    import datetime

    from dilated_ops.sequence_parallel import sequence_parallel_attention

    with process_group(rank, world_size, init_file, timeout=datetime.timedelta(seconds=60)):
        q = torch.randn(1, 8, 4, 8, dtype=torch.float64)
        rates = [1, 2] if rank == 0 else [1, 3]  # rank 1 passes a bad rate (8 % 3 != 0)
        if not check_shards:
            sequence_parallel_attention(q, q, q, [4, 8], rates, check_shards=False)
        messages = []
        # then rank 1 passes a 3-D q (a shape the agreement cannot hold): the same, no collective mismatch
        for bad_q in (q, q if rank == 0 else q[0]):
            try:
                sequence_parallel_attention(bad_q, bad_q, bad_q, [4, 8], rates if bad_q is q else [1, 2])
                messages.append("no error")
            except ValueError as error:
                messages.append(str(error))
        with open(os.path.join(out_dir, str(rank)), "w") as f:
            f.write("\n".join(messages))


def test_a_rank_that_raises_makes_every_rank_raise_its_error():
    """The ranks agree on their arguments before the op's collectives: the rank with bad input
    raises its own error, every other rank a ValueError quoting it; nobody hangs."""
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_failing_worker, args=(2, os.path.join(tmp, "init"), True, tmp), nprocs=2, join=True)
        messages = [open(os.path.join(tmp, str(r))).read().split("\n") for r in range(2)]
    for i, cause in enumerate(("segment_lengths[1] (8) must be divisible by dilation_rates[1] (3)",
                               "q must be 4-D (batch, seq, heads, head_dim): got shape (8, 4, 8)")):
        assert messages[1][i].startswith(cause), messages
        assert messages[0][i].startswith("sequence-parallel attention: rank 1 of the group refused its arguments "
                                         f"(ValueError: {cause}"), messages


def test_without_the_check_a_rank_that_raises_still_fails_the_job_with_no_hang():
    """check_shards=False: the arguments are still checked before any collective, so the rank
    with bad input raises at once; the launcher (here mp.spawn, torchrun alike) then stops the
    rank waiting in the collective: the job fails with that rank's message, well before the
    group's timeout."""
    import time

    start = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        with pytest.raises(mp.ProcessRaisedException, match=r"segment_lengths\[1\] \(8\) must be divisible"):
            mp.spawn(_failing_worker, args=(2, os.path.join(tmp, "init"), False, tmp), nprocs=2, join=True)
    assert time.monotonic() - start < 50


def _compile_worker(rank: int, world_size: int, init_file: str) -> None:
    from dilated_ops.sequence_parallel import sequence_parallel_attention

    with process_group(rank, world_size, init_file):
        # shards of 12: segments of 2 and 6 inside them, 24 spanning both (longnet gathers its rows);
        # zigzag: chunks of 6, 24 spanning all 4
        segs, rates = [2, 6, 24], [1, 2, 3]
        for name in ("ulysses", "longnet", "ring", "ring-zigzag"):
            strategy, _, layout = name.partition("-")
            extra = (layout,) if layout else ()
            op = getattr(torch.ops.dilated, f"{strategy}_attention")
            torch.manual_seed(rank)
            eager_in = [torch.randn(2, 12, 4, 8, dtype=torch.float64, requires_grad=True) for _ in range(3)]
            compiled_in = [t.detach().clone().requires_grad_() for t in eager_in]
            g = torch.randn(2, 12, 4, 8, dtype=torch.float64)

            def fn(q, k, v):
                return sequence_parallel_attention(q, k, v, segs, rates, strategy=strategy, mode="longnet",
                                                   is_causal=True, layout=layout or "contiguous")

            want = fn(*eager_in)
            want_grads = torch.autograd.grad(want, eager_in, g)
            torch._dynamo.reset()
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
            calls = [n.target for n in ep.graph.nodes
                     if n.op == "call_function" and n.target is not operator.getitem]
            assert calls == [op.default], calls
            path = os.path.join(os.path.dirname(init_file), f"{name}{rank}.pt2")
            torch.export.save(ep, path)
            torch.testing.assert_close(torch.export.load(path).module()(*(t.detach() for t in eager_in)),
                                       want.detach(), rtol=0, atol=0)
            # a world_size that is not the group's: a clear error on every rank, before any collective
            with pytest.raises(ValueError, match=r"world_size \(4\) must be the size of process group|"
                                                 r"the longnet and ring strategies need"):
                op(*eager_in, segs, rates, "longnet", True, None, dist.group.WORLD.group_name, 4, *extra)
            # every rank runs opcheck's calls in the same order, so their collectives pair up
            torch.library.opcheck(op.default, (*compiled_in, segs, rates, "longnet", True, None,
                                               dist.group.WORLD.group_name, world_size, *extra))


def test_every_strategy_compiles_exports_and_passes_opcheck():
    """Per strategy: torch.compile(fullgraph=True) with the op as one node, results equal to
    eager, forward and backward; torch.export with the op as one node, saved and loaded;
    torch.library.opcheck of the op (fake kernel, autograd, AOT dispatch) in a 2-rank group."""
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_compile_worker, args=(2, os.path.join(tmp, "init")), nprocs=2, join=True)


def _sharded_equals_whole(module, ref, x, g, layout="contiguous"):
    """``module`` on this rank's shard of ``x`` against ``ref`` (given ``module``'s parameters)
    on the whole: the output shard, the input gradient's shard and the parameter gradients
    all-reduced over the ranks (float64, 1e-10). Returns ``(shard output, whole output)``."""
    import dilated_ops

    def shard(t):
        return dilated_ops.shard_sequence(t, layout=layout)

    close = dict(rtol=1e-10, atol=1e-10)
    ref.load_state_dict(module.state_dict())
    xr = x.clone().requires_grad_()
    want, _ = ref(xr, xr, xr, is_causal=True)
    want.backward(g)
    xs = shard(x).clone().requires_grad_()
    got, _ = module(xs, xs, xs, is_causal=True)
    got.backward(shard(g))
    torch.testing.assert_close(got, shard(want.detach()), **close)
    torch.testing.assert_close(xs.grad, shard(xr.grad), **close)
    for (name, p), q in zip(module.named_parameters(), ref.parameters()):
        total = p.grad.clone()
        dist.all_reduce(total)
        torch.testing.assert_close(total, q.grad, msg=name, **close)
    return got, want


def _bytes_sent(wrapped, call):
    """``(forward, backward)`` bytes counted while ``call()`` runs and its output's backward:
    each ``(owner, name, count)`` of ``wrapped`` has ``owner.name`` replaced by a function that
    adds ``count(*args)`` and calls the real one."""
    sent, real = [], [getattr(owner, name) for owner, name, _ in wrapped]

    def counting(fn, count):
        return lambda *args, **kwargs: sent.append(count(*args)) or fn(*args, **kwargs)

    for (owner, name, count), fn in zip(wrapped, real):
        setattr(owner, name, counting(fn, count))
    try:
        out = call()
        forward = sum(sent)
        out.backward(torch.randn_like(out))
    finally:
        for (owner, name, _), fn in zip(wrapped, real):
            setattr(owner, name, fn)
    return forward, sum(sent) - forward


def _modules_worker(rank: int, world_size: int, init_file: str) -> None:
    import copy

    import dilated_ops

    with process_group(rank, world_size, init_file):
        close = dict(rtol=1e-10, atol=1e-10)
        # "auto" in a process group: the distributed module. Each rank's output shard, its input
        # gradient and the all-reduced parameter gradients equal the one-process module's.
        torch.manual_seed(0)  # the same parameters and inputs on every rank
        kw = dict(embed_dim=32, num_heads=4, segment_lengths=[8, 16, 32], dilation_rates=[1, 2, 4],
                  dtype=torch.float64)
        m = dilated_ops.create_multihead_dilated_attention("auto", **kw)
        assert type(m) is dilated_ops.DistributedMultiheadDilatedAttention, type(m)
        assert "world size 2" in m.selection_reason
        x = torch.randn(2, 64, 32, dtype=torch.float64)
        g = torch.randn(2, 64, 32, dtype=torch.float64)
        got, want = _sharded_equals_whole(m, dilated_ops.create_multihead_dilated_attention("improved", **kw), x, g)
        torch.testing.assert_close(dilated_ops.unshard_sequence(got.detach()), want.detach(), **close)
        # unshard_sequence's gradient: every rank's loss on the whole reaches each shard (summed)
        mine = dilated_ops.shard_sequence(x).clone().requires_grad_()
        (dilated_ops.unshard_sequence(mine) * g).sum().backward()
        torch.testing.assert_close(mine.grad, world_size * dilated_ops.shard_sequence(g), **close)

        # The factory's "ring" in a process group: the ring strategy on each rank's shard (64
        # spans both shards of 32 here: its rows travel).
        kw_ring = dict(kw, segment_lengths=[8, 16, 64], dilation_rates=[1, 2, 4])
        ring = dilated_ops.create_multihead_dilated_attention("ring", **kw_ring)
        assert type(ring) is dilated_ops.RingMultiheadDilatedAttention
        _sharded_equals_whole(ring, dilated_ops.create_multihead_dilated_attention("improved", **kw_ring), x, g)
        # ... and on zigzag shards (chunks 16 of 4: rank 0 holds positions 0-15 and 48-63)
        zigzag = dilated_ops.create_multihead_dilated_attention("ring", layout="zigzag", **kw_ring)
        assert zigzag.attention.layout == "zigzag"
        got, want = _sharded_equals_whole(zigzag, dilated_ops.create_multihead_dilated_attention("improved", **kw_ring),
                                          x, g, layout="zigzag")
        torch.testing.assert_close(dilated_ops.unshard_sequence(got.detach(), layout="zigzag"), want.detach(), **close)
        torch.testing.assert_close(dilated_ops.shard_sequence(x, layout="zigzag"),
                                   torch.cat([x[:, 16 * rank:16 * rank + 16], x[:, 48 - 16 * rank:64 - 16 * rank]], 1),
                                   rtol=0, atol=0)
        mine = dilated_ops.shard_sequence(x, layout="zigzag").clone().requires_grad_()
        (dilated_ops.unshard_sequence(mine, layout="zigzag") * g).sum().backward()
        torch.testing.assert_close(mine.grad, world_size * dilated_ops.shard_sequence(g, layout="zigzag"), **close)
        with pytest.raises(ValueError, match="layout 'zigzag' is taken by strategy 'ring' only: got strategy "
                                             "'longnet'"):
            dilated_ops.sequence_parallel_attention(mine, mine, mine, [8, 64], [1, 4], strategy="longnet",
                                                    layout="zigzag")
        with pytest.raises(ValueError, match="layout must be one of 'contiguous', 'zigzag': got 'striped'"):
            dilated_ops.create_dilated_attention("ring", segment_lengths=[8], dilation_rates=[1], layout="striped")

        # The single-head module of the factory's "distributed", on a process group given.
        a = dilated_ops.create_dilated_attention("distributed", segment_lengths=[8, 32], dilation_rates=[1, 4],
                                                 mode="longnet", process_group=dist.group.WORLD)
        q, k, v = (torch.randn(1, 48, 4, 8, dtype=torch.float64) for _ in range(3))
        shards = [dilated_ops.shard_sequence(t) for t in (q, k, v)]
        want = dilated_ops.dilated_attention(q, k, v, [8, 32], [1, 4], mode="longnet")
        torch.testing.assert_close(a(*shards), dilated_ops.shard_sequence(want), **close)

        # Each strategy through the module: 8 inside the shards of 24, 48 spanning both.
        for strategy in ("longnet", "ring", "ulysses"):
            a = dilated_ops.create_dilated_attention("distributed", segment_lengths=[8, 48], dilation_rates=[1, 4],
                                                     strategy=strategy)
            want = dilated_ops.dilated_attention(q, k, v, [8, 48], [1, 4], is_causal=True)
            torch.testing.assert_close(a(*shards, is_causal=True), dilated_ops.shard_sequence(want), **close)
            # ... with grouped-query K/V (2 KV heads) and this rank's shard of a key padding mask
            kv = [t[:, :, :2] for t in (k, v)]
            keep = torch.rand(1, 48) > 0.3
            want = dilated_ops.dilated_attention(q, *kv, [8, 48], [1, 4], is_causal=True, key_padding_mask=keep)
            got = a(shards[0], *(dilated_ops.shard_sequence(t) for t in kv), is_causal=True,
                    key_padding_mask=dilated_ops.shard_sequence(keep))
            torch.testing.assert_close(got, dilated_ops.shard_sequence(want), **close)

        # A graph rewrite targeting "distributed": nn.MultiheadAttention run on each rank's shard.
        mha = torch.nn.MultiheadAttention(32, 4, batch_first=True, dtype=torch.float64)
        local, _ = dilated_ops.convert(copy.deepcopy(mha), [8, 16, 32], [1, 2, 4], implementation="improved")
        sharded, report = dilated_ops.convert(copy.deepcopy(mha), [8, 16, 32], [1, 2, 4],
                                              implementation="distributed")
        assert len(report.rewritten) == 1 and not report.refused, report
        want = local(x, x, x, need_weights=False)[0]
        xs = dilated_ops.shard_sequence(x)
        torch.testing.assert_close(sharded(xs, xs, xs, need_weights=False)[0], dilated_ops.shard_sequence(want),
                                   **close)
        pad = torch.rand(2, 64) < 0.3  # nn.MultiheadAttention's convention: True = padding
        want = local(x, x, x, key_padding_mask=pad, need_weights=False)[0]
        got = sharded(xs, xs, xs, key_padding_mask=dilated_ops.shard_sequence(pad), need_weights=False)[0]
        torch.testing.assert_close(got, dilated_ops.shard_sequence(want), **close)

        # The bytes each rank sends, counted in each strategy's collectives (as a ring algorithm
        # moves them), are what the bench reports (segment 48 spans both shards of 24, all 4 zigzag chunks of 12).
        from dilated_ops.kernels import distributed as kernels

        p = world_size
        counters = {
            "ulysses": [(dist, "all_to_all_single", lambda out, inp: inp.numel() * inp.element_size() * (p - 1) // p)],
            "longnet": [(kernels, "_ALL_GATHER", lambda out, inp: (p - 1) * inp.numel() * inp.element_size()),
                        (kernels, "_REDUCE_SCATTER", lambda out, inp: (p - 1) * out.numel() * out.element_size())],
            "ring": [(kernels, "_pass", lambda tensors, *_: sum(t.numel() * t.element_size() for t in tensors))],
        }
        formulas = {
            "ulysses": lambda shape: kernels.ulysses_bytes(shape, 8, 8, p),
            "longnet": lambda shape: kernels.longnet_bytes(shape, 8, 8, p, [4, 48], [1, 4], "longnet"),
            "ring": lambda shape: kernels.ring_bytes(shape, 8, 8, p, [4, 48], [1, 4], "longnet"),
            "ring-zigzag": lambda shape: kernels.ring_bytes(shape, 8, 8, p, [4, 48], [1, 4], "longnet", "zigzag"),
        }
        counters["ring-zigzag"] = counters["ring"]
        for strategy, wrapped in counters.items():
            leaves = [t.clone().requires_grad_() for t in shards]
            name, _, layout = strategy.partition("-")
            forward, backward = _bytes_sent(wrapped, lambda: dilated_ops.sequence_parallel_attention(
                *leaves, [4, 48], [1, 4], strategy=name, mode="longnet", layout=layout or "contiguous"))
            assert forward > 0 and (forward, backward) == formulas[strategy](leaves[0].shape), strategy

        # Shards of different lengths: the same clear error on every rank, no hang.
        q = torch.randn(1, 8 + 4 * rank, 4, 8, dtype=torch.float64)
        with pytest.raises(ValueError, match=r"equal shards .*: got rank 0: \(1, 8, 4, 8\), rank 1: \(1, 12, 4, 8\)"):
            dilated_ops.sequence_parallel_attention(q, q, q, [4, 8], [1, 2])
        with pytest.raises(ValueError, match=r"sequence length \(7, dim 1\) must be divisible by 2 \(layout "
                                             r"'contiguous' on a process group of size 2\)"):
            dilated_ops.shard_sequence(torch.randn(1, 7, 4))
        with pytest.raises(ValueError, match=r"sequence length \(6, dim 1\) must be divisible by 4 \(layout "
                                             r"'zigzag' on a process group of size 2\)"):
            dilated_ops.shard_sequence(torch.randn(1, 6, 4), layout="zigzag")


def test_modules_factory_and_rewrites_in_a_process_group():
    """The "distributed" row end to end on 2 gloo processes: the factory's "auto" and
    "distributed", the multihead module (input and all-reduced parameter gradients included),
    a converted nn.MultiheadAttention, the shard helpers, and unequal shards as a clear error."""
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_modules_worker, args=(2, os.path.join(tmp, "init")), nprocs=2, join=True)


def test_distributed_outside_a_process_group_is_the_plain_op():
    import dilated_ops

    a = dilated_ops.create_dilated_attention("distributed", segment_lengths=[8, 16], dilation_rates=[1, 2])
    q, k, v = (torch.randn(2, 32, 4, 8, dtype=torch.float64) for _ in range(3))
    torch.testing.assert_close(a(q, k, v, is_causal=True),
                               dilated_ops.dilated_attention(q, k, v, [8, 16], [1, 2], is_causal=True),
                               rtol=0, atol=0)
    with pytest.raises(ValueError, match="needs an initialized torch.distributed process group"):
        dilated_ops.sequence_parallel_attention(q, k, v, [8, 16], [1, 2])
    with pytest.raises(ValueError, match="needs an initialized torch.distributed process group"):
        dilated_ops.shard_sequence(q)


def test_the_torchrun_example_trains_with_the_sequence_sharded():
    """README's `torchrun --nproc-per-node 2 examples/train_sequence_parallel.py` (gloo): runs to
    the end on 2 ranks and its loss falls."""
    import pathlib
    import re
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(root / "examples" / "train_sequence_parallel.py"), "--steps", "40"],
                          capture_output=True, text=True, timeout=150, cwd=root,
                          env=dict(os.environ, PYTHONPATH=str(root)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "(2 ranks, 256 positions each)" in proc.stdout
    first, last = map(float, re.search(r"loss ([\d.]+) -> ([\d.]+)", proc.stdout).groups())
    assert last < first - 0.5, proc.stdout


def _nccl_worker(rank: int, world_size: int, init_file: str) -> None:
    import dilated_ops

    torch.cuda.set_device(rank)
    with process_group(rank, world_size, init_file, "nccl"):
        n, h, d, segs, rates = 8192, 12, 64, [512, 2048, 8192], [1, 2, 4]
        for name, mode, is_causal in itertools.product(("ulysses", "longnet", "ring", "ring-zigzag"),
                                                       ("groups", "longnet"), (False, True)):
            strategy, _, layout = name.partition("-")
            layout = layout or "contiguous"
            torch.manual_seed(0)  # the same whole inputs on every rank
            full = [torch.randn(2, n, h, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                    for _ in range(3)]
            g = torch.randn(2, n, h, d, device="cuda", dtype=torch.bfloat16)
            want = dilated_ops.dilated_attention(*full, segs, rates, mode=mode, is_causal=is_causal)
            want_grads = torch.autograd.grad(want, full, g)

            def mine(t):
                return dilated_ops.shard_sequence(t.detach(), layout=layout)

            shards = [mine(t).clone().requires_grad_() for t in full]
            got = dilated_ops.sequence_parallel_attention(*shards, segs, rates, strategy=strategy, mode=mode,
                                                          is_causal=is_causal, layout=layout)
            got_grads = torch.autograd.grad(got, shards, mine(g))
            for x, y in zip((got, *got_grads), (want, *want_grads)):
                y = mine(y).float()
                err = ((x.float() - y).norm() / y.norm()).item()
                assert err < 1e-2, (rank, world_size, name, mode, is_causal, err)


@pytest.mark.parametrize("world_size", [2, 4])
def test_every_strategy_on_gpus_over_nccl_matches_one_gpu(world_size):
    """bf16 on 2 and 4 GPUs over NCCL, Ulysses, LongNet and ring (contiguous and zigzag shards):
    each rank's output slice and q/k/v gradients match the one-GPU op on the whole sequence
    (relative error < 1e-2), both modes, causal and not."""
    if torch.cuda.device_count() < world_size:
        pytest.skip(f"needs {world_size} CUDA GPUs (found {torch.cuda.device_count()})")
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_nccl_worker, args=(world_size, os.path.join(tmp, "init")), nprocs=world_size, join=True)


def _segment_ranks_worker(rank: int, world_size: int, init_file: str) -> None:
    import dilated_ops
    from dilated_ops.kernels import distributed as kernels

    with process_group(rank, world_size, init_file):
        sizes, real_gather, real_scatter = [], kernels._ALL_GATHER, kernels._REDUCE_SCATTER

        def gather(output, input, group=None, **kwargs):
            sizes.append(("gather", dist.get_world_size(group), input.numel()))
            return real_gather(output, input, group=group, **kwargs)

        def scatter(output, input, group=None, **kwargs):
            sizes.append(("scatter", dist.get_world_size(group), output.numel()))
            return real_scatter(output, input, group=group, **kwargs)

        kernels._ALL_GATHER, kernels._REDUCE_SCATTER = gather, scatter
        torch.manual_seed(0)
        full = [torch.randn(1, 32, 2, 4, dtype=torch.float64, requires_grad=True) for _ in range(3)]
        # shards of 8: segments of 16 span 2 ranks (groups {0, 1}, {2, 3}), 64 > 32 spans all 4
        segs, rates = [16, 64], [2, 4]
        want = dilated_ops.dilated_attention(*full, segs, rates, mode="longnet", is_causal=True)
        g = torch.randn_like(want)
        want_grads = torch.autograd.grad(want, full, g)
        shards = [dilated_ops.shard_sequence(t.detach()).clone().requires_grad_() for t in full]
        got = dilated_ops.sequence_parallel_attention(*shards, segs, rates, strategy="longnet", mode="longnet",
                                                      is_causal=True)
        got_grads = torch.autograd.grad(got, shards, dilated_ops.shard_sequence(g))
        kernels._ALL_GATHER, kernels._REDUCE_SCATTER = real_gather, real_scatter
        close = dict(rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(got, dilated_ops.shard_sequence(want.detach()), **close)
        for x, y in zip(got_grads, want_grads):
            torch.testing.assert_close(x, dilated_ops.shard_sequence(y), **close)
        # per branch (2 heads x 8 / r rows of k and v), among its segment's ranks only
        rows16, rows64 = 2 * 2 * (8 // 2) * 4, 2 * 2 * (8 // 4) * 4
        assert sizes == [("gather", 2, rows16), ("gather", 4, rows64), ("scatter", 2, rows16),
                         ("scatter", 4, rows64)], sizes


def test_longnet_gathers_only_among_a_segments_ranks():
    """A segment spanning 2 of 4 shards gathers its rows (and returns their gradients) among
    those 2 ranks; one spanning the sequence among all 4; the result is still exact."""
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_segment_ranks_worker, args=(4, os.path.join(tmp, "init")), nprocs=4, join=True)
