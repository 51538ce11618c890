"""SPEC section 9 (issue 22): dilated attention for queries at the end of a KV cache, the
``dilated::decode_attention`` op, against the float64 reference (the full forward's last rows),
forward and backward; prefill + one-token steps equal to the full causal forward; opcheck,
compile with a growing cache, export; the errors."""
import itertools

import pytest
import torch

import dilated_ops
from dilated_ops.kernels.reference import dilated_attention_reference, dilated_decode_reference
from dilated_ops.registrations.decode_attention import decode_attention_op

from models import run_saved_in_fresh_process

SEGS, RATES = [4, 8, 16], [1, 2, 4]


def rand(*shape, dtype=torch.float64):
    return torch.randn(*shape, dtype=dtype)


def check(q, k, v, g, tol=1e-10, segs=SEGS, rates=RATES, **kw):
    """The function's output and q/k/v gradients against the reference's (same kwargs)."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = dilated_ops.dilated_attention_decode(*leaves, segs, rates, **kw)
    got = torch.autograd.grad(out, leaves, g)
    ref_in = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = dilated_decode_reference(*ref_in, segs, rates, **kw)
    want = torch.autograd.grad(ref, ref_in, g.double())
    for name, x, y in (("out", out, ref), *zip(("dq", "dk", "dv"), got, want)):
        assert not x.isnan().any(), name
        torch.testing.assert_close(x.double(), y, rtol=tol, atol=tol, msg=name)
    return out


# (skv, sq): one new token inside a segment and at each boundary of the longest one, a few
# tokens crossing a boundary, a chunk longer than the longest segment, the whole sequence.
LENGTHS = [(37, 1), (32, 1), (33, 1), (37, 5), (50, 20), (24, 24)]


@pytest.mark.parametrize("masked", [False, True], ids=["no-mask", "padding"])
@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("mode", ["groups", "longnet"])
@pytest.mark.parametrize("h,h_kv", [(4, 4), (4, 2), (4, 1), (12, 3), (9, 3)])
def test_matches_the_reference(h, h_kv, mode, is_causal, masked):
    for skv, sq in LENGTHS:
        torch.manual_seed(skv * 100 + sq)
        q, k, v = rand(3, sq, h, 8), rand(3, skv, h_kv, 8), rand(3, skv, h_kv, 8)
        keep = None
        if masked:
            keep = torch.rand(3, skv) > 0.35
            keep[1] = False  # a batch row that sees no key at all: 0, zero gradients
            keep[2, : skv - max(sq // 2, 1)] = False  # left padding (a shorter prompt in the batch)
        out = check(q, k, v, rand(3, sq, h, 8), mode=mode, is_causal=is_causal, key_padding_mask=keep)
        if masked:
            assert out[1].abs().max() == 0


@pytest.mark.parametrize("mode", ["groups", "longnet"])
def test_prefill_then_one_token_steps_equal_the_full_causal_forward(mode):
    """The generation loop: the prompt through dilated_attention, then each new token's query
    against the cache so far; every step's row equals that row of one causal forward over the
    whole sequence (float64, 1e-12), across every segment boundary of every branch."""
    torch.manual_seed(0)
    n, prompt, h, h_kv = 70, 13, 6, 2
    segs, rates = [8, 16, 64], [1, 2, 8]
    q, k, v = rand(2, n, h, 16), rand(2, n, h_kv, 16), rand(2, n, h_kv, 16)
    full = dilated_ops.dilated_attention(q, k, v, segs, rates, mode=mode, is_causal=True)
    rows = [dilated_ops.dilated_attention(q[:, :prompt], k[:, :prompt], v[:, :prompt], segs, rates, mode=mode,
                                          is_causal=True)]
    for t in range(prompt, n):
        rows.append(dilated_ops.dilated_attention_decode(q[:, t:t + 1], k[:, :t + 1], v[:, :t + 1], segs, rates,
                                                         mode=mode, is_causal=True))
    torch.testing.assert_close(torch.cat(rows, dim=1), full, rtol=1e-12, atol=1e-12)


def test_a_step_reads_at_most_w_over_r_keys_per_branch():
    """The cost claim: changing any key outside the ones a step may read (its segment, its
    offset class, up to its position) leaves the step's output unchanged, whatever the
    context length; changing one it reads changes it."""
    torch.manual_seed(1)
    segs, rates, skv = [8, 32], [2, 8], 77
    # 8 heads: in longnet mode every offset class of both branches has a head that reads it
    q, k, v = rand(1, 1, 8, 8), rand(1, skv, 2, 8), rand(1, skv, 2, 8)
    out = dilated_ops.dilated_attention_decode(q, k, v, segs, rates, mode="longnet", is_causal=True)
    t = skv - 1
    read = set()
    for w, r in zip(segs, rates):
        start = t - t % w
        read |= set(range(start + (t - start) % r, t + 1, r))
    assert len(read) <= sum(w // r for w, r in zip(segs, rates))
    for pos in range(skv):
        k2, v2 = k.clone(), v.clone()
        k2[:, pos] += 1.0
        v2[:, pos] += 1.0
        got = dilated_ops.dilated_attention_decode(q, k2, v2, segs, rates, mode="longnet", is_causal=True)
        assert torch.equal(got, out) == (pos not in read), pos


def test_non_contiguous_float32_and_half_inputs_and_nothing_is_modified():
    torch.manual_seed(2)
    qkv = rand(2, 30, 3, 6, 8).to(torch.float32)  # a fused projection: q, k, v are strided slices
    q, k, v = qkv[:, 25:, 0], qkv[:, :, 1], qkv[:, :, 2]
    keep = torch.rand(2, 30) > 0.3
    before = [t.clone() for t in (qkv, keep)]
    g = torch.randn(2, 5, 6, 8)
    check(q, k, v, g, tol=1e-5, mode="longnet", is_causal=True, key_padding_mask=keep)
    for t, b in zip((qkv, keep), before):
        assert torch.equal(t, b)
    for dtype in (torch.bfloat16, torch.float16):  # computed in float32, returned in the input's dtype
        out = dilated_ops.dilated_attention_decode(q.to(dtype), k.to(dtype), v.to(dtype), SEGS, RATES,
                                                   is_causal=True, key_padding_mask=keep)
        want = dilated_decode_reference(q.double(), k.double(), v.double(), SEGS, RATES, is_causal=True,
                                        key_padding_mask=keep)
        assert out.dtype == dtype
        assert ((out.double() - want).norm() / want.norm()).item() < 1e-2


def test_decode_reference_is_the_full_forwards_last_rows_and_gradchecks():
    torch.manual_seed(3)
    q, k, v = rand(2, 11, 4, 2), rand(2, 11, 2, 2), rand(2, 11, 2, 2)
    want = dilated_attention_reference(q, k, v, SEGS, RATES, "longnet", True)[:, 8:]
    torch.testing.assert_close(dilated_decode_reference(q[:, 8:], k, v, SEGS, RATES, "longnet", True), want,
                               rtol=0, atol=0)
    inputs = (q[:1, 8:].clone().requires_grad_(), k[:1].clone().requires_grad_(), v[:1].clone().requires_grad_())
    assert torch.autograd.gradcheck(lambda *t: dilated_decode_reference(*t, SEGS, RATES, "longnet", True), inputs)


@pytest.mark.parametrize("mode", ["groups", "longnet"])
def test_gradcheck_of_the_op(mode):
    torch.manual_seed(4)
    keep = torch.rand(2, 19) > 0.3
    keep[1, :17] = False  # the first query sees no key
    inputs = (rand(2, 3, 4, 2).requires_grad_(), rand(2, 19, 2, 2).requires_grad_(), rand(2, 19, 2, 2).requires_grad_())
    assert torch.autograd.gradcheck(
        lambda *t: dilated_ops.dilated_attention_decode(*t, SEGS, RATES, mode=mode, is_causal=True,
                                                        key_padding_mask=keep), inputs)


def test_torch_func_grad_vjp_and_vmap():
    torch.manual_seed(7)
    q, k, v = rand(2, 2, 4, 4), rand(2, 21, 2, 4), rand(2, 21, 2, 4)

    def ours(q, k, v):
        return dilated_ops.dilated_attention_decode(q, k, v, SEGS, RATES, mode="longnet", is_causal=True)

    def ref(q, k, v):
        return dilated_decode_reference(q, k, v, SEGS, RATES, "longnet", True)

    for argnums in (0, 1, 2):
        torch.testing.assert_close(torch.func.grad(lambda *t: ours(*t).square().sum(), argnums)(q, k, v),
                                   torch.func.grad(lambda *t: ref(*t).square().sum(), argnums)(q, k, v),
                                   rtol=1e-10, atol=1e-10)
    out, pullback = torch.func.vjp(ours, q, k, v)
    g = torch.randn_like(out)
    for x, y in zip(pullback(g), torch.func.vjp(ref, q, k, v)[1](g)):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-10)
    batch = [torch.stack([t, 2 * t]) for t in (q, k, v)]  # vmap over a leading dim: each slice its own call
    torch.testing.assert_close(torch.func.vmap(ours)(*batch), torch.stack([ours(q, k, v), ours(2 * q, 2 * k, 2 * v)]))


@pytest.mark.parametrize("mode", ["groups", "longnet"])
def test_opcheck(mode):
    torch.manual_seed(5)
    q, k, v = rand(2, 3, 6, 8).requires_grad_(), rand(2, 21, 2, 8).requires_grad_(), rand(2, 21, 2, 8).requires_grad_()
    for is_causal, keep in itertools.product((False, True), (None, torch.rand(2, 21) > 0.3)):
        torch.library.opcheck(decode_attention_op, (q, k, v, SEGS, RATES, mode, is_causal, None, keep))


def test_compile_fullgraph_with_a_growing_cache_equals_eager():
    """One compiled step (dynamic=True) over caches of 20, 33 and 64 keys: no graph break, one
    op node, forward and backward equal to eager."""
    def step(q, k, v, keep):
        return dilated_ops.dilated_attention_decode(q, k, v, SEGS, RATES, mode="longnet", is_causal=True,
                                                    key_padding_mask=keep)

    compiled = torch.compile(step, fullgraph=True, dynamic=True, backend="aot_eager")
    for skv in (20, 33, 64):
        q, k, v = rand(2, 1, 6, 8).requires_grad_(), rand(2, skv, 3, 8).requires_grad_(), rand(2, skv, 3, 8)
        keep = torch.rand(2, skv) > 0.2
        g = rand(2, 1, 6, 8)
        want, got = step(q, k, v, keep), compiled(q, k, v, keep)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        for x, y in zip(torch.autograd.grad(got, (q, k), g), torch.autograd.grad(want, (q, k), g)):
            torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12)
    graphs = []
    torch._dynamo.reset()
    torch.compile(step, fullgraph=True, dynamic=True,
                  backend=lambda gm, ex: graphs.append(gm) or gm)(q, k, v, keep)
    calls = [n.target for gm in graphs for n in gm.graph.nodes if n.op == "call_function"]
    assert calls.count(torch.ops.dilated.decode_attention.default) == 1, calls


def test_export_with_a_dynamic_cache_length_saves_and_loads_in_a_fresh_process(tmp_path):
    class Step(torch.nn.Module):
        def forward(self, q, k, v, keep):
            return dilated_ops.dilated_attention_decode(q, k, v, SEGS, RATES, is_causal=True, key_padding_mask=keep)

    torch.manual_seed(6)
    args = (rand(2, 1, 6, 8), rand(2, 30, 2, 8), rand(2, 30, 2, 8), torch.rand(2, 30) > 0.2)
    skv = torch.export.Dim("skv", min=2, max=4096)
    ep = torch.export.export(Step(), args, dynamic_shapes=(None, {1: skv}, {1: skv}, {1: skv}))
    other = (rand(2, 1, 6, 8), rand(2, 45, 2, 8), rand(2, 45, 2, 8), torch.rand(2, 45) > 0.2)
    torch.testing.assert_close(ep.module()(*other), Step()(*other), rtol=0, atol=0)
    assert run_saved_in_fresh_process(ep, args, Step()(*args), "dilated.decode_attention.default", tmp_path) == 1


@pytest.mark.parametrize("kw,exc,message", [
    (dict(q=rand(2, 40, 4, 8)), ValueError, r"q's length \(40\) must be at most the cache's \(k and v: 30\)"),
    (dict(k=rand(2, 30, 3, 8), v=rand(2, 30, 3, 8)), ValueError, r"k and v have 3 heads, which must divide q's 4 "
                                                                 r"heads"),
    (dict(v=rand(2, 29, 2, 8)), ValueError, r"k and v must have one shape \(batch, skv, heads_kv, head_dim\): got "
                                            r"k \(2, 30, 2, 8\), v \(2, 29, 2, 8\)"),
    (dict(q=rand(1, 1, 4, 8)), ValueError, r"k and v must have q's batch \(1\) and head_dim \(8\)"),
    (dict(q=rand(2, 1, 4)), ValueError, r"q must be 4-D \(batch, seq, heads, head_dim\): got shape \(2, 1, 4\)"),
    (dict(q=rand(2, 1, 4, 8, dtype=torch.float32)), TypeError, r"q, k and v must share one dtype"),
    (dict(key_padding_mask=torch.ones(2, 1, dtype=torch.bool)), ValueError,
     r"key_padding_mask must have shape \(batch, seq\) = \(2, 30\): got \(2, 1\)"),
    (dict(segment_lengths=[4, 6]), ValueError, r"segment_lengths\[1\] \(6\) must be divisible by dilation_rates\[1\] "
                                               r"\(4\)"),
    (dict(mode="sparse"), ValueError, r"mode must be 'groups' or 'longnet': got 'sparse'"),
    (dict(is_causal=1), TypeError, r"is_causal must be a bool: got 1"),
])
def test_errors_name_the_argument_and_value(kw, exc, message):
    args = dict(q=rand(2, 1, 4, 8), k=rand(2, 30, 2, 8), v=rand(2, 30, 2, 8), segment_lengths=[4, 8],
                dilation_rates=[1, 4])
    args.update(kw)
    with pytest.raises(exc, match=message):
        dilated_ops.dilated_attention_decode(args.pop("q"), args.pop("k"), args.pop("v"), args.pop("segment_lengths"),
                                             args.pop("dilation_rates"), **args)
