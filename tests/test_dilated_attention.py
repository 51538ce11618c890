"""torch.ops.dilated.dilated_attention against the float64 reference, plus opcheck, gradcheck,
input handling and validation errors."""
import re

import pytest
import torch

import dilated_ops
from dilated_ops.kernels.reference import dilated_attention_reference
from dilated_ops.registrations.dilated_attention import dilated_attention_op

from conftest import random_configs
from models import rel_err

CONFIGS = random_configs(24, seed=7)


def rand(*shape, dtype=torch.float64):
    return torch.randn(*shape, dtype=dtype)


def grads(out, inputs, grad_out):
    return torch.autograd.grad(out, inputs, grad_out)


@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("mode", ["groups", "longnet"])
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"b{c[0]}n{c[1]}h{c[2]}d{c[3]}w{c[4]}r{c[5]}")
def test_matches_reference_float64(config, mode, is_causal):
    b, n, h, d, segs, rates = config
    if mode == "groups" and h < len(segs):
        pytest.skip("groups mode needs heads >= branches (tested as an error below)")
    q, k, v = (rand(b, n, h, d).requires_grad_() for _ in range(3))
    out = dilated_ops.dilated_attention(q, k, v, segs, rates, mode=mode, is_causal=is_causal)
    ref = dilated_attention_reference(q, k, v, segs, rates, mode=mode, is_causal=is_causal)
    assert (out - ref).abs().max() < 1e-10
    g = rand(b, n, h, d)
    for got, want in zip(grads(out, (q, k, v), g), grads(ref, (q, k, v), g)):
        assert (got - want).abs().max() < 1e-10



@pytest.mark.parametrize("mode", ["groups", "longnet"])
@pytest.mark.parametrize("config", CONFIGS[:8], ids=lambda c: f"b{c[0]}n{c[1]}h{c[2]}")
def test_matches_reference_float32(config, mode):
    b, n, h, d, segs, rates = config
    q64, k64, v64 = (rand(b, n, h, d).requires_grad_() for _ in range(3))
    q, k, v = (t.detach().float().requires_grad_() for t in (q64, k64, v64))
    out = dilated_ops.dilated_attention(q, k, v, segs, rates, mode=mode, is_causal=True)
    ref = dilated_attention_reference(q64, k64, v64, segs, rates, mode=mode, is_causal=True)
    assert out.dtype == torch.float32
    assert rel_err(out, ref) < 1e-5
    g = rand(b, n, h, d)
    got, want = grads(out, (q, k, v), g.float()), grads(ref, (q64, k64, v64), g)
    scale = torch.cat([w.flatten() for w in want]).norm()
    for got_i, want_i in zip(got, want):
        assert rel_err(got_i, want_i, floor=0.1 * scale) < 1e-5


@pytest.mark.parametrize("mode", ["groups", "longnet"])
def test_lse_output(mode):
    q, k, v = rand(2, 30, 4, 8), rand(2, 30, 4, 8), rand(2, 30, 4, 8)
    out, lse = torch.ops.dilated.dilated_attention(q, k, v, [8, 16], [1, 2], mode, False, None, 0.0, None)
    assert lse.shape == (2, 30, 4) and lse.dtype == torch.float64
    # One dense branch: lse is the row log-sum-exp of the scores.
    out1, lse1 = torch.ops.dilated.dilated_attention(q, k, v, [64], [1], mode)
    s = torch.einsum("bihd,bjhd->bhij", q, k) / 8**0.5
    torch.testing.assert_close(lse1, torch.logsumexp(s, -1).transpose(1, 2))
    # groups: unselected (position, head) pairs carry -inf; longnet: every head sees branch 0.
    if mode == "groups":
        assert torch.isinf(lse[:, 0::2, 2:]).all() and torch.isfinite(lse[:, 1::2, 2:]).all()
    else:
        assert torch.isfinite(lse).all()


def test_non_contiguous_and_expanded_inputs_and_no_mutation():
    b, n, h, d = 2, 40, 5, 8
    qkv = rand(b, n, 3, h, d)  # fused projection: q, k, v are strided slices
    q, k, v = qkv.unbind(2)
    assert not q.is_contiguous()
    vt = rand(b, h, n, d).transpose(1, 2)  # wrong memory order
    ke = rand(1, n, h, d).expand(b, n, h, d)  # stride 0 over batch
    inputs = [t.clone() for t in (q, ke, vt)]
    leaves = [t.requires_grad_() for t in (q.detach().clone(), ke.detach().clone(), vt.detach().clone())]
    for mode in ("groups", "longnet"):
        q_, k_, v_ = (t.detach().requires_grad_() for t in (q, ke, vt))
        out = dilated_ops.dilated_attention(q_, k_, v_, [8, 16], [1, 2], mode=mode, is_causal=True)
        ref = dilated_attention_reference(q, ke, vt, [8, 16], [1, 2], mode=mode, is_causal=True)
        assert (out - ref).abs().max() < 1e-10
        g = rand(b, n, h, d)
        got = grads(out, (q_, k_, v_), g)
        want = grads(dilated_attention_reference(*leaves, [8, 16], [1, 2], mode=mode, is_causal=True), leaves, g)
        for a, c in zip(got, want):
            assert (a - c).abs().max() < 1e-10
    for before, after in zip(inputs, (q, ke, vt)):
        assert torch.equal(before, after)


def test_grad_out_expanded():
    # out.sum() hands the backward an expanded (stride 0) gradient.
    q, k, v = (rand(1, 24, 3, 8).requires_grad_() for _ in range(3))
    dilated_ops.dilated_attention(q, k, v, [8], [2]).sum().backward()
    q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    dilated_attention_reference(q2, k2, v2, [8], [2]).sum().backward()
    for a, b in ((q, q2), (k, k2), (v, v2)):
        assert (a.grad - b.grad).abs().max() < 1e-10


@pytest.mark.parametrize("path", ["eager", "op"])
@pytest.mark.parametrize("mode", ["groups", "longnet"])
def test_gradcheck_op(mode, path):
    q, k, v = (rand(2, 13, 3, 4).requires_grad_() for _ in range(3))
    if path == "eager":  # dilated_ops.dilated_attention on plain tensors: the eager fast path
        fn = lambda q, k, v: dilated_ops.dilated_attention(q, k, v, [4, 8], [1, 2], mode=mode, is_causal=True)
    else:
        fn = lambda q, k, v: torch.ops.dilated.dilated_attention(q, k, v, [4, 8], [1, 2], mode, True)[0]
    assert torch.autograd.gradcheck(fn, (q, k, v))


@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
@pytest.mark.parametrize("mode", ["groups", "longnet"])
def test_eager_fast_path_equals_op(mode, dropout_p):
    # Eager calls on plain tensors skip the custom-op dispatch (an autograd.Function over the
    # same kernels, or the forward kernels alone without grad): results must be bitwise the op's.
    q, k, v = (rand(3, 7, 45, 8).transpose(1, 2).requires_grad_() for _ in range(3))  # non-contiguous
    segs, rates = [8, 16, 32], [1, 2, 4]
    torch.manual_seed(5)
    fast = dilated_ops.dilated_attention(q, k, v, segs, rates, mode=mode, dropout_p=dropout_p)
    assert type(fast.grad_fn).__name__ == "_EagerBackward"
    torch.manual_seed(5)
    seed = torch.randint(0, 2**62, (), dtype=torch.int64) if dropout_p else None
    slow, _ = dilated_attention_op(q, k, v, segs, rates, mode, False, None, dropout_p, seed)
    assert type(slow.grad_fn).__name__ != "_EagerBackward"
    assert torch.equal(fast, slow)
    with torch.no_grad():  # nothing to differentiate: the forward kernels are called directly
        torch.manual_seed(5)
        nograd = dilated_ops.dilated_attention(q, k, v, segs, rates, mode=mode, dropout_p=dropout_p)
    assert nograd.grad_fn is None and torch.equal(nograd, slow)
    g = rand(*fast.shape)
    for a, b in zip(grads(fast, (q, k, v), g), grads(slow, (q, k, v), g)):
        assert torch.equal(a, b)


def test_op_node_seen_under_dispatch_modes_and_compile():
    # Where ops are watched or traced the call must stay one dilated.dilated_attention op.
    from torch.utils._python_dispatch import TorchDispatchMode

    class Log(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    q, k, v = (rand(1, 32, 2, 8) for _ in range(3))
    with Log() as log:
        dilated_ops.dilated_attention(q, k, v, [8, 16], [1, 2])
    assert "dilated.dilated_attention.default" in log.ops
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm

    torch.compile(lambda q, k, v: dilated_ops.dilated_attention(q, k, v, [8, 16], [1, 2]), backend=backend,
                  fullgraph=True)(q, k, v)
    assert any(n.target is torch.ops.dilated.dilated_attention.default for n in graphs[0].graph.nodes)
    # torch.jit.trace records the op too (the kernels' Python would not trace: shapes are tensors)
    fn = lambda q, k, v: dilated_ops.dilated_attention(q, k, v, [8, 16], [1, 2])
    traced = torch.jit.trace(fn, (q, k, v), check_trace=False)
    assert "dilated::dilated_attention" in str(traced.graph)
    q2, k2, v2 = (rand(1, 32, 2, 8) for _ in range(3))
    assert torch.equal(traced(q2, k2, v2), fn(q2, k2, v2))


@pytest.mark.parametrize(
    "shape,segs,rates,mode,causal",
    [
        ((2, 16, 3, 8), [4, 8], [1, 2], "groups", False),
        ((1, 21, 5, 8), [4, 8, 16], [1, 2, 4], "longnet", True),
        ((3, 7, 2, 16), [16], [2], "groups", True),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck(shape, segs, rates, mode, causal, dtype):
    q, k, v = (rand(*shape, dtype=dtype).requires_grad_() for _ in range(3))
    torch.library.opcheck(dilated_attention_op, (q, k, v, segs, rates, mode, causal, None, 0.0, None))


@pytest.mark.parametrize("mode", ["groups", "longnet"])
def test_output_follows_q_memory_order_and_opcheck(mode):
    # q as a (batch, seq, heads, head_dim) view of (seq, batch, heads, head_dim) memory, as in
    # nn.MultiheadAttention(batch_first=False): out has the same memory order (as SDPA's does),
    # the fake kernel agrees (opcheck), and the values match the reference.
    q, k, v = (rand(21, 3, 5, 8).transpose(0, 1) for _ in range(3))
    out, _ = dilated_attention_op(q, k, v, [4, 8], [1, 2], mode, False, None, 0.0, None)
    assert out.stride() == torch.empty_like(q).stride() == q.stride()
    ref = dilated_attention_reference(q.double(), k.double(), v.double(), [4, 8], [1, 2], mode)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    torch.library.opcheck(dilated_attention_op, (q, k, v, [4, 8], [1, 2], mode, False, None, 0.0, None))


def test_opcheck_backward_op():
    q, k, v, g = (rand(2, 16, 3, 8) for _ in range(4))
    out, lse = dilated_attention_op(q, k, v, [4, 8], [1, 2], "longnet", True, None, 0.0, None)
    torch.library.opcheck(
        torch.ops.dilated.dilated_attention_backward.default,
        (g, q, k, v, out, lse, [4, 8], [1, 2], "longnet", True, None, 0.0, None),
    )


def test_scale_argument():
    q, k, v = rand(1, 16, 2, 8), rand(1, 16, 2, 8), rand(1, 16, 2, 8)
    out = dilated_ops.dilated_attention(q, k, v, [8], [1], scale=0.7)
    ref = dilated_attention_reference(q, k, v, [8], [1], scale=0.7)
    assert (out - ref).abs().max() < 1e-10
    assert (out - dilated_ops.dilated_attention(q, k, v, [8], [1])).abs().max() > 1e-3


class TestDropout:
    def test_repeatable_under_manual_seed_and_differs_from_no_dropout(self):
        q, k, v = rand(2, 32, 3, 8), rand(2, 32, 3, 8), rand(2, 32, 3, 8)
        torch.manual_seed(5)
        a = dilated_ops.dilated_attention(q, k, v, [8, 16], [1, 2], dropout_p=0.3)
        torch.manual_seed(5)
        b = dilated_ops.dilated_attention(q, k, v, [8, 16], [1, 2], dropout_p=0.3)
        c = dilated_ops.dilated_attention(q, k, v, [8, 16], [1, 2], dropout_p=0.3)
        nodrop = dilated_ops.dilated_attention(q, k, v, [8, 16], [1, 2])
        assert torch.equal(a, b)
        assert not torch.equal(a, c)
        assert (a - nodrop).abs().max() > 1e-3

    def test_unbiased(self):
        # E[dropout(P)] = P, so the mean over many masks approaches the dropout-free output.
        q, k, v = rand(1, 16, 2, 4), rand(1, 16, 2, 4), rand(1, 16, 2, 4)
        runs = torch.stack([dilated_ops.dilated_attention(q, k, v, [16], [1], dropout_p=0.2) for _ in range(2000)])
        nodrop = dilated_ops.dilated_attention(q, k, v, [16], [1])
        assert (runs.mean(0) - nodrop).abs().max() < 0.1
        assert (runs.std(0).mean()) > 0.05

    @pytest.mark.parametrize("mode", ["groups", "longnet"])
    def test_gradcheck_with_fixed_seed(self, mode):
        q, k, v = (rand(1, 12, 3, 4).requires_grad_() for _ in range(3))
        seed = torch.tensor(1234)
        fn = lambda q, k, v: dilated_attention_op(q, k, v, [4, 8], [1, 2], mode, True, None, 0.25, seed)[0]
        assert torch.autograd.gradcheck(fn, (q, k, v))


def err(fn):
    with pytest.raises((ValueError, TypeError)) as info:
        fn()
    return info


def call(q=None, k=None, v=None, segs=(8, 16), rates=(1, 2), **kw):
    t = rand(2, 16, 4, 8)
    return lambda: dilated_ops.dilated_attention(
        t if q is None else q, t if k is None else k, t if v is None else v, list(segs) if isinstance(segs, tuple) else segs, list(rates) if isinstance(rates, tuple) else rates, **kw
    )


@pytest.mark.parametrize(
    "kwargs,exc,message",
    [
        (dict(segs=(8, 16, 32)), ValueError, "segment_lengths and dilation_rates must have same length: got 3 and 2"),
        (dict(segs=(8, 6), rates=(1, 4)), ValueError, "segment_lengths[1] (6) must be divisible by dilation_rates[1] (4)"),
        (dict(segs=(0, 16)), ValueError, "segment_lengths must be positive: got [0, 16]"),
        (dict(rates=(1, -2)), ValueError, "dilation_rates must be positive: got [1, -2]"),
        (dict(segs=[], rates=[]), ValueError, "segment_lengths must not be empty: got []"),
        (dict(segs=(8.0, 16)), TypeError, "segment_lengths must be a list of positive ints: got [8.0, 16]"),
        (dict(segs=(4, 8, 16, 32, 64), rates=(1, 1, 1, 1, 1)), ValueError, "num_heads (4) must be >= number of segment groups (5)"),
        (dict(mode="dense"), ValueError, "mode must be 'groups' or 'longnet': got 'dense'"),
        (dict(dropout_p=1.0), ValueError, "dropout_p must be in [0, 1): got 1.0"),
        (dict(backend="flash"), ValueError, "backend must be 'auto' or 'sdpa': got 'flash'"),
        (dict(q=rand(2, 16, 32)), ValueError, "q must be 4-D (batch, seq, heads, head_dim): got shape (2, 16, 32)"),
        (dict(k=rand(2, 16, 4, 8).long()), TypeError, "k must be float16, bfloat16, float32 or float64: got torch.int64"),
        (dict(v=rand(2, 16, 4, 8, dtype=torch.float32)), TypeError, "q, k and v must share one dtype"),
        (dict(k=rand(2, 20, 4, 8)), ValueError, "q (2, 16, 4, 8), k (2, 20, 4, 8)"),
    ],
)
def test_validation_errors(kwargs, exc, message):
    info = err(call(**kwargs))
    assert info.type is exc
    assert message in str(info.value)


def test_longnet_allows_fewer_heads_than_branches():
    q = rand(1, 16, 2, 8)
    out = dilated_ops.dilated_attention(q, q, q, [4, 8, 16], [1, 2, 4], mode="longnet")
    assert (out - dilated_attention_reference(q, q, q, [4, 8, 16], [1, 2, 4], mode="longnet")).abs().max() < 1e-10


@pytest.mark.parametrize("is_causal", [False, True])
def test_groups_forward_writes_every_element_from_poisoned_memory(monkeypatch, is_causal):
    # The groups forward (SDPA path here; the Triton path in test_cuda.py) writes every element
    # of out and lse (fill, then each branch's positions): hand it NaN-poisoned buffers.
    from dilated_ops.kernels import dilated

    real_empty = torch.empty
    monkeypatch.setattr(dilated, "empty_output", lambda q: torch.full_like(q, float("nan")))
    monkeypatch.setattr(dilated.torch, "empty", lambda *a, **kw: real_empty(*a, **kw).fill_(float("nan")))
    q, k, v = (torch.randn(2, 700, 7, 16, dtype=torch.float64) for _ in range(3))
    segs, rates = [128, 512, 256], [1, 4, 1]  # rate-1 groups on both sides of a rate-4 one
    out, lse = dilated.dilated_attention_forward(q, k, v, segs, rates, is_causal=is_causal)
    monkeypatch.undo()
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    ref = dilated_attention_reference(q, k, v, segs, rates, is_causal=is_causal)
    assert (out - ref).abs().max() < 1e-10


def test_forward_mode_ad_is_a_clear_error():
    # No forward-mode formula: the registered op would drop the tangent silently, so the
    # function refuses dual inputs.
    import torch.autograd.forward_ad as fwAD

    q, k, v = (rand(1, 32, 2, 8) for _ in range(3))
    with fwAD.dual_level():
        dual = fwAD.make_dual(q, torch.randn_like(q))
        with pytest.raises(NotImplementedError, match="forward-mode AD"):
            dilated_ops.dilated_attention(dual, k, v, [8, 16], [1, 2])
        # without tangents inside a dual level it still runs
        assert torch.equal(dilated_ops.dilated_attention(q, k, v, [8, 16], [1, 2]),
                           dilated_ops.dilated_attention(q.clone(), k, v, [8, 16], [1, 2]))


@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("mode", ["groups", "longnet"])
@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 2e-2), (torch.float16, 4e-3)], ids=["bf16", "fp16"])
def test_half_precision_on_cpu_forward_and_backward(dtype, tol, mode, is_causal):
    """Issue 18, item 1: the CPU backward of float16/bfloat16 inputs crashed (the CPU kernel's
    backward takes the log-sum-exp in float32); now within the dtype's tolerance of float64."""
    q, k, v = (rand(2, 37, 3, 16).to(dtype).requires_grad_() for _ in range(3))
    out = dilated_ops.dilated_attention(q, k, v, [8, 16], [1, 2], mode=mode, is_causal=is_causal)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    ref_in = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = dilated_attention_reference(*ref_in, [8, 16], [1, 2], mode=mode, is_causal=is_causal)
    want = torch.autograd.grad(ref, ref_in, g.double())
    assert out.dtype == dtype and rel_err(out, ref) < tol
    for got_i, want_i in zip(grads, want):
        assert got_i.dtype == dtype and rel_err(got_i, want_i) < 2 * tol


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scale", [-0.5, 0.0, 0.3])
@pytest.mark.parametrize("mode", ["groups", "longnet"])
def test_causal_any_scale_sign_on_cpu(mode, scale, dtype):
    """Issue 18, item 2: causal attention with scale <= 0 gave NaN rows on the CPU (PyTorch's CPU
    kernel does); such calls take the explicit path, forward and backward."""
    q, k, v = (rand(2, 20, 3, 8).to(dtype).requires_grad_() for _ in range(3))
    out = dilated_ops.dilated_attention(q, k, v, [4, 8], [1, 2], mode=mode, is_causal=True, scale=scale)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    ref_in = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = dilated_attention_reference(*ref_in, [4, 8], [1, 2], mode=mode, is_causal=True, scale=scale)
    want = torch.autograd.grad(ref, ref_in, g.double())
    tol = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    assert not out.isnan().any() and rel_err(out, ref) < tol
    for got_i, want_i in zip(grads, want):
        assert not got_i.isnan().any() and rel_err(got_i, want_i, floor=0.1) < 2 * tol


def test_autocast_bfloat16_training_step_of_the_multihead_module():
    """Issue 18's acceptance: a training step under torch.autocast("cpu", torch.bfloat16) runs,
    and its parameter gradients are those of float32 within bfloat16's tolerance."""
    torch.manual_seed(0)
    m = dilated_ops.MultiheadDilatedAttention(32, 4, [1, 2], [8, 16])
    x = torch.randn(2, 40, 32)
    m(x, x, x, is_causal=True)[0].square().mean().backward()
    want = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(x, x, x, is_causal=True)[0]
    assert out.dtype == torch.bfloat16
    out.float().square().mean().backward()
    # k_proj.bias has an exact gradient of 0 (the softmax ignores a constant per query): the
    # floor, a fraction of the largest gradient, keeps its rounding noise from counting.
    floor = 0.01 * max(g.norm() for g in want.values())
    for name, p in m.named_parameters():
        assert torch.isfinite(p.grad).all() and rel_err(p.grad, want[name], floor=floor) < 5e-2, name


# --- issue 18, item 4: argument edge cases, one answer from the function and the op ----------

OP = torch.ops.dilated.dilated_attention


@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("mode", ["groups", "longnet"])
def test_head_dim_zero_is_the_empty_attention_of_sdpa(mode, is_causal):
    """As F.scaled_dot_product_attention: q of head_dim 0 gives an empty output of q's shape and
    empty gradients; the lse is that of all-zero scores (log of the number of keys seen)."""
    import torch.nn.functional as F

    q, k, v = (rand(2, 20, 4, 0).requires_grad_() for _ in range(3))
    out = dilated_ops.dilated_attention(q, k, v, [8, 16], [1, 2], mode=mode, is_causal=is_causal)
    sdpa = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), is_causal=is_causal)
    assert out.shape == q.shape == sdpa.transpose(1, 2).shape and out.dtype == q.dtype
    torch.testing.assert_close(out, sdpa.transpose(1, 2))
    for t, g in zip((q, k, v), torch.autograd.grad(out.sum(), (q, k, v))):
        assert g.shape == t.shape
    out_op, lse = OP(q, k, v, [8, 16], [1, 2], mode, is_causal)
    z = torch.zeros(2, 20, 4, 1, dtype=torch.float64)
    _, lse_zero_scores = OP(z, z, z, [8, 16], [1, 2], mode, is_causal)
    assert out_op.shape == q.shape
    torch.testing.assert_close(lse, lse_zero_scores)
    torch.library.opcheck(OP.default, (q, k, v, [4, 8], [1, 2], mode, is_causal, None, 0.0, None))


def call_both(**kw):
    """The function and the op on one valid input (the same on every call), ``kw`` overriding
    their arguments."""
    t = torch.randn(2, 16, 4, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    a = dict(segment_lengths=[8, 16], dilation_rates=[1, 2], mode="groups", is_causal=False, scale=None)
    a.update(kw)
    fn = lambda: dilated_ops.dilated_attention(t, t, t, a["segment_lengths"], a["dilation_rates"], mode=a["mode"],
                                               is_causal=a["is_causal"], scale=a["scale"])
    op = lambda: OP(t, t, t, a["segment_lengths"], a["dilation_rates"], a["mode"], a["is_causal"], a["scale"])[0]
    return fn, op


@pytest.mark.parametrize("value, shown", [("False", "'False'"), (None, "None"), (1, "1"), (0, "0")])
def test_is_causal_must_be_a_bool(value, shown):
    fn, op = call_both(is_causal=value)
    with pytest.raises(TypeError) as info:
        fn()
    assert str(info.value) == f"is_causal must be a bool: got {shown}"


def test_is_causal_string_given_to_the_op_is_refused_naming_it():
    # The op's schema parses is_causal before any Python runs: its own error names the
    # argument and the value (None and ints it converts, as it does for torch.ops.aten ops).
    _, op = call_both(is_causal="False")
    with pytest.raises(RuntimeError, match="argument 'is_causal'.*\n.*\nValue: 'False'"):
        op()


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_scale_must_be_finite(value):
    for run in call_both(scale=value):
        with pytest.raises(ValueError) as info:
            run()
        assert str(info.value) == f"scale must be a finite float or None: got {value!r}"


def test_scale_bool_is_refused():
    fn, _ = call_both(scale=True)
    with pytest.raises(TypeError, match=r"^scale must be a float or None: got True$"):
        fn()


def test_numpy_scale_scalars_are_accepted_as_floats():
    np = pytest.importorskip("numpy")
    fn, op = call_both(scale=0.5)
    want = fn()
    for value in (np.float32(0.5), np.float64(0.5), np.float16(0.5)):
        for run in call_both(scale=value):
            torch.testing.assert_close(run(), want, rtol=0, atol=0)
    torch.testing.assert_close(call_both(scale=1)[0](), call_both(scale=1.0)[0](), rtol=0, atol=0)


def test_numpy_integer_segments_are_accepted_by_function_and_op():
    np = pytest.importorskip("numpy")
    want = call_both()[0]()
    for segs, rates in (
        ([np.int64(8), 16], [1, np.int32(2)]),
        (np.array([8, 16]), (np.uint8(1), np.int16(2))),
    ):
        for run in call_both(segment_lengths=segs, dilation_rates=rates):
            torch.testing.assert_close(run(), want, rtol=0, atol=0)


@pytest.mark.parametrize("segs, rates, name, shown", [
    ([True, 16], [1, 2], "segment_lengths", "[True, 16]"),
    ([8, 16], [1, False], "dilation_rates", "[1, False]"),
    ([8, 16.0], [1, 2], "segment_lengths", "[8, 16.0]"),
])
def test_bools_and_floats_are_not_segment_ints(segs, rates, name, shown):
    fn, _ = call_both(segment_lengths=segs, dilation_rates=rates)
    with pytest.raises(TypeError) as info:
        fn()
    assert str(info.value) == f"{name} must be a list of positive ints: got {shown}"


@pytest.mark.parametrize("w", [2**62, 2**31, 2**63 - 1])
def test_too_long_segment_is_a_clear_error_in_function_op_and_fake_kernel(w):
    from torch._subclasses.fake_tensor import FakeTensorMode

    message = f"segment_lengths[1] ({w}) is too large: at most 2**31 - 1 (2147483647)"
    for run in call_both(segment_lengths=[8, w], dilation_rates=[1, 1]):
        with pytest.raises(ValueError) as info:
            run()
        assert str(info.value) == message
    with FakeTensorMode():
        t = torch.empty(2, 16, 4, 8)
        with pytest.raises(ValueError) as info:
            OP(t, t, t, [8, w], [1, 1])
    assert str(info.value) == message
    # The largest allowed length still runs (one partial segment).
    q = rand(1, 16, 2, 8)
    ref = dilated_attention_reference(q, q, q, [16], [1])
    assert (dilated_ops.dilated_attention(q, q, q, [2**31 - 1], [1]) - ref).abs().max() < 1e-10


@pytest.mark.parametrize("seed, exc, message", [
    (torch.tensor([1, 2]), ValueError, "dropout_seed must be a one-element int64 tensor: got shape (2,)"),
    (torch.tensor(1.5), TypeError, "dropout_seed must be a one-element int64 tensor: got torch.float32 of shape ()"),
    (torch.tensor([3], dtype=torch.int32), TypeError,
     "dropout_seed must be a one-element int64 tensor: got torch.int32 of shape (1,)"),
])
@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
def test_dropout_seed_of_the_wrong_shape_or_dtype(seed, exc, message, dropout_p):
    q = rand(1, 12, 3, 4)
    with pytest.raises(exc) as info:
        OP(q, q, q, [4, 8], [1, 2], "groups", False, None, dropout_p, seed)
    assert str(info.value) == message
    if dropout_p:  # the backward op reads it too
        out, lse = OP(q, q, q, [4, 8], [1, 2], "groups", False, None, dropout_p, torch.tensor(7))
        with pytest.raises(exc) as info:
            torch.ops.dilated.dilated_attention_backward(q, q, q, q, out, lse, [4, 8], [1, 2], "groups", False,
                                                         None, dropout_p, seed)
        assert str(info.value) == message
    # A one-element int64 seed of any shape is fine.
    OP(q, q, q, [4, 8], [1, 2], "groups", False, None, dropout_p, torch.tensor([[5]]))


def _transform_cases():
    q, k, v = (rand(2, 16, 3, 8) for _ in range(3))
    ours = lambda q: dilated_ops.dilated_attention(q, k, v, [4, 8], [1, 2], is_causal=True)  # noqa: E731
    ref = lambda q: dilated_attention_reference(q, k, v, [4, 8], [1, 2], is_causal=True)  # noqa: E731
    return q, ours, ref


def test_torch_func_grad_vjp_jacrev_vmap():
    """Issue 18, item 3: torch.func transforms through the function (they failed with PyTorch's
    "must override setup_context")."""
    q, ours, ref = _transform_cases()
    torch.testing.assert_close(torch.func.grad(lambda q: ours(q).square().sum())(q),
                               torch.func.grad(lambda q: ref(q).square().sum())(q), rtol=1e-10, atol=1e-10)
    out, pullback = torch.func.vjp(ours, q)
    out_ref, pullback_ref = torch.func.vjp(ref, q)
    g = torch.randn_like(out)
    torch.testing.assert_close(pullback(g)[0], pullback_ref(g)[0], rtol=1e-10, atol=1e-10)
    small = q[:1, :8, :2, :4]
    jac = torch.func.jacrev(lambda x: dilated_ops.dilated_attention(x, x, x, [4, 8], [1, 2]))(small)
    jac_ref = torch.func.jacrev(lambda x: dilated_attention_reference(x, x, x, [4, 8], [1, 2]))(small)
    torch.testing.assert_close(jac, jac_ref, rtol=1e-10, atol=1e-10)
    batch = torch.stack([q, 2 * q])  # vmap over a leading dim: each slice as its own call
    torch.testing.assert_close(torch.func.vmap(ours)(batch), torch.stack([ours(q), ours(2 * q)]))


def test_torch_func_parameter_gradients_of_a_module():
    m = dilated_ops.MultiheadDilatedAttention(16, 2, [1, 2], [4, 8], dtype=torch.float64)
    x = rand(2, 12, 16)
    grads = torch.func.grad(lambda p: torch.func.functional_call(m, p, (x, x, x))[0].square().sum())(
        dict(m.named_parameters()))
    m(x, x, x)[0].square().sum().backward()
    for name, p in m.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-10, atol=1e-10)


def test_torch_func_through_the_raw_op():
    """Issue 18, item 3, for ``torch.ops.dilated.dilated_attention`` itself: grad, vjp, jacrev and
    vmap over grad failed with PyTorch's "must override setup_context" (the node torch.library
    generates); forward-mode AD dropped the tangent silently."""
    q, k, v = (rand(2, 16, 3, 8) for _ in range(3))
    ours = lambda q: OP(q, k, v, [4, 8], [1, 2], "longnet", True)[0]  # noqa: E731
    ref = lambda q: dilated_attention_reference(q, k, v, [4, 8], [1, 2], "longnet", is_causal=True)  # noqa: E731
    torch.testing.assert_close(torch.func.grad(lambda q: ours(q).square().sum())(q),
                               torch.func.grad(lambda q: ref(q).square().sum())(q), rtol=1e-10, atol=1e-10)
    out, pullback = torch.func.vjp(ours, q)
    g = torch.randn_like(out)
    torch.testing.assert_close(pullback(g)[0], torch.func.vjp(ref, q)[1](g)[0], rtol=1e-10, atol=1e-10)
    small = q[:1, :8, :2, :4]
    raw = lambda x: OP(x, x, x, [4, 8], [1, 2])[0]  # noqa: E731
    torch.testing.assert_close(torch.func.jacrev(raw)(small),
                               torch.func.jacrev(lambda x: dilated_attention_reference(x, x, x, [4, 8], [1, 2]))(small),
                               rtol=1e-10, atol=1e-10)
    batch = torch.stack([q, 2 * q])
    per_sample = torch.func.vmap(torch.func.grad(lambda q: ours(q).square().sum()))(batch)
    torch.testing.assert_close(per_sample, torch.stack([torch.func.grad(lambda q: ref(q).square().sum())(x)
                                                        for x in batch]), rtol=1e-10, atol=1e-10)
    # plain autograd through the raw op is unchanged
    leaf = q.clone().requires_grad_()
    ours(leaf).square().sum().backward()
    torch.testing.assert_close(leaf.grad, torch.func.grad(lambda q: ref(q).square().sum())(q), rtol=1e-10, atol=1e-10)


def test_raw_op_forward_mode_and_double_backward_are_clear_errors():
    import torch.autograd.forward_ad as fwAD

    q, k, v = (rand(1, 16, 2, 8) for _ in range(3))
    raw = lambda x: OP(x, k, v, [4, 8], [1, 2])[0]  # noqa: E731
    with fwAD.dual_level():
        with pytest.raises(NotImplementedError, match=r"forward-mode AD .* \(reached torch.ops.dilated.dilated_attention\)"):
            raw(fwAD.make_dual(q, torch.randn_like(q)))
    for transform in (torch.func.jacfwd, torch.func.hessian):
        with pytest.raises(NotImplementedError, match="forward-mode AD"):
            transform(lambda x: raw(x).sum())(q)
    # nested grad: each level records its own node of the op, so the outer one refuses (it
    # returned zeros before the lower levels kept grad mode on)
    with pytest.raises(NotImplementedError, match="dilated_ops.dilated_attention: double backward"):
        torch.func.grad(lambda x: torch.func.grad(lambda y: raw(y).square().sum())(x).sum())(q)
    leaf = q.clone().requires_grad_()
    (g,) = torch.autograd.grad(raw(leaf).square().sum(), leaf, create_graph=True)
    with pytest.raises(NotImplementedError, match="dilated_ops.dilated_attention: double backward"):
        g.sum().backward()


def test_torch_func_forward_mode_and_double_backward_are_clear_errors():
    q, ours, _ = _transform_cases()
    for transform in (torch.func.jacfwd, torch.func.hessian):
        with pytest.raises(NotImplementedError, match="forward-mode AD"):
            transform(lambda x: ours(x).sum())(q)
    with pytest.raises(NotImplementedError, match="dilated_ops.dilated_attention: double backward"):
        torch.func.grad(lambda x: torch.func.grad(lambda y: ours(y).sum())(x).sum())(q)


@pytest.mark.parametrize("mode", ["groups", "longnet"])
def test_op_head_window_is_the_slice_of_the_whole_call(mode):
    """Issue 20: the op's head window (head_start, total_heads), as a rank holding heads [a, b)
    of an h-head call runs it: output and q/k/v gradients equal the whole call's heads [a, b)
    (float64), through the op's autograd; opcheck with the window."""
    h, segs, rates = 5, [4, 8], [1, 2]
    q, k, v = (rand(2, 24, h, 8).requires_grad_() for _ in range(3))
    out = OP(q, k, v, segs, rates, mode, True)[0]
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    a, b = 1, 4
    parts = [t.detach()[:, :, a:b].clone().requires_grad_() for t in (q, k, v)]
    part_out = OP(*parts, segs, rates, mode, True, None, 0.0, None, "auto", a, h)[0]
    torch.testing.assert_close(part_out, out[:, :, a:b], rtol=1e-12, atol=1e-12)
    for got, want in zip(torch.autograd.grad(part_out, parts, g[:, :, a:b]), grads):
        torch.testing.assert_close(got, want[:, :, a:b], rtol=1e-12, atol=1e-12)
    torch.library.opcheck(OP.default, (*parts, segs, rates, mode, True, None, 0.0, None, "auto", a, h))


@pytest.mark.parametrize("head_start,total_heads,message", [
    (-1, 5, "head_start must be an int >= 0: got -1"),
    (2, 0, "head_start (2) needs total_heads (the call's head count): got total_heads=0"),
    (3, 5, "heads [3, 6) of q are not inside total_heads (5)"),
])
def test_op_head_window_errors(head_start, total_heads, message):
    q = rand(1, 8, 3, 4)
    with pytest.raises(ValueError, match=re.escape(message)):
        OP(q, q, q, [4, 8], [1, 2], "groups", False, None, 0.0, None, "auto", head_start, total_heads)
