"""SPEC section 8 in the block-sparse op (issue 21): grouped-query attention and key padding
against the float64 reference, forward and backward, through the function, the op and the
module; gradcheck, opcheck, compile (dynamic) and export with the new argument; errors."""
import pytest
import torch

import dilated_ops
from dilated_ops import SparsePatternConfig
from dilated_ops.kernels import block_sparse
from dilated_ops.kernels.reference import block_sparse_reference

from models import x64

OP = torch.ops.dilated.block_sparse_attention.default
LOCAL = SparsePatternConfig("local_window", block_size=4, local_window_size=12)
GLOBAL = SparsePatternConfig("global_local", block_size=4, local_window_size=8, global_tokens=8)
DILATED = SparsePatternConfig("dilated_sparse", block_size=4)
SEGS, RATES = (8, 16), (1, 2)


def layout_of(pattern, n, h, is_causal):
    return block_sparse.pattern_layout(pattern.pattern_type, n, h, pattern.block_size, pattern.local_window_size,
                                       pattern.global_tokens, float(pattern.sparsity_ratio), SEGS, RATES,
                                       is_causal, torch.device("cpu"))


def padding(b, n, empty_row=None, p=0.35):
    keep = torch.rand(b, n) > p
    if empty_row is not None:
        keep[empty_row] = False
    return keep


def check(q, k, v, pattern, is_causal, kpm, tol=1e-10, path="function"):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    if path == "function":
        out = dilated_ops.block_sparse_attention(*leaves, pattern, is_causal=is_causal, segment_lengths=SEGS,
                                                 dilation_rates=RATES, key_padding_mask=kpm)
    else:
        out = OP(*leaves, pattern.pattern_type, pattern.block_size, pattern.local_window_size, pattern.global_tokens,
                 float(pattern.sparsity_ratio), list(SEGS), list(RATES), is_causal, None, None, kpm)[0]
    g = x64(*q.shape)
    got = torch.autograd.grad(out, leaves, g)
    ref_in = [t.detach().double().requires_grad_() for t in (q, k, v)]
    layout = layout_of(pattern, q.shape[1], q.shape[2], is_causal)
    ref = block_sparse_reference(*ref_in, layout, pattern.block_size, is_causal, key_padding_mask=kpm)
    want = torch.autograd.grad(ref, ref_in, g)
    for name, x, y in (("out", out, ref), *zip(("dq", "dk", "dv"), got, want)):
        assert not x.isnan().any(), name
        torch.testing.assert_close(x.double(), y, rtol=tol, atol=tol, msg=name)
    return out, got


@pytest.mark.parametrize("path", ["function", "op"])
@pytest.mark.parametrize("masked", [False, True], ids=["no-mask", "padding"])
@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("pattern", [LOCAL, GLOBAL, DILATED], ids=lambda p: p.pattern_type)
@pytest.mark.parametrize("h,h_kv", [(4, 4), (4, 2), (4, 1), (6, 3), (5, 1)])
def test_gqa_and_padding_match_the_reference(h, h_kv, pattern, is_causal, masked, path):
    """GQA ratios 1, 2, 4, heads_kv = 1, odd head counts; batch 3 with a fully padded row; a
    partial last block (n = 30)."""
    torch.manual_seed(h * 7 + h_kv)
    b, n = 3, 30
    q, k, v = x64(b, n, h, 8), x64(b, n, h_kv, 8), x64(b, n, h_kv, 8)
    kpm = padding(b, n, empty_row=1) if masked else None
    out, grads = check(q, k, v, pattern, is_causal, kpm, path=path)
    assert grads[1].shape == k.shape and grads[2].shape == v.shape
    if masked:
        assert out[1].abs().max() == 0 and all(g[1].abs().max() == 0 for g in grads)


def test_left_padding_with_causal_gives_zero_to_queries_that_see_nothing():
    kpm = torch.ones(2, 24, dtype=torch.bool)
    kpm[0, :6] = False
    q, k, v = x64(2, 24, 4, 8), x64(2, 24, 2, 8), x64(2, 24, 2, 8)
    out, grads = check(q, k, v, LOCAL, True, kpm)
    assert out[0, :6].abs().max() == 0 and grads[0][0, :6].abs().max() == 0
    assert (out[0, 6:].abs().sum((-1, -2)) > 0).all()


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)], ids=["f32", "bf16"])
def test_other_dtypes_and_non_contiguous_inputs(dtype, tol):
    torch.manual_seed(1)
    qkv = torch.randn(2, 30, 3, 4, 8, dtype=torch.float64)  # fused projection: strided q
    q = qkv[:, :, 0].to(dtype)
    kv = torch.randn(2, 8, 30, 16, dtype=torch.float64).transpose(1, 2)  # (b, n, 8, 16) strided
    k, v = kv[..., :8].unflatten(2, (2, 4))[:, :, :, 0].to(dtype), kv[..., 8:].unflatten(2, (2, 4))[:, :, :, 0].to(dtype)
    kpm = padding(2, 30)
    before = [t.clone() for t in (q, k, v, kpm)]
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = dilated_ops.block_sparse_attention(*leaves, GLOBAL, is_causal=True, key_padding_mask=kpm)
    ref = block_sparse_reference(q.double(), k.double(), v.double(), layout_of(GLOBAL, 30, 4, True), 4, True,
                                 key_padding_mask=kpm)
    assert out.dtype == dtype
    assert ((out.double() - ref).norm() / ref.norm()) < tol
    for t, b in zip((q, k, v, kpm), before):
        assert torch.equal(t, b)


def test_all_ones_padding_equals_no_mask():
    q, k, v = x64(2, 30, 6, 8), x64(2, 30, 3, 8), x64(2, 30, 3, 8)
    a = dilated_ops.block_sparse_attention(q, k, v, LOCAL, key_padding_mask=torch.ones(2, 30, dtype=torch.bool))
    torch.testing.assert_close(a, dilated_ops.block_sparse_attention(q, k, v, LOCAL), rtol=0, atol=0)


def test_gradcheck():
    torch.manual_seed(2)
    q, k, v = (x64(2, 12, h, 4).requires_grad_() for h in (4, 2, 2))
    kpm = padding(2, 12)
    kpm[0, :3] = False
    fn = lambda q, k, v: dilated_ops.block_sparse_attention(q, k, v, LOCAL, is_causal=True,  # noqa: E731
                                                             key_padding_mask=kpm)
    assert torch.autograd.gradcheck(fn, (q, k, v))


@pytest.mark.parametrize("is_causal", [False, True])
def test_opcheck_with_gqa_and_padding(is_causal):
    torch.manual_seed(3)
    q, k, v = (torch.randn(2, 18, h, 8, dtype=torch.float64, requires_grad=True) for h in (6, 2, 2))
    kpm = padding(2, 18, empty_row=1)
    torch.library.opcheck(OP, (q, k, v, "global_local", 4, 8, 8, 0.1, [], [], is_causal, None, None, kpm))


def test_compile_fullgraph_dynamic_and_export():
    torch.manual_seed(4)

    def f(q, k, v, kpm):
        return dilated_ops.block_sparse_attention(q, k, v, LOCAL, is_causal=True, key_padding_mask=kpm)

    compiled = torch.compile(f, fullgraph=True, dynamic=True, backend="aot_eager")
    for n in (20, 28):
        q, k, v, kpm = x64(2, n, 4, 8), x64(2, n, 2, 8), x64(2, n, 2, 8), padding(2, n)
        torch.testing.assert_close(compiled(q, k, v, kpm), f(q, k, v, kpm), rtol=1e-12, atol=1e-12)

    class M(torch.nn.Module):
        def forward(self, q, k, v, kpm):
            return f(q, k, v, kpm)
    args = (x64(2, 20, 4, 8), x64(2, 20, 2, 8), x64(2, 20, 2, 8), padding(2, 20))
    ep = torch.export.export(M(), args)
    nodes = [n for n in ep.graph.nodes if n.target == OP]
    assert len(nodes) == 1
    torch.testing.assert_close(ep.module()(*args), f(*args), rtol=0, atol=0)


def test_module_takes_gqa_and_padding():
    torch.manual_seed(5)
    m = dilated_ops.BlockSparseRingDilatedAttention([8, 16], [1, 2], sparse_config=LOCAL)
    q, k, v, kpm = x64(2, 20, 4, 8), x64(2, 20, 2, 8), x64(2, 20, 2, 8), padding(2, 20)
    want = dilated_ops.block_sparse_attention(q, k, v, LOCAL, is_causal=True, segment_lengths=[8, 16],
                                              dilation_rates=[1, 2], key_padding_mask=kpm)
    torch.testing.assert_close(m(q, k, v, is_causal=True, key_padding_mask=kpm), want, rtol=0, atol=0)


@pytest.mark.parametrize("kw,exc,message", [
    (dict(k=x64(2, 16, 3, 8)), ValueError, r"k and v have 3 heads, which must divide q's 4 heads"),
    (dict(key_padding_mask=torch.ones(2, 15, dtype=torch.bool)), ValueError, r"key_padding_mask"),
    (dict(key_padding_mask=torch.ones(2, 16)), TypeError, r"key_padding_mask"),
])
def test_errors_name_the_argument_and_value(kw, exc, message):
    args = dict(q=x64(2, 16, 4, 8), k=x64(2, 16, 2, 8), v=x64(2, 16, 2, 8))
    args.update({name: kw.pop(name) for name in ("k",) if name in kw})
    if "k" in kw or args["k"].shape[2] == 3:
        args["v"] = x64(2, 16, 3, 8)
    with pytest.raises(exc, match=message):
        dilated_ops.block_sparse_attention(args["q"], args["k"], args["v"], LOCAL, **kw)
