"""Graph rewriting through torch.compile (dilated_ops.fx_passes): stock attention in Dynamo graphs
becomes torch.ops.dilated.dilated_attention, and the rewritten model equals the original (one
dense branch) or the hand-built dilated math (a real dilated config)."""
import copy

import pytest
import torch
import torch.nn.functional as F
from expecttest import assert_expected_inline
from torch import nn

import dilated_ops
from models import GPT, SelfMHA, assert_same_outputs_and_grads, call_targets, encoder, x64, rel_err
from dilated_ops.kernels.reference import dilated_attention_reference

D64 = torch.float64
N = 16


pytestmark = pytest.mark.usefixtures("reset_dynamo")


def dense(**kw):
    return dilated_ops.backend([N], [1], inner=kw.pop("inner", "aot_eager"), **kw)


def check_same(model, inputs, be, **kwargs):
    """The compiled (rewritten) model's output and parameter gradients equal the original's."""
    compiled_model = copy.deepcopy(model)
    out = model(*inputs, **kwargs)
    out = out[0] if isinstance(out, tuple) else out
    got = torch.compile(compiled_model, backend=be, fullgraph=True)(*inputs, **kwargs)
    got = got[0] if isinstance(got, tuple) else got
    torch.testing.assert_close(got, out, rtol=1e-10, atol=1e-10)
    grad = torch.randn_like(out)
    out.backward(grad)
    got.backward(grad)
    for (name, p), q in zip(model.named_parameters(), compiled_model.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-10, atol=1e-10, msg=name)


class SeparateProj(nn.Module):
    """Self-attention through F.multi_head_attention_forward with separate q/k/v weights
    (nn.MultiheadAttention uses them only when kdim/vdim differ, i.e. cross-attention)."""

    def __init__(self, e=8, h=2, bias=True):
        super().__init__()
        self.h = h
        self.q, self.k, self.v = (nn.Parameter(torch.randn(e, e, dtype=D64) / 3) for _ in range(3))
        self.in_bias = nn.Parameter(torch.randn(3 * e, dtype=D64)) if bias else None
        self.out = nn.Linear(e, e, bias=bias, dtype=D64)

    def forward(self, x):  # x (seq, batch, embed)
        return F.multi_head_attention_forward(
            x, x, x, x.shape[-1], self.h, None, self.in_bias, None, None, False, 0.0,
            self.out.weight, self.out.bias, training=self.training, need_weights=False,
            use_separate_proj_weight=True, q_proj_weight=self.q, k_proj_weight=self.k,
            v_proj_weight=self.v,
        )


@pytest.mark.parametrize("batch_first", [True, False])
def test_mha_dense_branch_equals_original(batch_first):
    be = dense()
    check_same(SelfMHA(batch_first), (x64(3, N, 8),), be)
    assert [e.module_path for e in be.report.rewritten] == ["attn"] and not be.report.refused


@pytest.mark.parametrize("bias", [True, False])
def test_separate_projection_weights_dense_branch_equals_original(bias):
    be = dense()
    check_same(SeparateProj(bias=bias), (x64(N, 3, 8),), be)
    assert len(be.report.rewritten) == 1


@pytest.mark.parametrize("causal", [False, True])
def test_transformer_encoder_train_mode_equals_original(causal):
    be = dense()
    kwargs = {}
    if causal:
        kwargs = dict(mask=nn.Transformer.generate_square_subsequent_mask(N, dtype=D64), is_causal=True)
    check_same(encoder().train(), (x64(2, N, 8),), be, **kwargs)
    assert [e.module_path for e in be.report.rewritten] == ["layers.0.self_attn", "layers.1.self_attn"]


def test_transformer_encoder_eval_with_grad_takes_the_rewritable_path():
    # Eval with gradients enabled: the ordinary path (F.multi_head_attention_forward). Eval under
    # no_grad (the fused fast path) is tested in test_encoder_fastpath.py.
    be = dense()
    check_same(encoder().eval(), (x64(2, N, 8),), be)
    assert [(e.kind, e.module_path) for e in be.report.rewritten] == [
        ("multi_head_attention_forward", "layers.0.self_attn"), ("multi_head_attention_forward", "layers.1.self_attn")]


def test_gpt_sdpa_causal_dense_branch_equals_original():
    be = dense()
    check_same(GPT(), (torch.randint(0, 11, (2, N)),), be)
    assert [e.module_path for e in be.report.rewritten] == ["blocks.0", "blocks.1"]


def test_inductor_inner_backend():
    be = dense(inner="inductor")
    check_same(SelfMHA(True), (x64(2, N, 8),), be)


def test_registered_backend_name_takes_options():
    model = SelfMHA(True)
    x = x64(2, N, 8)
    opts = {"segment_lengths": [N], "dilation_rates": [1], "inner": "aot_eager"}
    got = torch.compile(model, backend="dilated", options=opts, fullgraph=True)(x)
    torch.testing.assert_close(got, model(x))
    torch._dynamo.reset()
    with pytest.raises(Exception, match="needs options"):
        torch.compile(model, backend="dilated", fullgraph=True)(x)


def test_real_dilated_config_equals_hand_built_math():
    n, segs, rates = 32, [8, 16], [1, 2]
    model = SelfMHA(True)
    x = x64(2, n, 8)
    be = dilated_ops.backend(segs, rates, inner="aot_eager")
    compiled = torch.compile(copy.deepcopy(model), backend=be, fullgraph=True)
    got = compiled(x)

    m = model.attn
    q, k, v = F.linear(x, m.in_proj_weight, m.in_proj_bias).chunk(3, dim=-1)
    q, k, v = (t.unflatten(-1, (2, 4)) for t in (q, k, v))
    want = F.linear(dilated_attention_reference(q, k, v, segs, rates).flatten(2), m.out_proj.weight, m.out_proj.bias)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    assert (got - model(x)).abs().max() > 1e-3  # it is not dense attention
    grad = torch.randn_like(want)
    want.backward(grad)
    got.backward(grad)
    for (name, p), c in zip(model.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(c.grad, p.grad, rtol=1e-10, atol=1e-10, msg=name)


@pytest.mark.parametrize("model,inp", [(SelfMHA(True), (2, N, 8)), (encoder().train(), (2, N, 8))])
def test_explain_zero_graph_breaks(model, inp):
    be = dense()
    explanation = torch._dynamo.explain(torch.compile(model, backend=be))(x64(*inp))
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1


def capture(model, *inputs):
    graphs = []
    be = dense(inner=lambda gm, ex: graphs.append(gm) or gm)
    torch.compile(model, backend=be, fullgraph=True)(*inputs)
    return call_targets(graphs[0])


def test_rewritten_mha_graph_pinned():
    assert_expected_inline(capture(SelfMHA(True), x64(2, N, 8)), """\
transpose
linear
chunk
getitem
getitem
getitem
unflatten
unflatten
unflatten
transpose
transpose
transpose
dilated.dilated_attention.default
getitem
transpose
flatten
linear
transpose""")


def test_rewritten_gpt_graph_pinned():
    text = capture(GPT(layers=1), torch.randint(0, 11, (2, N)))
    assert "scaled_dot_product_attention" not in text
    assert_expected_inline(text, """\
embedding
layer_norm
linear
split
getitem
getitem
getitem
view
transpose
view
transpose
view
transpose
transpose
transpose
transpose
dilated.dilated_attention.default
getitem
transpose
transpose
reshape
linear
add
linear
gelu
linear
add
linear""")


def run_refused(model, *inputs, **kwargs):
    be = dense()
    out = torch.compile(copy.deepcopy(model), backend=be, fullgraph=True)(*inputs, **kwargs)
    want = model(*inputs, **kwargs)
    torch.testing.assert_close(out[0] if isinstance(out, tuple) else out, want[0] if isinstance(want, tuple) else want)
    assert not be.report.rewritten
    return [e.reason for e in be.report.refused]


def mha():
    return nn.MultiheadAttention(8, 2, batch_first=True, dtype=D64)


def test_refused_need_weights():
    x = x64(2, N, 8)
    assert run_refused(mha(), x, x, x, need_weights=True) == [
        "need_weights=True (MHA's default): dilated attention returns no attention weights; pass need_weights=False"]


def padding_mask(b=2, n=N):
    """MHA's convention (True = padding): the last keys of the second row, none of the first's."""
    kpm = torch.zeros(b, n, dtype=torch.bool)
    kpm[1, -3:] = True
    return kpm


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("batch_first", [True, False])
def test_mha_key_padding_mask_is_rewritten_and_equal(batch_first, causal):
    """A bool key_padding_mask (MHA turns it into a float one before F.multi_head_attention_forward:
    the rewrite reads the bool one back), alone and with the causal mask."""
    class Padded(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, batch_first=batch_first, dtype=D64)

        def forward(self, x, kpm):
            mask = torch.ones(x.shape[1 if batch_first else 0], x.shape[1 if batch_first else 0],
                              dtype=torch.bool).triu(1) if causal else None
            return self.attn(x, x, x, key_padding_mask=kpm, need_weights=False, attn_mask=mask, is_causal=causal)[0]

    x = x64(2, N, 8) if batch_first else x64(N, 2, 8)
    be = dense()
    check_same(Padded(), (x, padding_mask()), be)
    assert [e.module_path for e in be.report.rewritten] == ["attn"] and not be.report.refused


def test_mha_key_padding_mask_takes_effect_under_dilation():
    """Not dense-equivalent: changing the hidden states at padded positions changes no other
    position's output (the padded keys are hidden), and the compiled output differs from MHA's."""
    m, x, kpm = mha(), x64(2, N, 8), padding_mask()
    be = dilated_ops.backend([N // 2, N], [1, 2], inner="aot_eager")
    g = torch.compile(lambda x: m(x, x, x, key_padding_mask=kpm, need_weights=False)[0], backend=be, fullgraph=True)
    y = x.clone()
    y[1, -3:] += 1.0
    a, b = g(x), g(y)
    assert be.report.rewritten
    torch.testing.assert_close(a[:, :-3], b[:, :-3], rtol=1e-12, atol=1e-12)
    assert (a - m(x, x, x, key_padding_mask=kpm, need_weights=False)[0]).abs().max() > 1e-3


def test_refused_float_key_padding_mask():
    x = x64(2, N, 8)
    kpm = torch.zeros(2, N, dtype=D64)
    kpm[:, -2:] = -1.5
    assert run_refused(mha(), x, x, x, key_padding_mask=kpm, need_weights=False) == [
        "a torch.float64 key_padding_mask (added to the scores) is not supported: pass a bool mask (True = padding)"]


def test_refused_float_attn_mask():
    x = x64(2, N, 8)
    assert run_refused(mha(), x, x, x, attn_mask=x64(N, N), need_weights=False) == [
        "attn_mask without is_causal=True (an arbitrary mask) is not supported"]


def test_refused_cross_attention():
    x, mem = x64(2, N, 8), x64(2, N, 8)
    assert run_refused(mha(), x, mem, mem, need_weights=False) == [
        "cross-attention (key/value not the query) is not supported"]


def test_refused_sdpa_mask():
    class M(nn.Module):
        def forward(self, q, mask):
            return F.scaled_dot_product_attention(q, q, q, attn_mask=mask)
    assert run_refused(M(), x64(2, 2, N, 4), x64(N, N)) == [
        "a float attn_mask (an additive bias) is not supported by dilated attention (use is_causal=True)"]


def test_strict_raises_on_refusal():
    x = x64(2, N, 8)
    with pytest.raises(Exception, match="need_weights=True"):
        torch.compile(mha(), backend=dense(strict=True), fullgraph=True)(x, x, x, need_weights=True)


def test_select_chooses_calls_by_module_path():
    be = dense(select=lambda path: path == "layers.1.self_attn")
    torch.compile(encoder().train(), backend=be, fullgraph=True)(x64(2, N, 8))
    assert [e.module_path for e in be.report.rewritten] == ["layers.1.self_attn"]
    assert [(e.module_path, e.reason) for e in be.report.skipped] == [("layers.0.self_attn", "not chosen by select")]


def test_dropout_in_training_is_passed_to_the_op():
    graphs = []
    be = dense(inner=lambda gm, ex: graphs.append(gm) or gm)
    m = nn.MultiheadAttention(8, 2, dropout=0.5, batch_first=True, dtype=D64)
    x = x64(2, N, 8)
    torch.compile(m, backend=be, fullgraph=True)(x, x, x, need_weights=False)
    (node,) = [n for n in graphs[0].graph.nodes if n.target is torch.ops.dilated.dilated_attention.default]
    assert node.args[8] == 0.5 and node.args[9] is not None
    m.eval()
    torch._dynamo.reset()
    graphs.clear()
    torch.compile(m, backend=be, fullgraph=True)(x, x, x, need_weights=False)
    (node,) = [n for n in graphs[0].graph.nodes if n.target is torch.ops.dilated.dilated_attention.default]
    assert node.args[8] == 0.0 and node.args[9] is None


def test_sdpa_rewrite_with_dynamic_sequence_length():
    be = dilated_ops.backend([8], [1], inner="aot_eager")
    compiled = torch.compile(lambda q: F.scaled_dot_product_attention(q, q, q, is_causal=True),
                             backend=be, dynamic=True, fullgraph=True)
    for n in (8, 12):
        q = x64(2, 2, n, 4)
        bnhd = q.transpose(1, 2)
        want = dilated_ops.dilated_attention(bnhd, bnhd, bnhd, [8], [1], is_causal=True).transpose(1, 2)
        torch.testing.assert_close(compiled(q), want)
    assert len(be.report.rewritten) == 1


def _float32_models():
    """(name, float32 model, float32 inputs) for the float32 equivalence of every route."""
    return [
        ("mha batch_first", SelfMHA(True).float(), (torch.randn(2, N, 8),)),
        ("mha seq_first", SelfMHA(False).float(), (torch.randn(N, 2, 8),)),
        ("encoder", encoder().float(), (torch.randn(2, N, 8),)),
        ("gpt", GPT().float(), (torch.randint(0, 11, (2, N)),)),
    ]


class _Wrap(nn.Module):
    """symbolic_trace needs a root it can trace: torch.nn modules (the encoder) become leaves."""

    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, x):
        return self.m(x)


@pytest.mark.parametrize("route", ["compile", "export", "symbolic_trace"])
def test_float32_dense_branch_equals_original_every_route(route):
    # The float32 bound (1e-5) on outputs and parameter gradients, for each model and
    # each route (the float64 tests above bound them at 1e-10).
    for name, model, inputs in _float32_models():
        model.train()
        copy_ = copy.deepcopy(model)
        if route == "compile":
            rewritten = torch.compile(copy_, backend=dense(), fullgraph=True)
            params = dict(copy_.named_parameters())
        elif route == "export":
            rewritten = dilated_ops.export(copy_, inputs, segment_lengths=[N], dilation_rates=[1]).module()
            params = dict(rewritten.named_parameters())
        else:
            rewritten, report = dilated_ops.rewrite_symbolic(torch.fx.symbolic_trace(_Wrap(copy_)), [N], [1],
                                                             example_inputs=inputs)
            assert report.rewritten and not report.refused, (name, str(report))
            params = {k.removeprefix("m."): v for k, v in rewritten.named_parameters()}
        assert_same_outputs_and_grads(model, rewritten, inputs, tol=1e-5, params=params, label=name)
        torch._dynamo.reset()


def test_autocast_bfloat16_training_step_of_a_rewritten_encoder(monkeypatch):
    """Issue 18's acceptance: a stock encoder through dilated_ops.backend trains a step under
    torch.autocast("cpu", torch.bfloat16) (the op then runs in bfloat16 on the CPU): its
    gradients are finite and those of the same rewritten model in float32 within bfloat16's
    tolerance."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    model = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
    x = torch.randn(2, N, 16)

    from dilated_ops.registrations import dilated_attention as registration

    seen = []  # the dtypes the op's kernels receive
    forward = registration.dilated_attention_forward
    monkeypatch.setattr(registration, "dilated_attention_forward",
                        lambda q, *a: seen.append(q.dtype) or forward(q, *a))

    def step(autocast: bool):
        seen.clear()
        torch._dynamo.reset()
        model.zero_grad()
        be = dilated_ops.backend([8, 16], [1, 2], inner="aot_eager")
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = torch.compile(model, backend=be, fullgraph=True)(x)
        out.float().square().mean().backward()
        assert len(be.report.rewritten) == 2 and not be.report.refused
        return set(seen), {n: p.grad.clone() for n, p in model.named_parameters()}

    dtypes32, want = step(False)
    dtypes16, got = step(True)
    assert (dtypes32, dtypes16) == ({torch.float32}, {torch.bfloat16})
    floor = 0.01 * max(g.norm() for g in want.values())
    for name in want:
        assert torch.isfinite(got[name]).all() and rel_err(got[name], want[name], floor=floor) < 5e-2, name
