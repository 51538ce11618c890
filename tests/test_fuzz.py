"""Fuzzer (issue 18): random configurations of every built variant against the float64 reference,
forward and backward, in one test per variant family.

Each run draws a new seed unless ``DILATED_OPS_FUZZ_SEED`` is set, and prints it with the number
of configurations. Case ``i`` of a run is drawn from ``(seed, i)`` alone, so one failure replays
by itself::

    DILATED_OPS_FUZZ_SEED=<seed> DILATED_OPS_FUZZ_CASE=<i> python -m pytest tests/test_fuzz.py -s

``DILATED_OPS_FUZZ_COUNT`` changes the number of cases (default: 2000 dilated, 600 with GQA,
padding and packing, 500 block-sparse,
1000 head windows; per sequence-parallel strategy 100 configurations on 2 gloo processes and 40
on 4).
"""
import json
import os
import random
import sys
import tempfile
import time

import pytest
import torch

import dilated_ops
from dilated_ops.kernels import block_sparse
from dilated_ops.kernels.reference import block_sparse_reference, dilated_attention_reference
from models import process_group

SEED = int(os.environ.get("DILATED_OPS_FUZZ_SEED", time.time_ns() % 2**31))
CASE = os.environ.get("DILATED_OPS_FUZZ_CASE")
LAYOUTS = ("contiguous", "transposed", "fused_qkv", "strided_heads")


def say(capsys, text: str) -> None:
    with capsys.disabled():  # the seed and count show in every run's output, passing or not
        print(f"\n{text}")


def inputs(b: int, n: int, h: int, d: int, layout: str):
    """q, k, v ``(b, n, h, d)`` float64 in one of the memory layouts models produce."""
    if layout == "transposed":  # (b, h, n, d) memory, as from SDPA-style code
        return [torch.randn(b, h, n, d, dtype=torch.float64).transpose(1, 2) for _ in range(3)]
    if layout == "fused_qkv":  # slices of one (b, n, 3, h, d) projection
        return list(torch.randn(b, n, 3, h, d, dtype=torch.float64).unbind(2))
    if layout == "strided_heads":  # every other head of a wider tensor
        return [torch.randn(b, n, 2 * h, d, dtype=torch.float64)[:, :, ::2] for _ in range(3)]
    return [torch.randn(b, n, h, d, dtype=torch.float64) for _ in range(3)]


def dilated_case(seed: int, i: int):
    rng = random.Random(f"{seed}-dilated-{i}")
    g = rng.randint(1, 4)
    rates = [rng.choice([1, 1, 2, 3, 4]) for _ in range(g)]
    segs = [r * rng.choice([1, 2, 3, 5, 8]) for r in rates]  # includes rate = segment
    mode = rng.choice(["groups", "longnet"])
    h = rng.randint(g if mode == "groups" else 1, 7)
    n = rng.choice([1, 2, rng.randint(1, 40), rng.randint(1, 120)])  # segments > n happen too
    return dict(b=rng.randint(1, 3), n=n, h=h, d=rng.choice([1, 3, 4, 8, 13, 16]), segs=segs, rates=rates,
                mode=mode, causal=rng.random() < 0.5, scale=rng.choice([None, None, 0.37, 0.0, -0.6, 1.9]),
                layout=rng.choice(LAYOUTS), data=rng.randrange(2**31))


def masked_case(seed: int, i: int):
    """A dilated case with SPEC section 8's arguments: grouped-query heads, key padding (rows
    fully padded sometimes), packed documents (empty ones included)."""
    c = dilated_case(seed, i)
    rng = random.Random(f"{seed}-masked-{i}")
    ratio = rng.choice([1, 2, 3, 4])
    h_kv = max(1, c["h"] // ratio)
    h = h_kv * ratio
    if c["mode"] == "groups" and h < len(c["segs"]):
        h = h_kv * ratio * -(-len(c["segs"]) // (h_kv * ratio))
    cuts = sorted(rng.randint(0, c["n"]) for _ in range(rng.randint(0, 3)))
    return dict(c, h=h, h_kv=h_kv, pad=rng.choice([None, 0.2, 0.6, 1.0]),
                cu=[0, *cuts, c["n"]] if rng.random() < 0.5 else None)


def block_sparse_case(seed: int, i: int):
    rng = random.Random(f"{seed}-block_sparse-{i}")
    bs = rng.choice([1, 2, 3, 4, 8, 16])
    n = rng.randint(1, 90)
    pattern = rng.choice(["mask", "mask", "local_window", "global_local", "dilated_sparse"])
    return dict(b=rng.randint(1, 3), n=n, h=rng.randint(1, 5), d=rng.choice([1, 3, 8, 16]), bs=bs, pattern=pattern,
                density=rng.choice([0.0, 0.2, 0.5, 0.9, 1.0]), window=rng.choice([None, bs, 3 * bs, 8 * bs]),
                global_tokens=rng.choice([0, bs, 2 * bs]), ratio=rng.choice([0.1, 0.3, 1.0]),
                segs=[bs * rng.choice([1, 2, 4]), bs * 4], rates=[1, rng.choice([1, 2])],
                causal=rng.random() < 0.5, scale=rng.choice([None, 0.5, -0.3]), shared=rng.random() < 0.5,
                layout=rng.choice(LAYOUTS), data=rng.randrange(2**31))


def window_case(seed: int, i: int):
    c = dilated_case(seed, i)
    rng = random.Random(f"{seed}-window-{i}")
    start = rng.randrange(c["h"])
    return dict(c, start=start, stop=rng.randint(start + 1, c["h"]))


def ulysses_case(seed: int, i: int, world_size: int):
    rng = random.Random(f"{seed}-ulysses{world_size}-{i}")
    g = rng.randint(1, 3)
    rates = [rng.choice([1, 1, 2, 3, 4]) for _ in range(g)]
    mode = rng.choice(["groups", "longnet"])
    per_rank = rng.randint(-(-g // world_size) if mode == "groups" else 1, 3)
    return dict(b=rng.randint(1, 2), n=world_size * rng.randint(1, 12), h=world_size * per_rank,
                d=rng.choice([1, 3, 8]), segs=[r * rng.choice([1, 2, 3, 5, 8]) for r in rates], rates=rates,
                mode=mode, causal=rng.random() < 0.5, scale=rng.choice([None, 0.37, -0.6]),
                data=rng.randrange(2**31), strategy="ulysses")


def longnet_case(seed: int, i: int, world_size: int):
    """Branches the LongNet strategy takes: segments inside a shard (dividing its length ``s``)
    or spanning ``m`` whole shards (``m`` up to ``P + 2``: a last segment on fewer ranks, or one
    longer than the sequence), rates dividing ``s``; any head count."""
    rng = random.Random(f"{seed}-longnet{world_size}-{i}")
    s = rng.choice([1, 2, 4, 6, 8, 12])
    divisors = [x for x in range(1, s + 1) if s % x == 0]
    segs, rates = [], []
    for _ in range(rng.randint(1, 3)):
        if rng.random() < 0.5:  # inside a shard
            w = rng.choice(divisors)
            r = rng.choice([x for x in divisors if w % x == 0])
        else:  # spanning whole shards
            r = rng.choice(divisors)
            w = s * rng.randint(2, world_size + 2)
        segs.append(w)
        rates.append(r)
    mode = rng.choice(["groups", "longnet"])
    return dict(b=rng.randint(1, 2), n=world_size * s, h=rng.randint(len(segs) if mode == "groups" else 1, 5),
                d=rng.choice([1, 3, 8]), segs=segs, rates=rates, mode=mode, causal=rng.random() < 0.5,
                scale=rng.choice([None, 0.37, -0.6]), data=rng.randrange(2**31), strategy="longnet")


def close(got, want, tol=1e-9) -> bool:
    return torch.allclose(got.double(), want, rtol=tol, atol=tol) and not got.isnan().any()


def check_dilated(c) -> bool:
    torch.manual_seed(c["data"])
    q, k, v = (t.requires_grad_() for t in inputs(c["b"], c["n"], c["h"], c["d"], c["layout"]))
    kw = dict(mode=c["mode"], is_causal=c["causal"], scale=c["scale"])
    out = dilated_ops.dilated_attention(q, k, v, c["segs"], c["rates"], **kw)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    ref_in = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    ref = dilated_attention_reference(*ref_in, c["segs"], c["rates"], **kw)
    want = torch.autograd.grad(ref, ref_in, g)
    return close(out, ref) and all(close(a, w) for a, w in zip(grads, want))


def check_masked(c) -> bool:
    torch.manual_seed(c["data"])
    q = inputs(c["b"], c["n"], c["h"], c["d"], c["layout"])[0]
    k, v = inputs(c["b"], c["n"], c["h_kv"], c["d"], c["layout"])[1:]
    kpm = None if c["pad"] is None else torch.rand(c["b"], c["n"]) >= c["pad"]
    kw = dict(mode=c["mode"], is_causal=c["causal"], scale=c["scale"], key_padding_mask=kpm)
    leaves = [t.requires_grad_() for t in (q, k, v)]
    cu = None if c["cu"] is None else torch.tensor(c["cu"])
    out = dilated_ops.dilated_attention(*leaves, c["segs"], c["rates"], cu_seqlens=cu, **kw)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, g)
    ref_in = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    ref = dilated_attention_reference(*ref_in, c["segs"], c["rates"], cu_seqlens=c["cu"], **kw)
    want = torch.autograd.grad(ref, ref_in, g)
    return close(out, ref) and all(close(a, w) for a, w in zip(grads, want))


def check_block_sparse(c) -> bool:
    torch.manual_seed(c["data"])
    q, k, v = (t.requires_grad_() for t in inputs(c["b"], c["n"], c["h"], c["d"], c["layout"]))
    nb = block_sparse.num_blocks(c["n"], c["bs"])
    if c["pattern"] == "mask":
        mask = torch.rand(1 if c["shared"] else c["h"], nb, nb) < c["density"]
        cfg = dilated_ops.SparsePatternConfig("mask", block_size=c["bs"])
        layout = block_sparse.causal_blocks(mask) if c["causal"] else mask
    else:
        mask = None
        cfg = dilated_ops.SparsePatternConfig(c["pattern"], sparsity_ratio=c["ratio"], block_size=c["bs"],
                                              local_window_size=c["window"], global_tokens=c["global_tokens"])
        layout = block_sparse.pattern_layout(c["pattern"], c["n"], c["h"], c["bs"], c["window"], c["global_tokens"],
                                             c["ratio"], tuple(c["segs"]), tuple(c["rates"]), c["causal"],
                                             torch.device("cpu"))
    out = dilated_ops.block_sparse_attention(q, k, v, cfg, is_causal=c["causal"], scale=c["scale"],
                                             segment_lengths=c["segs"], dilation_rates=c["rates"], block_mask=mask)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    ref_in = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    ref = block_sparse_reference(*ref_in, layout, c["bs"], c["causal"], c["scale"])
    want = torch.autograd.grad(ref, ref_in, g)
    return close(out, ref) and all(close(a, w) for a, w in zip(grads, want))


def check_window(c) -> bool:
    """The op's head window (issue 20) against the slice of the whole call, forward and backward."""
    torch.manual_seed(c["data"])
    q, k, v = (t.requires_grad_() for t in inputs(c["b"], c["n"], c["h"], c["d"], c["layout"]))
    op = torch.ops.dilated.dilated_attention
    args = (c["segs"], c["rates"], c["mode"], c["causal"], c["scale"])
    out = op(q, k, v, *args)[0]
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    a, b = c["start"], c["stop"]
    parts = [t.detach()[:, :, a:b].requires_grad_() for t in (q, k, v)]
    got = op(*parts, *args, 0.0, None, "auto", a, c["h"])[0]
    got_grads = torch.autograd.grad(got, parts, g[:, :, a:b])
    return close(got, out[:, :, a:b], 1e-12) and all(close(x, w[:, :, a:b], 1e-12) for x, w in zip(got_grads, grads))


def check_sequence_parallel(c, rank: int, world_size: int) -> bool:
    from dilated_ops.sequence_parallel import sequence_parallel_attention

    torch.manual_seed(c["data"])  # the same full inputs on every rank
    full = [torch.randn(c["b"], c["n"], c["h"], c["d"], dtype=torch.float64, requires_grad=True) for _ in range(3)]
    g = torch.randn(c["b"], c["n"], c["h"], c["d"], dtype=torch.float64)
    kw = dict(mode=c["mode"], is_causal=c["causal"], scale=c["scale"])
    out = dilated_ops.dilated_attention(*full, c["segs"], c["rates"], **kw)
    grads = torch.autograd.grad(out, full, g)
    layout = c.get("layout", "contiguous")

    def mine(t):
        return dilated_ops.shard_sequence(t.detach(), layout=layout)

    shards = [mine(t).clone().requires_grad_() for t in full]
    got = sequence_parallel_attention(*shards, c["segs"], c["rates"], strategy=c["strategy"], layout=layout, **kw)
    got_grads = torch.autograd.grad(got, shards, mine(g))
    return close(got, mine(out)) and all(close(x, mine(w)) for x, w in zip(got_grads, grads))


CASES = {"ulysses": ulysses_case, "longnet": longnet_case,
         "ring": lambda seed, i, world_size: dict(longnet_case(seed, i, world_size), strategy="ring"),
         # zigzag: LongNet's geometry on the 2P chunks
         "ring-zigzag": lambda seed, i, world_size: dict(longnet_case(seed, i, 2 * world_size), strategy="ring",
                                                         layout="zigzag")}


def _sequence_parallel_worker(rank: int, world_size: int, init_file: str, cases, result_file: str) -> None:
    with process_group(rank, world_size, init_file):
        failed = {strategy: [i for i in cases if not check_sequence_parallel(make(SEED, i, world_size), rank,
                                                                             world_size)]
                  for strategy, make in CASES.items()}
        with open(f"{result_file}.{rank}", "w") as f:  # inside: the process ends with the block
            json.dump(failed, f)


def run_sequence_parallel(capsys, world_size: int, default_count: int) -> None:
    """Every strategy of CASES on the same processes (one spawn: starting them costs more than
    a strategy's cases)."""
    import torch.multiprocessing as mp

    count = int(os.environ.get("DILATED_OPS_FUZZ_COUNT", default_count))
    cases = [int(CASE)] if CASE is not None else list(range(count))
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        result = os.path.join(tmp, "failed")
        # the seed travels in the environment: a spawned process draws its own SEED otherwise
        os.environ["DILATED_OPS_FUZZ_SEED"] = str(SEED)
        mp.spawn(_sequence_parallel_worker, args=(world_size, os.path.join(tmp, "init"), cases, result),
                 nprocs=world_size)
        per_rank = [json.load(open(f"{result}.{r}")) for r in range(world_size)]
    replay = []
    for strategy, make in CASES.items():
        failed = sorted({i for ranks in per_rank for i in ranks[strategy]})
        say(capsys, f"fuzz {strategy} on {world_size} gloo processes: seed {SEED}, {len(cases)} configurations, "
            f"{len(failed)} mismatches")
        replay += [f"DILATED_OPS_FUZZ_SEED={SEED} DILATED_OPS_FUZZ_CASE={i}: {make(SEED, i, world_size)}"
                   for i in failed[:5]]
    say(capsys, f"fuzz sequence-parallel on {world_size} gloo processes: {time.perf_counter() - start:.1f} s")
    assert not replay, "mismatches against the single-process op; replay with:\n" + "\n".join(replay)


def run(capsys, name: str, make, check, default_count: int):
    count = int(os.environ.get("DILATED_OPS_FUZZ_COUNT", default_count))
    cases = [int(CASE)] if CASE is not None else range(count)
    start = time.perf_counter()
    failed = [i for i in cases if not check(make(SEED, i))]
    say(capsys, f"fuzz {name}: seed {SEED}, {len(cases)} configurations, {len(failed)} mismatches, "
        f"{time.perf_counter() - start:.1f} s")
    replay = [f"DILATED_OPS_FUZZ_SEED={SEED} DILATED_OPS_FUZZ_CASE={i}: {make(SEED, i)}" for i in failed[:5]]
    assert not failed, "mismatches against the float64 reference; replay with:\n" + "\n".join(replay)


def test_fuzz_dilated_attention(capsys):
    run(capsys, "dilated_attention", dilated_case, check_dilated, 2000)


def test_fuzz_gqa_padding_packed(capsys):
    run(capsys, "dilated_attention with GQA, key padding, packed documents", masked_case, check_masked, 600)


def test_fuzz_block_sparse_attention(capsys):
    run(capsys, "block_sparse_attention", block_sparse_case, check_block_sparse, 500)


def test_fuzz_head_window(capsys):
    run(capsys, "dilated_attention head window", window_case, check_window, 1000)


@pytest.mark.parametrize("world_size,count", [(2, 100), (4, 40)])
def test_fuzz_sequence_parallel(capsys, world_size, count):
    run_sequence_parallel(capsys, world_size, count)


def test_the_fuzzer_can_fail(monkeypatch, capsys):
    """A wrong kernel (1e-6 added to the output) is caught, with its replay line."""
    real = dilated_ops.dilated_attention
    monkeypatch.setattr(dilated_ops, "dilated_attention", lambda *a, **kw: real(*a, **kw) + 1e-6)
    monkeypatch.setattr(sys.modules[__name__], "CASE", None)
    with pytest.raises(AssertionError, match="DILATED_OPS_FUZZ_SEED=.* DILATED_OPS_FUZZ_CASE=0"):
        run(capsys, "dilated_attention (broken on purpose)", dilated_case, check_dilated, 5)
