"""SPEC section 8 in the dilated op (issue 21): grouped-query attention, key padding and packed
sequences against the float64 reference, forward and backward, plus opcheck, compile, export
and the errors."""
import itertools

import pytest
import torch

import dilated_ops
from dilated_ops.kernels.reference import dilated_attention_reference
from dilated_ops.registrations.dilated_attention import dilated_attention_op

from models import run_saved_in_fresh_process

SEGS, RATES = [4, 8, 16], [1, 2, 4]


def rand(*shape, dtype=torch.float64):
    return torch.randn(*shape, dtype=dtype)


def padding(b: int, n: int, p: float = 0.35, empty_row: int = None) -> torch.Tensor:
    """Random keep-masks; ``empty_row``: a batch row with every key padded."""
    keep = torch.rand(b, n) > p
    if empty_row is not None:
        keep[empty_row] = False
    return keep


def check(q, k, v, g, tol=1e-10, **kw):
    """The function's output and q/k/v gradients against the reference's (same kwargs)."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = dilated_ops.dilated_attention(*leaves, SEGS, RATES, **kw)
    got = torch.autograd.grad(out, leaves, g)
    ref_in = [t.detach().double().requires_grad_() for t in (q, k, v)]
    if kw.get("cu_seqlens") is not None:
        kw = dict(kw, cu_seqlens=kw["cu_seqlens"].tolist())
    ref = dilated_attention_reference(*ref_in, SEGS, RATES, **kw)
    want = torch.autograd.grad(ref, ref_in, g.double())
    for name, x, y in (("out", out, ref), *zip(("dq", "dk", "dv"), got, want)):
        assert not x.isnan().any(), name
        torch.testing.assert_close(x.double(), y, rtol=tol, atol=tol, msg=name)
    return out, got


@pytest.mark.parametrize("masked", [False, True], ids=["no-mask", "padding"])
@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("mode", ["groups", "longnet"])
@pytest.mark.parametrize("h,h_kv", [(4, 4), (4, 2), (4, 1), (12, 3), (9, 3), (3, 1), (6, 3)])
def test_gqa_and_padding_match_the_reference(h, h_kv, mode, is_causal, masked):
    """GQA ratios 1, 2, 4 and heads_kv = 1, odd head counts, head groups that cut a KV head's
    query heads (12 heads, 3 groups, ratio 4 does not; 9/3 and 6/3 do), batch 3 with a fully
    padded row, a partial last segment (n = 30)."""
    torch.manual_seed(h * 10 + h_kv)
    b, n = 3, 30
    q, k, v = rand(b, n, h, 8), rand(b, n, h_kv, 8), rand(b, n, h_kv, 8)
    kpm = padding(b, n, empty_row=1) if masked else None
    out, grads = check(q, k, v, rand(b, n, h, 8), mode=mode, is_causal=is_causal, key_padding_mask=kpm)
    assert grads[1].shape == k.shape and grads[2].shape == v.shape
    if masked:  # a batch row that sees no key: output 0, gradients 0
        assert out[1].abs().max() == 0 and all(g[1].abs().max() == 0 for g in grads)


def test_a_query_that_sees_no_key_only_causally_gets_zero():
    """Causal + padding: the first keys padded, so the first queries see nothing (left padding)."""
    b, n, h = 2, 24, 4
    kpm = torch.ones(b, n, dtype=torch.bool)
    kpm[0, :5] = False  # left padding of 5
    q, k, v = rand(b, n, h, 8), rand(b, n, 2, 8), rand(b, n, 2, 8)
    for mode in ("groups", "longnet"):
        out, grads = check(q, k, v, rand(b, n, h, 8), mode=mode, is_causal=True, key_padding_mask=kpm)
        assert out[0, :5].abs().max() == 0 and grads[0][0, :5].abs().max() == 0
        assert (out[0, 5:].abs().sum((-1, -2)) > 0).all()  # every later position gets something


def test_all_ones_padding_equals_no_mask_and_inputs_are_not_modified():
    q, k, v = rand(2, 30, 6, 8), rand(2, 30, 2, 8), rand(2, 30, 2, 8)
    kpm = torch.ones(2, 30, dtype=torch.bool)
    before = [t.clone() for t in (q, k, v, kpm)]
    for mode in ("groups", "longnet"):
        a = dilated_ops.dilated_attention(q, k, v, SEGS, RATES, mode=mode, key_padding_mask=kpm)
        b = dilated_ops.dilated_attention(q, k, v, SEGS, RATES, mode=mode)
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert all(torch.equal(x, y) for x, y in zip(before, (q, k, v, kpm)))


def test_non_contiguous_and_float32_inputs():
    """q/k/v as transposed and strided views, and float32 within float32's tolerance."""
    b, n, h, h_kv = 2, 29, 6, 2
    q = rand(b, h, n, 8).transpose(1, 2)
    k, v = rand(b, n, 2 * h_kv, 8)[:, :, ::2], rand(b, h_kv, n, 8).transpose(1, 2)
    kpm = padding(b, n)
    check(q, k, v, rand(b, n, h, 8), mode="longnet", is_causal=True, key_padding_mask=kpm)
    check(q.float(), k.float(), v.float(), rand(b, n, h, 8).float(), tol=1e-4, mode="groups", key_padding_mask=kpm)


@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("mode", ["groups", "longnet"])
def test_packed_equals_one_document_at_a_time(mode, is_causal):
    """Documents of 7, 0 (empty), 7, 7 and 9 tokens packed (runs of equal lengths batched),
    with GQA and padding too: 1e-10 against the documents run one by one, forward and
    backward."""
    torch.manual_seed(3)
    cu = torch.tensor([0, 7, 7, 14, 21, 30], dtype=torch.int32)
    b, n, h, h_kv = 2, 30, 6, 3
    q, k, v = rand(b, n, h, 8), rand(b, n, h_kv, 8), rand(b, n, h_kv, 8)
    kpm = padding(b, n)
    g = rand(b, n, h, 8)
    kw = dict(mode=mode, is_causal=is_causal, key_padding_mask=kpm)
    out, grads = check(q, k, v, g, cu_seqlens=cu, **kw)
    bounds = cu.tolist()
    for a, z in zip(bounds[:-1], bounds[1:]):
        if a == z:
            continue
        leaves = [t[:, a:z].clone().requires_grad_() for t in (q, k, v)]
        one = dilated_ops.dilated_attention(*leaves, SEGS, RATES, mode=mode, is_causal=is_causal,
                                            key_padding_mask=kpm[:, a:z])
        torch.testing.assert_close(out[:, a:z], one, rtol=1e-10, atol=1e-10)
        for x, y in zip(grads, torch.autograd.grad(one, leaves, g[:, a:z])):
            torch.testing.assert_close(x[:, a:z], y, rtol=1e-10, atol=1e-10)
    # and it is not the unpacked result: segments restart at each document
    whole = dilated_ops.dilated_attention(q, k, v, SEGS, RATES, mode=mode, is_causal=is_causal, key_padding_mask=kpm)
    assert (whole - out).abs().max() > 1e-3


@pytest.mark.parametrize("mode", ["groups", "longnet"])
def test_gradcheck_of_the_op_with_gqa_padding_and_packing(mode):
    q = rand(2, 12, 4, 3).requires_grad_()
    k, v = rand(2, 12, 2, 3).requires_grad_(), rand(2, 12, 2, 3).requires_grad_()
    kpm = padding(2, 12, empty_row=1)
    cu = torch.tensor([0, 5, 12])

    def fn(q, k, v):
        return dilated_attention_op(q, k, v, [4, 8], [1, 2], mode, True, None, 0.0, None, "auto", 0, 0, kpm, cu)[0]

    assert torch.autograd.gradcheck(fn, (q, k, v))


def test_dropout_with_gqa_and_padding_is_repeatable_and_gradchecks():
    q, k, v = (rand(1, 12, h, 4).requires_grad_() for h in (4, 2, 2))
    kpm = padding(1, 12)
    seed = torch.tensor(77)

    def fn(q, k, v):
        return dilated_attention_op(q, k, v, [4, 8], [1, 2], "longnet", True, None, 0.3, seed, "auto", 0, 0, kpm)[0]

    assert torch.equal(fn(q, k, v), fn(q, k, v))
    assert torch.autograd.gradcheck(fn, (q, k, v))


@pytest.mark.parametrize("mode", ["groups", "longnet"])
def test_opcheck_with_the_new_arguments(mode):
    q, k, v = rand(2, 20, 6, 8).requires_grad_(), rand(2, 20, 2, 8).requires_grad_(), rand(2, 20, 2, 8).requires_grad_()
    for kpm, cu in ((padding(2, 20), None), (None, torch.tensor([0, 8, 20])), (padding(2, 20, empty_row=0),
                                                                            torch.tensor([0, 3, 3, 20]))):
        torch.library.opcheck(dilated_attention_op, (q, k, v, SEGS, RATES, mode, True, None, 0.0, None, "auto", 0, 0,
                                                     kpm, cu))


def test_compile_fullgraph_dynamic_with_gqa_and_padding():
    """One compiled function, sequence lengths 24 and 40 (dynamic=True): no graph break, one op
    node, forward and backward equal to eager."""
    def fn(q, k, v, kpm):
        return dilated_ops.dilated_attention(q, k, v, SEGS, RATES, mode="longnet", is_causal=True,
                                             key_padding_mask=kpm)

    compiled = torch.compile(fn, fullgraph=True, dynamic=True, backend="aot_eager")
    for n in (24, 40):
        q, k, v = rand(2, n, 6, 8).requires_grad_(), rand(2, n, 3, 8).requires_grad_(), rand(2, n, 3, 8).requires_grad_()
        kpm = padding(2, n, empty_row=1)
        g = rand(2, n, 6, 8)
        want = fn(q, k, v, kpm)
        got = compiled(q, k, v, kpm)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        for x, y in zip(torch.autograd.grad(got, (q, k, v), g), torch.autograd.grad(want, (q, k, v), g)):
            torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12)


def test_export_with_padding_and_packing_saves_and_loads_in_a_fresh_process(tmp_path):
    class Attention(torch.nn.Module):
        def forward(self, q, k, v, kpm, cu):
            return dilated_ops.dilated_attention(q, k, v, SEGS, RATES, is_causal=True, key_padding_mask=kpm,
                                                 cu_seqlens=cu)

    args = (rand(2, 30, 6, 8), rand(2, 30, 2, 8), rand(2, 30, 2, 8), padding(2, 30, empty_row=1),
            torch.tensor([0, 10, 30]))
    ep = torch.export.export(Attention(), args)
    assert run_saved_in_fresh_process(ep, args, Attention()(*args), "dilated.dilated_attention.default", tmp_path) == 1


@pytest.mark.parametrize("kw,exc,message", [
    (dict(k=rand(2, 16, 3, 8)), ValueError, r"k and v have 3 heads, which must divide q's 4 heads"),
    (dict(k=rand(2, 16, 2, 8), v=rand(2, 16, 4, 8)), ValueError, r"k and v must have one shape .* got q \(2, 16, 4, 8\), k \(2, 16, 2, 8\), "
                                            r"v \(2, 16, 4, 8\)"),
    (dict(key_padding_mask=torch.ones(2, 15, dtype=torch.bool)), ValueError,
     r"key_padding_mask must have shape \(batch, seq\) = \(2, 16\): got \(2, 15\)"),
    (dict(key_padding_mask=torch.ones(2, 16)), TypeError, r"key_padding_mask must be a bool tensor .* got dtype "
                                                          r"torch.float32"),
    (dict(key_padding_mask=[[True] * 16] * 2), TypeError, r"key_padding_mask must be a bool tensor \(batch, seq\) or "
                                                          r"None: got list"),
    (dict(cu_seqlens=torch.tensor([0, 9, 5, 16])), ValueError,
     r"cu_seqlens must rise from 0 to the sequence length \(16\) without falling: got \[0, 9, 5, 16\]"),
    (dict(cu_seqlens=torch.tensor([0, 8])), ValueError, r"cu_seqlens must rise from 0 to the sequence length \(16\)"),
    (dict(cu_seqlens=torch.tensor([0.0, 16.0])), ValueError, r"cu_seqlens must be a 1-D int32 or int64 tensor"),
])
def test_errors_name_the_argument_and_value(kw, exc, message):
    q = rand(2, 16, 4, 8)
    k = kw.pop("k", q)
    v = kw.pop("v", k)
    with pytest.raises(exc, match=message):
        dilated_ops.dilated_attention(q, k, v, [8, 16], [1, 2], **kw)


def test_gqa_head_window_must_start_on_a_kv_head():
    q, k = rand(1, 16, 2, 8), rand(1, 16, 1, 8)
    with pytest.raises(ValueError, match=r"head_start \(1\) must be a multiple of heads / heads_kv \(2\)"):
        dilated_attention_op(q, k, k, [8], [1], "longnet", False, None, 0.0, None, "auto", 1, 4)
    # a window on whole KV heads is the slice of the whole call
    q4, k2, v2 = rand(1, 16, 4, 8), rand(1, 16, 2, 8), rand(1, 16, 2, 8)
    whole = dilated_attention_op(q4, k2, v2, [8, 16], [1, 2], "longnet", True, None, 0.0, None)[0]
    part = dilated_attention_op(q4[:, :, 2:], k2[:, :, 1:], v2[:, :, 1:], [8, 16], [1, 2], "longnet", True, None, 0.0,
                                None, "auto", 2, 4)[0]
    torch.testing.assert_close(part, whole[:, :, 2:], rtol=1e-12, atol=1e-12)


def test_gqa_plan_reads_no_repeated_kv():
    """Every launch's query heads read KV heads ``u // m`` of its KV call, as kernels with native
    GQA index them, and every (query head, branch offset) is covered once."""
    from dilated_ops.kernels.segments import gqa_plan, plan

    for h, h_kv, mode in itertools.product((4, 6, 8, 12), (1, 2, 3, 4), ("groups", "longnet")):
        if h % h_kv or (mode == "groups" and h < 3):
            continue
        ratio = h // h_kv
        covered = []
        for qc, kc in gqa_plan(h, h_kv, (8, 16, 24), (1, 3, 2), mode):
            qs, ks = list(range(*qc.heads.indices(h))), list(range(*kc.heads.indices(h_kv)))
            m = len(qs) // len(ks)
            assert len(qs) == m * len(ks) and [ks[u // m] for u in range(len(qs))] == [j // ratio for j in qs]
            covered += [(qc.branch, qc.offset, j) for j in qs]
        want = [(c.branch, c.offset, j) for c in plan(h, (8, 16, 24), (1, 3, 2), mode) for j in range(*c.heads.indices(h))]
        assert sorted(covered) == sorted(want)
