"""Block-sparse attention (SPEC section 4): torch.ops.dilated.block_sparse_attention and
dilated_ops.block_sparse_attention against the float64 reference (dense attention under the
expanded element mask), forward and backward, for every pattern, causal and not, partial last
blocks, per-head layouts, query blocks with no key block and fuzzed layouts; the named patterns'
layouts against SPEC's definitions written out as loops; opcheck, gradcheck, compile, export,
the layout cache and validation errors."""
import math
import random

import pytest
import torch
import torch._dynamo.testing

import dilated_ops
from dilated_ops import SparsePatternConfig
from dilated_ops.kernels import block_sparse
from dilated_ops.kernels.reference import block_sparse_reference

from models import rel_err, run_saved_in_fresh_process, x64

OP = torch.ops.dilated.block_sparse_attention.default
BACKWARD_OP = torch.ops.dilated.block_sparse_attention_backward.default
CACHE_KEY = "kernels.block_sparse.layouts"

LOCAL = SparsePatternConfig("local_window", block_size=4, local_window_size=12)  # one block each side
GLOBAL = SparsePatternConfig("global_local", block_size=4, local_window_size=8, global_tokens=8)
DILATED = SparsePatternConfig("dilated_sparse", block_size=4)
MASK = SparsePatternConfig("mask", block_size=4)


def nblocks(n, block_size):
    return math.ceil(n / block_size)


def expected_layout(pattern, n, heads, is_causal, segs=(), rates=()):
    """``(heads, nb, nb)``: SPEC section 4 / SparsePatternConfig's docstring, one (head, query
    block i, key block j) at a time."""
    bs = pattern.block_size
    nb = nblocks(n, bs)
    if pattern.local_window_size is not None:
        half = (pattern.local_window_size // bs) // 2
    else:  # the widest band (2 * half + 1 blocks) of at most sparsity_ratio * nb blocks a row
        half = 0
        while 2 * (half + 1) + 1 <= pattern.sparsity_ratio * nb:
            half += 1
    g = pattern.global_tokens // bs if pattern.pattern_type == "global_local" else 0
    layout = torch.zeros(heads, nb, nb, dtype=torch.bool)
    for h in range(heads):
        for i in range(nb):
            for j in range(nb):
                if pattern.pattern_type == "dilated_sparse":
                    on = False
                    for w, r in zip(segs, rates):
                        seg = w // bs  # segment length in blocks
                        if i // seg == j // seg and (i % seg) % r == h % r and (j % seg) % r == h % r:
                            on = True
                else:
                    on = abs(i - j) <= half or i < g or j < g
                layout[h, i, j] = on and (j <= i or not is_causal)
    return layout


def reference_lse(q, k, layout, block_size, is_causal, scale=None):
    """The log-sum-exp ``(b, n, h)`` of the scores each query sees (``-inf`` where it sees none)."""
    b, n, h, d = q.shape
    scale = 1 / math.sqrt(d) if scale is None else scale
    blk = torch.arange(n) // block_size
    mask = layout.expand(h, -1, -1)[:, blk][:, :, blk]
    if is_causal:
        mask = mask & torch.ones(n, n, dtype=torch.bool).tril()
    s = torch.einsum("bihd,bjhd->bhij", q.double(), k.double()) * scale
    return torch.logsumexp(s.masked_fill(~mask, float("-inf")), -1).transpose(1, 2)


def op_args(pattern, segs=(), rates=()):
    return (pattern.pattern_type, pattern.block_size, pattern.local_window_size, pattern.global_tokens,
            float(pattern.sparsity_ratio), list(segs), list(rates))


def attend(path, q, k, v, pattern, is_causal=False, scale=None, segs=(), rates=(), block_mask=None):
    """The output through the public function ("eager": on plain tensors its eager fast path) or
    through the registered op itself ("op": the custom-op dispatch and registered autograd)."""
    if path == "eager":
        return dilated_ops.block_sparse_attention(q, k, v, pattern, is_causal=is_causal, scale=scale,
                                                  segment_lengths=segs, dilation_rates=rates, block_mask=block_mask)
    return OP(q, k, v, *op_args(pattern, segs, rates), is_causal, scale, block_mask)[0]


def leaves(*shape, count=3):
    return tuple(x64(*shape).requires_grad_() for _ in range(count))


def grads(out, inputs, grad_out, retain_graph=False):
    return torch.autograd.grad(out, inputs, grad_out, retain_graph=retain_graph)


def assert_matches_reference(path, q, k, v, pattern, layout, is_causal, tol=1e-10, **kw):
    """Forward and (dq, dk, dv) of ``attend`` equal the reference's under ``layout``; no NaN."""
    out = attend(path, q, k, v, pattern, is_causal, **kw)
    ref = block_sparse_reference(q, k, v, layout, pattern.block_size, is_causal, kw.get("scale"))
    assert out.shape == q.shape and out.dtype == q.dtype
    assert not torch.isnan(out).any()
    assert (out - ref).abs().max() < tol
    g = x64(*q.shape)
    got, want = grads(out, (q, k, v), g, retain_graph=True), grads(ref, (q, k, v), g)
    for name, a, b in zip("qkv", got, want):
        assert not torch.isnan(a).any(), f"d{name} has NaN"
        assert (a - b).abs().max() < tol, f"d{name}"
    return out


# Layouts of the named patterns (SPEC section 4), checked against expected_layout's loops.

LAYOUT_CASES = [
    # (pattern, n, heads, segs, rates)
    (SparsePatternConfig("local_window", block_size=8, local_window_size=24), 64, 3, (), ()),  # half 1
    (SparsePatternConfig("local_window", block_size=4, local_window_size=16), 37, 1, (), ()),  # half 2, partial
    (SparsePatternConfig("local_window", block_size=4, local_window_size=3), 21, 2, (), ()),   # window < block
    (SparsePatternConfig("local_window", block_size=2, local_window_size=None, sparsity_ratio=0.3), 40, 1, (), ()),
    (SparsePatternConfig("local_window", block_size=3, local_window_size=None, sparsity_ratio=0.01), 31, 1, (), ()),
    (SparsePatternConfig("local_window", block_size=1, local_window_size=None, sparsity_ratio=1.0), 9, 1, (), ()),
    (SparsePatternConfig("global_local", block_size=4, local_window_size=8, global_tokens=8), 50, 3, (), ()),
    (SparsePatternConfig("global_local", block_size=4, local_window_size=4, global_tokens=5), 29, 1, (), ()),
    (SparsePatternConfig("global_local", block_size=4, local_window_size=8, global_tokens=0), 33, 1, (), ()),
    (SparsePatternConfig("global_local", block_size=5, local_window_size=None, global_tokens=1000,
                         sparsity_ratio=0.2), 42, 2, (), ()),
    (SparsePatternConfig("global_local", block_size=2, local_window_size=None, global_tokens=4,
                         sparsity_ratio=0.5), 45, 1, (), ()),
    (DILATED, 70, 5, (16, 32), (1, 2)),
    (DILATED, 61, 7, (8, 24), (2, 3)),
    (SparsePatternConfig("dilated_sparse", block_size=2), 23, 3, (8, 16, 32), (1, 2, 4)),
    (DILATED, 10, 3, (12,), (1,)),  # segment longer than the sequence
]


def layout_id(case):
    p, n, h, segs, rates = case
    return f"{p.pattern_type}-bs{p.block_size}-w{p.local_window_size}-g{p.global_tokens}-sr{p.sparsity_ratio}-n{n}h{h}{list(segs)}"


@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("case", LAYOUT_CASES, ids=layout_id)
def test_named_layout_matches_spec_definition(case, is_causal):
    pattern, n, heads, segs, rates = case
    want = expected_layout(pattern, n, heads, is_causal, segs, rates)
    got = block_sparse.pattern_layout(pattern.pattern_type, n, heads, pattern.block_size, pattern.local_window_size,
                                      pattern.global_tokens, float(pattern.sparsity_ratio), tuple(segs),
                                      tuple(rates), is_causal, torch.device("cpu"))
    nb = nblocks(n, pattern.block_size)
    assert got.dtype == torch.bool and got.dim() == 3 and got.shape[0] in (1, heads) and got.shape[1:] == (nb, nb)
    assert torch.equal(got.expand(heads, nb, nb), want)
    # The op attends exactly over that layout (the reference under the loops' layout).
    q, k, v = leaves(2, n, heads, 8)
    assert_matches_reference("eager", q, k, v, pattern, want, is_causal, segs=segs, rates=rates)


@pytest.mark.parametrize("ratio", [0.05, 0.2, 0.3, 0.55, 1.0])
def test_sparsity_ratio_bounds_blocks_per_row(ratio):
    # local_window_size=None: the widest band with at most sparsity_ratio * nb blocks a row.
    for n, bs in ((60, 2), (100, 4), (17, 1)):
        nb = nblocks(n, bs)
        layout = block_sparse.pattern_layout("local_window", n, 1, bs, None, 0, ratio, (), (), False,
                                             torch.device("cpu"))[0]
        per_row = layout.sum(-1)
        assert per_row.max() <= max(1, ratio * nb)
        assert layout.diagonal().all()
        width = int(per_row.max())  # the band's full width (an interior row)
        assert width % 2 == 1 and width + 2 > ratio * nb  # one more block each side would exceed it
        assert torch.equal(layout, expected_layout(SparsePatternConfig("local_window", ratio, bs, None), n, 1,
                                                   False)[0])


def test_dilated_sparse_heads_have_different_layouts():
    layout = block_sparse.pattern_layout("dilated_sparse", 64, 4, 4, None, 0, 0.1, (32,), (2,), False,
                                         torch.device("cpu"))
    assert layout.shape == (4, 16, 16)
    assert not torch.equal(layout[0], layout[1]) and torch.equal(layout[0], layout[2])
    assert layout[0, 0, 0] and not layout[1, 0, 0] and layout[1, 1, 1] and not layout[0, 1, 1]


# Numerics against the float64 reference.

PATTERN_CASES = [
    # (pattern, segs, rates)
    (LOCAL, (), ()),
    (GLOBAL, (), ()),
    (SparsePatternConfig("local_window", sparsity_ratio=0.4, block_size=3, local_window_size=None), (), ()),
    (DILATED, (8, 16), (1, 2)),
    (SparsePatternConfig("dilated_sparse", block_size=3), (6, 12, 24), (1, 2, 4)),
]


@pytest.mark.parametrize("path", ["eager", "op"])
@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("shape", [(2, 37, 5, 8), (3, 16, 1, 4), (1, 1, 3, 16)], ids=str)
@pytest.mark.parametrize("case", PATTERN_CASES, ids=lambda c: f"{c[0].pattern_type}-bs{c[0].block_size}{list(c[1])}")
def test_named_patterns_match_reference(case, shape, is_causal, path):
    pattern, segs, rates = case
    q, k, v = leaves(*shape)
    layout = expected_layout(pattern, shape[1], shape[2], is_causal, segs, rates)
    assert_matches_reference(path, q, k, v, pattern, layout, is_causal, segs=segs, rates=rates)


@pytest.mark.parametrize("path", ["eager", "op"])
@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per_head"])
def test_mask_pattern_matches_reference(shared, is_causal, path):
    b, n, h, d = 2, 30, 5, 8  # 8 blocks of 4, the last one partial
    nb = nblocks(n, 4)
    block_mask = torch.rand(1 if shared else h, nb, nb) < 0.4
    block_mask[..., 3, :] = False  # a query block with no key block
    q, k, v = leaves(b, n, h, d)
    out = assert_matches_reference(path, q, k, v, MASK, block_mask, is_causal, block_mask=block_mask)
    assert torch.equal(out[:, 12:16], torch.zeros_like(out[:, 12:16]))


@pytest.mark.parametrize("path", ["eager", "op"])
def test_heads_with_different_layouts(path):
    # Each head of a per-head mask equals a call of that head alone with its own mask.
    b, n, h, d, bs = 2, 26, 3, 8, 4
    nb = nblocks(n, bs)
    block_mask = torch.stack([torch.ones(nb, nb, dtype=torch.bool).tril(),
                              torch.eye(nb, dtype=torch.bool),
                              torch.rand(nb, nb) < 0.5])
    assert not torch.equal(block_mask[0], block_mask[1])
    q, k, v = leaves(b, n, h, d)
    out = assert_matches_reference(path, q, k, v, MASK, block_mask, False, block_mask=block_mask)
    for i in range(h):
        one = attend(path, *(t[:, :, i:i + 1] for t in (q, k, v)), MASK, block_mask=block_mask[i:i + 1])
        assert (out[:, :, i:i + 1] - one).abs().max() < 1e-12
    assert (out[:, :, 0] - out[:, :, 1]).abs().max() > 1e-3


@pytest.mark.parametrize("path", ["eager", "op"])
@pytest.mark.parametrize("is_causal", [False, True])
def test_query_block_without_key_block_is_zero_with_zero_gradients(is_causal, path):
    b, n, h, d, bs = 2, 22, 3, 8, 4  # 6 blocks, the last one of 2 tokens
    nb = nblocks(n, bs)
    block_mask = torch.ones(h, nb, nb, dtype=torch.bool)
    block_mask[:, 1] = False  # query block 1: no key block, every head
    block_mask[1, 5] = False  # the partial last block, head 1
    block_mask[2, 2] = False
    block_mask[2, 2, 4] = True  # query block 2 of head 2 reads only key block 4: nothing when causal
    empty = [(slice(4, 8), slice(None)), (slice(20, 22), 1)] + ([(slice(8, 12), 2)] if is_causal else [])
    q, k, v = leaves(b, n, h, d)
    mask_before = block_mask.clone()
    out = assert_matches_reference(path, q, k, v, MASK, block_mask, is_causal, block_mask=block_mask)
    assert torch.equal(block_mask, mask_before)  # the causal cut is not applied in place
    _, lse = OP(q, k, v, *op_args(MASK), is_causal, None, block_mask)
    torch.testing.assert_close(lse, reference_lse(q, k, block_mask, bs, is_causal), rtol=1e-12, atol=1e-12)
    g = torch.zeros(b, n, h, d, dtype=torch.float64)
    for rows, heads in empty:
        assert torch.equal(out[:, rows, heads], torch.zeros_like(out[:, rows, heads]))
        assert torch.isneginf(lse[:, rows, heads]).all()
        g[:, rows, heads] = torch.randn_like(g[:, rows, heads])
    if not is_causal:
        assert not torch.equal(out[:, 8:12, 2], torch.zeros_like(out[:, 8:12, 2]))
    # An upstream gradient on the empty rows only reaches nothing.
    for name, grad in zip("qkv", grads(out, (q, k, v), g)):
        assert torch.equal(grad, torch.zeros_like(grad)), f"d{name}"


def test_all_blocks_masked_is_zero_everywhere():
    q, k, v = leaves(2, 9, 3, 4)
    for path in ("eager", "op"):
        out = attend(path, q, k, v, MASK, is_causal=True, block_mask=torch.zeros(1, 3, 3, dtype=torch.bool))
        assert torch.equal(out, torch.zeros_like(out))
        for grad in grads(out, (q, k, v), x64(2, 9, 3, 4)):
            assert torch.equal(grad, torch.zeros_like(grad))


def fuzz_configs(count, seed):
    """(b, n, h, d, block_size, density, shared, is_causal): batch 1-3, seq 1-120, heads 1-7, head_dim
    4-32, block_size 1-16; every fifth mask all False, the next all True."""
    rng = random.Random(seed)
    configs = []
    for i in range(count):
        density = 0.0 if i % 5 == 0 else 1.0 if i % 5 == 1 else rng.random()
        configs.append((rng.randint(1, 3), rng.randint(1, 120), rng.choice([1, 3, 5, 7, rng.randint(1, 7)]),
                        rng.randint(4, 32), rng.randint(1, 16), density, rng.random() < 0.3, rng.random() < 0.5))
    return configs


@pytest.mark.parametrize("config", fuzz_configs(20, seed=11), ids=lambda c: "b{}n{}h{}d{}bs{}p{:.2f}s{:d}c{:d}".format(*c))
def test_fuzz_random_masks(config):
    b, n, h, d, bs, density, shared, is_causal = config
    nb = nblocks(n, bs)
    block_mask = torch.rand(1 if shared else h, nb, nb) < density
    q, k, v = leaves(b, n, h, d)
    pattern = SparsePatternConfig("mask", block_size=bs)
    assert_matches_reference("eager", q, k, v, pattern, block_mask, is_causal, block_mask=block_mask)
    _, lse = OP(q.detach(), k.detach(), v.detach(), *op_args(pattern), is_causal, None, block_mask)
    torch.testing.assert_close(lse, reference_lse(q, k, block_mask, bs, is_causal), rtol=1e-12, atol=1e-12)


def fuzz_named(count, seed):
    rng = random.Random(seed)
    configs = []
    for _ in range(count):
        bs = rng.randint(2, 16)
        kind = rng.choice(["local_window", "global_local", "dilated_sparse"])
        segs = rates = ()
        if kind == "dilated_sparse":
            rates = tuple(rng.choice([1, 2, 3]) for _ in range(rng.randint(1, 3)))
            segs = tuple(bs * r * rng.randint(1, 4) for r in rates)
        window = rng.choice([None, rng.randint(1, 6 * bs)])
        pattern = SparsePatternConfig(kind, round(rng.uniform(0.05, 1.0), 2), bs, window, rng.randint(0, 3 * bs))
        configs.append((pattern, segs, rates, rng.randint(1, 3), rng.randint(1, 120), rng.randint(1, 7),
                        rng.randint(4, 32), rng.random() < 0.5))
    return configs


@pytest.mark.parametrize("config", fuzz_named(20, seed=3), ids=lambda c: f"{c[0]}-{list(c[1])}-{list(c[2])}-{c[3:]}")
def test_fuzz_named_patterns(config):
    pattern, segs, rates, b, n, h, d, is_causal = config
    q, k, v = leaves(b, n, h, d)
    layout = expected_layout(pattern, n, h, is_causal, segs, rates)
    assert_matches_reference("eager", q, k, v, pattern, layout, is_causal, segs=segs, rates=rates)


def test_scale_argument():
    q, k, v = leaves(2, 20, 3, 8)
    layout = expected_layout(GLOBAL, 20, 3, False)
    out = assert_matches_reference("eager", q, k, v, GLOBAL, layout, False, scale=0.7)
    assert (out - dilated_ops.block_sparse_attention(q, k, v, GLOBAL)).abs().max() > 1e-3


def test_lse_output():
    q, k, v = (x64(2, 30, 3, 8) for _ in range(3))
    out, lse = OP(q, k, v, *op_args(GLOBAL), True, None, None)
    assert lse.shape == (2, 30, 3) and lse.dtype == torch.float64
    torch.testing.assert_close(lse, reference_lse(q, k, expected_layout(GLOBAL, 30, 3, True), 4, True))
    _, lse32 = OP(q.float(), k.float(), v.float(), *op_args(GLOBAL), True, None, None)
    assert lse32.dtype == torch.float32


@pytest.mark.parametrize("case", PATTERN_CASES[:4] + [(MASK, (), ())],
                         ids=lambda c: f"{c[0].pattern_type}-bs{c[0].block_size}")
def test_float32_matches_reference(case):
    pattern, segs, rates = case
    b, n, h, d = 2, 45, 3, 16
    q64, k64, v64 = leaves(b, n, h, d)
    q, k, v = (t.detach().float().requires_grad_() for t in (q64, k64, v64))
    block_mask = torch.rand(h, nblocks(n, 4), nblocks(n, 4)) < 0.5 if pattern is MASK else None
    layout = block_mask if pattern is MASK else expected_layout(pattern, n, h, True, segs, rates)
    out = attend("eager", q, k, v, pattern, True, segs=segs, rates=rates, block_mask=block_mask)
    ref = block_sparse_reference(q64, k64, v64, layout, pattern.block_size, True)
    assert out.dtype == torch.float32 and out.shape == q.shape and out.is_contiguous()
    assert rel_err(out, ref) < 1e-5
    g = x64(b, n, h, d)
    got, want = grads(out, (q, k, v), g.float()), grads(ref, (q64, k64, v64), g)
    scale = torch.cat([w.flatten() for w in want]).norm()
    for got_i, want_i in zip(got, want):
        assert got_i.dtype == torch.float32
        assert rel_err(got_i, want_i, floor=0.1 * scale) < 1e-5


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 2e-2), (torch.float16, 4e-3)], ids=["bf16", "fp16"])
def test_half_dtypes_on_cpu(dtype, tol):
    q64, k64, v64 = (x64(2, 33, 3, 8).to(dtype).double().requires_grad_() for _ in range(3))
    q, k, v = (t.detach().to(dtype).requires_grad_() for t in (q64, k64, v64))
    out = dilated_ops.block_sparse_attention(q, k, v, LOCAL, is_causal=True)
    ref = block_sparse_reference(q64, k64, v64, expected_layout(LOCAL, 33, 3, True), 4, True)
    assert out.dtype == dtype and rel_err(out, ref) < tol
    g = x64(2, 33, 3, 8)
    for got_i, want_i in zip(grads(out, (q, k, v), g.to(dtype)), grads(ref, (q64, k64, v64), g)):
        assert got_i.dtype == dtype and rel_err(got_i, want_i) < 5 * tol


@pytest.mark.parametrize("path", ["eager", "op"])
def test_non_contiguous_inputs_not_modified_output_contiguous(path):
    b, n, h, d = 2, 27, 5, 8
    q, k, _ = x64(b, n, 3, h, d).unbind(2)  # slices of a fused projection
    v = x64(b, h, n, d).transpose(1, 2)  # (b, h, n, d) memory
    assert not q.is_contiguous() and not k.is_contiguous() and not v.is_contiguous()
    before = [t.clone() for t in (q, k, v)]
    for pattern, segs, rates, mask in ((GLOBAL, (), (), None), (DILATED, (8, 16), (1, 2), None),
                                       (MASK, (), (), torch.rand(h, 7, 7) < 0.5)):
        layout = mask if mask is not None else expected_layout(pattern, n, h, True, segs, rates)
        qq, kk, vv = (t.detach().requires_grad_() for t in (q, k, v))
        out = assert_matches_reference(path, qq, kk, vv, pattern, layout, True, segs=segs, rates=rates,
                                       block_mask=mask)
        assert out.is_contiguous() and out.shape == (b, n, h, d) and out.dtype == torch.float64
    for a, c in zip(before, (q, k, v)):
        assert torch.equal(a, c)


@pytest.mark.parametrize("layout", ["transposed", "expanded", "sliced"])
def test_non_contiguous_block_mask(layout):
    b, n, h, d = 2, 21, 3, 8  # 6 blocks of 4
    full = torch.rand(h, 6, 12) < 0.5
    block_mask = {"transposed": full[:, :, :6].transpose(1, 2),
                  "expanded": full[:1, :, :6].expand(h, 6, 6),
                  "sliced": full[:, :, ::2]}[layout]
    assert not block_mask.is_contiguous()
    q, k, v = leaves(b, n, h, d)
    for is_causal in (False, True):
        assert_matches_reference("eager", q, k, v, MASK, block_mask, is_causal, block_mask=block_mask)


def test_expanded_inputs_and_expanded_grad_out():
    q = x64(2, 18, 3, 8).requires_grad_()
    k = x64(1, 18, 3, 8).expand(2, 18, 3, 8).detach().requires_grad_()  # stride 0 over batch
    v = x64(2, 18, 3, 8).requires_grad_()
    out = dilated_ops.block_sparse_attention(q, k, v, LOCAL, is_causal=True)
    ref = block_sparse_reference(q, k, v, expected_layout(LOCAL, 18, 3, True), 4, True)
    assert (out - ref).abs().max() < 1e-10
    # out.sum() hands the backward an expanded (stride 0) gradient.
    for a, c in zip(torch.autograd.grad(out.sum(), (q, k, v)), torch.autograd.grad(ref.sum(), (q, k, v))):
        assert (a - c).abs().max() < 1e-10


def test_eager_fast_path_equals_op():
    # On plain tensors the function skips the custom-op dispatch: bitwise the op's results.
    q, k, v = (x64(3, 7, 29, 8).transpose(1, 2).requires_grad_() for _ in range(3))
    fast = dilated_ops.block_sparse_attention(q, k, v, GLOBAL, is_causal=True)
    slow, _ = OP(q, k, v, *op_args(GLOBAL), True, None, None)
    assert type(fast.grad_fn).__name__ == "_EagerBackward" and type(slow.grad_fn).__name__ != "_EagerBackward"
    assert torch.equal(fast, slow)
    with torch.no_grad():
        assert torch.equal(dilated_ops.block_sparse_attention(q, k, v, GLOBAL, is_causal=True), slow)
    g = x64(*fast.shape)
    for a, b in zip(grads(fast, (q, k, v), g), grads(slow, (q, k, v), g)):
        assert torch.equal(a, b)


# gradcheck and opcheck.

def test_gradcheck_reference():
    q, k, v = leaves(1, 7, 2, 3)
    layout = torch.tensor([[[1, 0, 1, 0], [0, 0, 0, 0], [1, 1, 0, 1], [0, 1, 0, 1]],
                           [[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1]]], dtype=torch.bool)
    for is_causal in (False, True):
        fn = lambda q, k, v: block_sparse_reference(q, k, v, layout, 2, is_causal)
        assert torch.autograd.gradcheck(fn, (q, k, v))


@pytest.mark.parametrize("path", ["eager", "op"])
@pytest.mark.parametrize("case", [(LOCAL, (), (), True, False), (DILATED, (8,), (2,), True, False),
                                  (MASK, (), (), False, True)], ids=["local", "dilated", "mask"])
def test_gradcheck_block_sparse_attention(case, path):
    # The mask case is not causal: a user's mask is planned on every call, and causal plans call
    # tril, which costs ~8 ms a call with torch 2.13's CPU thread pool at 2 threads (gradcheck
    # makes hundreds of calls); causal masks are compared with the reference above.
    pattern, segs, rates, is_causal, mask = case
    q, k, v = leaves(2, 11, 3, 4)
    block_mask = None
    if mask:
        block_mask = torch.rand(3, 3, 3) < 0.6
        block_mask[0, 1] = False  # an empty query block
    fn = lambda q, k, v: attend(path, q, k, v, pattern, is_causal, segs=segs, rates=rates, block_mask=block_mask)
    assert torch.autograd.gradcheck(fn, (q, k, v))


OPCHECK_CASES = [
    ((2, 16, 3, 8), LOCAL, (), (), False, None),
    ((1, 21, 5, 8), GLOBAL, (), (), True, None),
    ((3, 13, 2, 4), DILATED, (8, 16), (1, 2), True, None),
    ((2, 18, 3, 8), MASK, (), (), True, "per_head"),
    ((1, 9, 5, 4), MASK, (), (), False, "shared"),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("case", OPCHECK_CASES, ids=lambda c: f"{c[1].pattern_type}-c{c[4]:d}-{c[5]}")
def test_opcheck(case, dtype):
    shape, pattern, segs, rates, is_causal, mask = case
    q, k, v = (torch.randn(*shape, dtype=dtype).requires_grad_() for _ in range(3))
    nb = nblocks(shape[1], pattern.block_size)
    block_mask = None if mask is None else torch.rand(shape[2] if mask == "per_head" else 1, nb, nb) < 0.5
    torch.library.opcheck(OP, (q, k, v, *op_args(pattern, segs, rates), is_causal, None, block_mask))


@pytest.mark.parametrize("case", OPCHECK_CASES[1:4], ids=lambda c: f"{c[1].pattern_type}-c{c[4]:d}")
def test_opcheck_backward_op(case):
    shape, pattern, segs, rates, is_causal, mask = case
    q, k, v, g = (x64(*shape) for _ in range(4))
    nb = nblocks(shape[1], pattern.block_size)
    block_mask = None if mask is None else torch.rand(shape[2], nb, nb) < 0.5
    args = (*op_args(pattern, segs, rates), is_causal, 0.6, block_mask)
    out, lse = OP(q, k, v, *args)
    torch.library.opcheck(BACKWARD_OP, (g, q, k, v, out, lse, *args))
    # and it computes the reference's gradients
    qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
    layout = block_mask if mask else expected_layout(pattern, shape[1], shape[2], is_causal, segs, rates)
    ref = block_sparse_reference(qq, kk, vv, layout, pattern.block_size, is_causal, 0.6)
    for a, b in zip(BACKWARD_OP(g, q, k, v, out, lse, *args), grads(ref, (qq, kk, vv), g)):
        assert (a - b).abs().max() < 1e-10


# torch.compile and torch.export.

class Attn(torch.nn.Module):
    def __init__(self, pattern=LOCAL, is_causal=True):
        super().__init__()
        self.pattern, self.is_causal = pattern, is_causal

    def forward(self, q, k, v):
        return dilated_ops.block_sparse_attention(q, k, v, self.pattern, is_causal=self.is_causal)


def sparse_fn(q, k, v):
    return dilated_ops.block_sparse_attention(q, k, v, GLOBAL, is_causal=True) * 2


def op_graphs(graphs):
    return [g for g in graphs if any(n.target == OP for n in g.graph.nodes)]


def assert_compiled_matches_eager(compiled, eager, n, **kw):
    q, k, v = (torch.randn(2, n, 3, 8, requires_grad=True) for _ in range(3))
    want, got = eager(q, k, v, **kw), compiled(q, k, v, **kw)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    g = torch.randn_like(want)
    torch.testing.assert_close(grads(got, (q, k, v), g), grads(want, (q, k, v), g), rtol=1e-6, atol=1e-6)


@pytest.mark.usefixtures("reset_dynamo")
def test_compile_dynamic_fullgraph_aot_eager_one_graph():
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(sparse_fn, backend=counter, fullgraph=True, dynamic=True)
    frames = []
    for n in (40, 57, 23):
        assert_compiled_matches_eager(compiled, sparse_fn, n)
        frames.append(counter.frame_count)
    assert frames[0] == frames[1] == frames[2]  # no recompile for another length
    assert len(op_graphs(counter.graphs)) == 1


@pytest.mark.usefixtures("reset_dynamo")
def test_compile_dynamic_mask_pattern():
    def fn(q, k, v, block_mask):
        return dilated_ops.block_sparse_attention(q, k, v, MASK, is_causal=True, block_mask=block_mask)

    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(fn, backend=counter, fullgraph=True, dynamic=True)
    frames = []
    for n in (40, 57, 23):
        nb = nblocks(n, 4)
        assert_compiled_matches_eager(compiled, fn, n, block_mask=torch.rand(3, nb, nb) < 0.5)
        frames.append(counter.frame_count)
    assert frames[0] == frames[1] == frames[2]
    assert len(op_graphs(counter.graphs)) == 1


@pytest.mark.usefixtures("reset_dynamo")
def test_explain_one_graph_with_the_op():
    q, k, v = (torch.randn(2, 30, 3, 8) for _ in range(3))
    explanation = torch._dynamo.explain(sparse_fn)(q, k, v)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    assert OP in [n.target for g in explanation.graphs for n in g.graph.nodes]


@pytest.mark.usefixtures("reset_dynamo")
def test_compile_inductor():
    compiled = torch.compile(sparse_fn, backend="inductor", fullgraph=True, dynamic=True)
    for n in (40, 57):
        assert_compiled_matches_eager(compiled, sparse_fn, n)


def test_export_one_op_node_and_dynamic_seq():
    model = Attn(GLOBAL)
    args = tuple(torch.randn(2, 40, 3, 8) for _ in range(3))
    seq = torch.export.Dim("seq", min=2, max=1024)
    ep = torch.export.export(model, args, dynamic_shapes={"q": {1: seq}, "k": {1: seq}, "v": {1: seq}})
    calls = [n for n in ep.graph.nodes if n.op == "call_function"]
    assert [n.target for n in calls if n.target == OP] == [OP]
    assert not any("dilated" in str(n.target) and n.target != OP for n in calls)
    for n in (40, 61):
        args = tuple(torch.randn(2, n, 3, 8) for _ in range(3))
        torch.testing.assert_close(ep.module()(*args), model(*args))


def test_export_save_load_in_fresh_process(tmp_path):
    model = Attn(SparsePatternConfig("local_window", block_size=4, local_window_size=8))
    args = tuple(torch.randn(2, 35, 3, 8) for _ in range(3))
    ep = torch.export.export(model, args)
    assert run_saved_in_fresh_process(ep, args, model(*args), "dilated.block_sparse_attention.default", tmp_path) == 1


# The layout cache.

def test_layout_cache_reported_and_cleared():
    dilated_ops.clear_memory_pool()
    caches = dilated_ops.get_memory_pool_info()["caches"]
    assert CACHE_KEY in caches, sorted(caches)
    assert caches[CACHE_KEY]["entries"] == 0 and caches[CACHE_KEY]["tensor_bytes"] == 0

    def entries():
        return dilated_ops.get_memory_pool_info()["caches"][CACHE_KEY]

    q = torch.randn(1, 24, 3, 8)
    dilated_ops.block_sparse_attention(q, q, q, GLOBAL)
    assert entries()["entries"] == 1 and entries()["tensor_bytes"] > 0
    dilated_ops.block_sparse_attention(q, q, q, GLOBAL)  # the same call: served from the cache
    assert entries()["entries"] == 1
    dilated_ops.block_sparse_attention(q, q, q, GLOBAL, is_causal=True)
    q2 = torch.randn(1, 31, 3, 8)
    dilated_ops.block_sparse_attention(q2, q2, q2, GLOBAL)
    assert entries()["entries"] == 3
    dilated_ops.block_sparse_attention(q2, q2, q2, MASK, block_mask=torch.ones(1, 8, 8, dtype=torch.bool))
    assert entries()["entries"] == 3  # a user's mask is not cached
    assert dilated_ops.get_memory_pool_info()["total_buffers"] >= 3
    dilated_ops.clear_memory_pool()
    assert entries()["entries"] == 0 and entries()["tensor_bytes"] == 0
    # and it refills after a clear, with the same results
    out = dilated_ops.block_sparse_attention(q, q, q, GLOBAL)
    assert entries()["entries"] == 1
    assert torch.equal(out, dilated_ops.block_sparse_attention(q, q, q, GLOBAL))


# Validation errors.

def rand32(*shape):
    return torch.randn(*shape)


T = rand32(2, 16, 4, 8)  # nb = 4 with block_size 4


@pytest.mark.parametrize(
    "make,exc,message",
    [
        (lambda: SparsePatternConfig("banded"), ValueError, "pattern_type must be one of"),
        (lambda: SparsePatternConfig("banded"), ValueError, "got 'banded'"),
        (lambda: SparsePatternConfig(sparsity_ratio=0), ValueError, "sparsity_ratio must be in (0, 1]: got 0"),
        (lambda: SparsePatternConfig(sparsity_ratio=1.5), ValueError, "sparsity_ratio must be in (0, 1]: got 1.5"),
        (lambda: SparsePatternConfig(block_size=0), ValueError, "block_size must be a positive int: got 0"),
        (lambda: SparsePatternConfig(local_window_size=0), ValueError, "local_window_size must be a positive int: got 0"),
        (lambda: SparsePatternConfig(global_tokens=-1), ValueError, "global_tokens must be an int >= 0: got -1"),
        (lambda: OP(T, T, T, "banded", 4, 8, 0, 0.5, [], [], False, None, None), ValueError, "got 'banded'"),
        (lambda: OP(T, T, T, "local_window", 4, 8, 0, 0.0, [], [], False, None, None), ValueError,
         "sparsity_ratio must be in (0, 1]: got 0.0"),
        (lambda: OP(T, T, T, "local_window", 4, 8, 0, 1.5, [], [], False, None, None), ValueError,
         "sparsity_ratio must be in (0, 1]: got 1.5"),
        (lambda: OP(T, T, T, "local_window", 0, 8, 0, 0.5, [], [], False, None, None), ValueError,
         "block_size must be a positive int: got 0"),
        (lambda: dilated_ops.block_sparse_attention(T, T, T, MASK, block_mask=torch.ones(4, 4, 5, dtype=torch.bool)),
         ValueError, "block_mask must be a bool tensor of shape (4 or 1, 4, 4) for seq 16 and block_size 4: "
                     "got torch.bool of shape (4, 4, 5)"),
        (lambda: dilated_ops.block_sparse_attention(T, T, T, MASK, block_mask=torch.ones(3, 4, 4, dtype=torch.bool)),
         ValueError, "got torch.bool of shape (3, 4, 4)"),
        (lambda: dilated_ops.block_sparse_attention(T, T, T, MASK, block_mask=torch.ones(4, 4)),
         ValueError, "got torch.float32 of shape (4, 4)"),
        (lambda: dilated_ops.block_sparse_attention(T, T, T, MASK, block_mask=torch.ones(1, 4, 4)),
         ValueError, "block_mask must be a bool tensor"),
        (lambda: dilated_ops.block_sparse_attention(T, T, T, MASK), TypeError,
         "block_mask must be a bool torch.Tensor (heads or 1, nb, nb): got NoneType"),
        (lambda: OP(T, T, T, *op_args(MASK), False, None, None), TypeError, "block_mask must be a bool torch.Tensor"),
        (lambda: dilated_ops.block_sparse_attention(T, T, T, LOCAL, block_mask=torch.ones(1, 4, 4, dtype=torch.bool)),
         ValueError, "block_mask is only read with pattern 'mask': got pattern 'local_window'"),
        (lambda: dilated_ops.block_sparse_attention(T, rand32(2, 20, 4, 8), T, LOCAL), ValueError,
         "q (2, 16, 4, 8), k (2, 20, 4, 8), v (2, 16, 4, 8)"),
        (lambda: dilated_ops.block_sparse_attention(T, T, rand32(2, 16, 4, 4), LOCAL), ValueError,
         "v (2, 16, 4, 4)"),
        (lambda: dilated_ops.block_sparse_attention(T, T, T.double(), LOCAL), TypeError,
         "q, k and v must share one dtype"),
        (lambda: dilated_ops.block_sparse_attention(rand32(2, 16, 32), T, T, LOCAL), ValueError,
         "q must be 4-D (batch, seq, heads, head_dim): got shape (2, 16, 32)"),
        (lambda: dilated_ops.block_sparse_attention(T, T, T, "local_window"), TypeError,
         "pattern must be a SparsePatternConfig or None: got str"),
        (lambda: dilated_ops.block_sparse_attention(T, T, T, {"pattern_type": "mask"}), TypeError,
         "pattern must be a SparsePatternConfig or None: got dict"),
        (lambda: dilated_ops.block_sparse_attention(T, T, T, DILATED), ValueError,
         "segment_lengths must not be empty: got []"),
        (lambda: dilated_ops.block_sparse_attention(T, T, T, DILATED, segment_lengths=[8, 6], dilation_rates=[1, 4]),
         ValueError, "segment_lengths[1] (6) must be divisible by dilation_rates[1] (4)"),
        (lambda: dilated_ops.block_sparse_attention(T, T, T, LOCAL, scale="0.5"), TypeError,
         "scale must be a float or None: got '0.5'"),
    ],
)
def test_validation_errors(make, exc, message):
    with pytest.raises((ValueError, TypeError)) as info:
        make()
    assert info.type is exc
    assert message in str(info.value)


def test_forward_mode_ad_is_a_clear_error():
    import torch.autograd.forward_ad as fwAD

    q = rand32(1, 16, 2, 8)
    with fwAD.dual_level():
        dual = fwAD.make_dual(q, torch.randn_like(q))
        with pytest.raises(NotImplementedError, match="forward-mode AD"):
            dilated_ops.block_sparse_attention(dual, q, q, LOCAL)


def test_scale_is_causal_and_head_dim_checks_match_dilated_attention():
    """The checks of issue 18, item 4, for this variant too: numpy scales are taken, NaN and bool
    refused naming scale, is_causal must be a bool, head_dim 0 is a clear error."""
    import numpy as np

    q = torch.randn(1, 16, 2, 8, dtype=torch.float64)
    p = SparsePatternConfig("local_window", block_size=4, local_window_size=8)
    torch.testing.assert_close(dilated_ops.block_sparse_attention(q, q, q, p, scale=np.float32(0.5)),
                               dilated_ops.block_sparse_attention(q, q, q, p, scale=0.5))
    with pytest.raises(ValueError, match="scale must be a finite float or None: got nan"):
        dilated_ops.block_sparse_attention(q, q, q, p, scale=float("nan"))
    with pytest.raises(TypeError, match="scale must be a float or None: got True"):
        dilated_ops.block_sparse_attention(q, q, q, p, scale=True)
    with pytest.raises(TypeError, match="is_causal must be a bool: got 'False'"):
        dilated_ops.block_sparse_attention(q, q, q, p, is_causal="False")
    e = q[..., :0]
    with pytest.raises(ValueError, match=r"head_dim must be >= 1 for block_sparse_attention: got q of shape \(1, 16, 2, 0\)"):
        dilated_ops.block_sparse_attention(e, e, e, p)


def test_torch_func_grad_and_jacrev():
    """Issue 18, item 3, for this variant: torch.func through the function, named pattern and
    user mask."""
    q, k, v = (x64(1, 8, 2, 4) for _ in range(3))
    p = SparsePatternConfig("local_window", block_size=4, local_window_size=8)
    layout = block_sparse.pattern_layout("local_window", 8, 2, 4, 8, 64, 0.1, (), (), True, torch.device("cpu"))
    got = torch.func.grad(lambda x: dilated_ops.block_sparse_attention(x, k, v, p, is_causal=True).square().sum())(q)
    want = torch.func.grad(lambda x: block_sparse_reference(x, k, v, layout, 4, True).square().sum())(q)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    mask = torch.tensor([[[True, False], [True, True]]])
    cfg = SparsePatternConfig("mask", block_size=4)
    jac = torch.func.jacrev(lambda x: dilated_ops.block_sparse_attention(x, k, v, cfg, block_mask=mask))(q)
    jac_ref = torch.func.jacrev(lambda x: block_sparse_reference(x, k, v, mask, 4))(q)
    torch.testing.assert_close(jac, jac_ref, rtol=1e-10, atol=1e-10)


def test_torch_func_through_the_raw_op():
    """Issue 18, item 3: torch.func through torch.ops.dilated.block_sparse_attention itself, and
    forward-mode AD a clear error there (it dropped the tangent silently)."""
    import torch.autograd.forward_ad as fwAD

    q, k, v = (x64(2, 8, 3, 4) for _ in range(3))
    layout = block_sparse.pattern_layout("local_window", 8, 3, 4, 8, 64, 0.1, (), (), True, torch.device("cpu"))
    raw = lambda x: OP(x, k, v, "local_window", 4, 8, 64, 0.1, [], [], True)[0]  # noqa: E731
    ref = lambda x: block_sparse_reference(x, k, v, layout, 4, True)  # noqa: E731
    torch.testing.assert_close(torch.func.grad(lambda x: raw(x).square().sum())(q),
                               torch.func.grad(lambda x: ref(x).square().sum())(q), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(torch.func.jacrev(raw)(q), torch.func.jacrev(ref)(q), rtol=1e-10, atol=1e-10)
    with fwAD.dual_level():
        with pytest.raises(NotImplementedError, match=r"dilated_ops.block_sparse_attention: forward-mode AD .* "
                                                      r"\(reached torch.ops.dilated.block_sparse_attention\)"):
            raw(fwAD.make_dual(q, torch.randn_like(q)))
    with pytest.raises(NotImplementedError, match="dilated_ops.block_sparse_attention: double backward"):
        torch.func.grad(lambda x: torch.func.grad(lambda y: raw(y).square().sum())(x).sum())(q)
