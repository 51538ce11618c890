"""The torch.fx.symbolic_trace pass (dilated_ops.rewrite_symbolic): call_module nodes of
nn.MultiheadAttention call a ConvertedMultiheadAttention sharing the Parameters."""
import copy

import pytest
import torch
import torch.nn.functional as F
from expecttest import assert_expected_inline
from torch import nn

import dilated_ops
from dilated_ops import ConvertedMultiheadAttention
from dilated_ops.fx_passes import RewriteRefused
from dilated_ops.kernels.reference import dilated_attention_reference

from models import assert_same_outputs_and_grads, x64

D64 = torch.float64
N = 16


class Block(nn.Module):
    """Two attention calls (self-attention, then same-length attention over ``mem``) and a norm."""

    def __init__(self, batch_first=True, kdim=None, **kw):
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=batch_first, dtype=D64, **kw)
        self.cross = nn.MultiheadAttention(8, 2, batch_first=batch_first, kdim=kdim, vdim=kdim, dtype=D64)
        self.norm = nn.LayerNorm(8, dtype=D64)

    def forward(self, x, mem):
        x = x + self.attn(x, x, x, need_weights=False)[0]
        return self.norm(x + self.cross(x, mem, mem, need_weights=False)[0])


def traced_and_rewritten(model, segs=(N,), rates=(1,), **kw):
    return dilated_ops.rewrite_symbolic(torch.fx.symbolic_trace(copy.deepcopy(model)), list(segs), list(rates), **kw)


def calls(gm):
    return "\n".join(f"{n.op} {n.target} {type(gm.get_submodule(n.target)).__name__}"
                     for n in gm.graph.nodes if n.op == "call_module")


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("kdim", [None, 6])
def test_dense_branch_equals_original_with_grads(batch_first, kdim):
    # kdim=6: the second module has separate q/k/v projection weights.
    model = Block(batch_first, kdim)
    gm, report = traced_and_rewritten(model)
    assert [e.module_path for e in report.rewritten] == ["attn", "cross"] and not report.refused
    shape = (3, N) if batch_first else (N, 3)
    x, mem = x64(*shape, 8), x64(*shape, kdim or 8)
    out, got = model(x, mem), gm(x, mem)
    torch.testing.assert_close(got, out, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(out)
    want = torch.autograd.grad(out, list(model.parameters()), g)
    have = torch.autograd.grad(got, list(gm.parameters()), g)
    names = [n for n, _ in model.named_parameters()]
    assert names == [n for n, _ in gm.named_parameters()]
    for name, a, b in zip(names, have, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=name)


def test_graph_and_state_dict_keys():
    model = Block()
    traced = torch.fx.symbolic_trace(model)
    keys = list(traced.state_dict())
    gm, _ = dilated_ops.rewrite_symbolic(traced, [N], [1])
    assert_expected_inline(calls(gm), """\
call_module attn ConvertedMultiheadAttention
call_module cross ConvertedMultiheadAttention
call_module norm LayerNorm""")
    assert list(gm.state_dict()) == keys
    assert gm.attn.in_proj_weight is model.attn.in_proj_weight


def test_real_dilated_config_equals_reference():
    segs, rates = [4, 8], [1, 2]
    model = Block()
    gm, _ = traced_and_rewritten(model, segs, rates, select=lambda p: p == "attn")
    x, mem = x64(2, 32, 8), x64(2, 32, 8)
    m = model.attn
    q, k, v = (t.unflatten(-1, (2, 4)) for t in F.linear(x, m.in_proj_weight, m.in_proj_bias).chunk(3, dim=-1))
    h = x + m.out_proj(dilated_attention_reference(q, k, v, segs, rates).flatten(2))
    want = model.norm(h + model.cross(h, mem, mem, need_weights=False)[0])
    torch.testing.assert_close(gm(x, mem), want, rtol=1e-10, atol=1e-10)
    assert isinstance(gm.attn, ConvertedMultiheadAttention) and type(gm.cross) is nn.MultiheadAttention


class Calls(nn.Module):
    def __init__(self, call, **kw):
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True, dtype=D64, **kw)
        self.call = call

    def forward(self, x):
        return self.call(self.attn, x)


@pytest.mark.parametrize("call,kw,reason", [
    (lambda m, x: m(x, x, x)[0], {}, "need_weights=True (MHA's default): dilated attention returns no attention weights; pass need_weights=False"),
    (lambda m, x: m(x, x, x, need_weights=False, attn_mask=x[0, :, :1] * x[0, :, :1].T)[0], {},
     "attn_mask without is_causal=True (an arbitrary mask) is not supported"),
    (lambda m, x: m(x, x, x, need_weights=False)[1], {}, "the attention weights output is used"),
    (lambda m, x: m(x, x, x, need_weights=False)[0], {"add_bias_kv": True}, "add_bias_kv=True is not supported"),
])
def test_refusals_keep_the_module_and_give_the_reason(call, kw, reason):
    model = Calls(call, **kw)
    gm, report = traced_and_rewritten(model)
    assert [(e.module_path, e.reason) for e in report.refused] == [("attn", reason)] and not report.rewritten
    assert type(gm.attn) is nn.MultiheadAttention


def test_one_refused_call_keeps_the_module_for_all_calls_and_strict_raises():
    model = Calls(lambda m, x: m(x, x, x, need_weights=False)[0] + m(x, x, x)[0])
    gm, report = traced_and_rewritten(model)
    assert [e.reason for e in report.refused] == [
        "another call of this module is refused",
        "need_weights=True (MHA's default): dilated attention returns no attention weights; pass need_weights=False"]
    assert type(gm.attn) is nn.MultiheadAttention
    with pytest.raises(RewriteRefused, match="at attn"):
        traced_and_rewritten(model, strict=True)


def test_select_and_argument_checks():
    gm, report = traced_and_rewritten(Block(), select=lambda p: p != "cross")
    assert [e.module_path for e in report.rewritten] == ["attn"]
    assert [(e.module_path, e.reason) for e in report.skipped] == [("cross", "not chosen by select")]
    with pytest.raises(TypeError, match="gm must be a torch.fx.GraphModule .*: got Block"):
        dilated_ops.rewrite_symbolic(Block(), [N], [1])
    with pytest.raises(ValueError, match="dilation_rates"):
        dilated_ops.rewrite_symbolic(torch.fx.symbolic_trace(Block()), [N], [0])


def test_other_key_length_raises_at_forward():
    gm, _ = traced_and_rewritten(Block())
    with pytest.raises(ValueError, match="'cross'.*another length"):
        gm(x64(2, N, 8), x64(2, 8, 8))


def test_transformer_encoder_layer_cannot_be_symbolically_traced():
    # Why the symbolic_trace pass is tested on nn.MultiheadAttention modules only: PyTorch's own
    # tracer fails on nn.TransformerEncoderLayer (its fast-path checks call
    # torch._C._nn._none_or_dtype on a Proxy; seen on torch 2.13). If this starts passing, the
    # encoder can be covered too.
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
    with pytest.raises(RuntimeError, match=r"_none_or_dtype\(\) must be None or torch.Tensor"):
        torch.fx.symbolic_trace(layer)


def test_functional_sdpa_with_example_inputs_dense_branch_equals_original():
    # The GPT-style decoder (F.scaled_dot_product_attention(is_causal=True)) through
    # symbolic_trace: with example_inputs its SDPA calls become the dilated op; one dense branch
    # equals the original, outputs and parameter gradients (float64).
    from models import GPT

    model = GPT()
    idx = torch.randint(0, 11, (2, N))
    gm, report = dilated_ops.rewrite_symbolic(torch.fx.symbolic_trace(copy.deepcopy(model)), [N], [1],
                                              example_inputs=(idx,))
    assert [e.module_path for e in report.rewritten] == ["blocks.0", "blocks.1"] and not report.refused
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.dilated.dilated_attention.default) == 2
    assert not any("scaled_dot_product" in str(t) for t in targets)
    assert_same_outputs_and_grads(model, gm, (idx,))


def test_functional_sdpa_dilated_config_equals_compile_backend_and_needs_example_inputs():
    from models import GPT

    model = GPT()
    idx = torch.randint(0, 11, (3, N))
    gm, _ = dilated_ops.rewrite_symbolic(torch.fx.symbolic_trace(copy.deepcopy(model)), [4, 8], [1, 2],
                                         example_inputs=(idx,))
    compiled = torch.compile(copy.deepcopy(model), backend=dilated_ops.backend([4, 8], [1, 2], inner="eager"),
                             fullgraph=True)
    want = compiled(idx)
    torch.testing.assert_close(gm(idx), want, rtol=1e-10, atol=1e-10)
    assert (want - model(idx)).abs().max() > 1e-3  # the dilated pattern differs from dense causal
    _, report = dilated_ops.rewrite_symbolic(torch.fx.symbolic_trace(copy.deepcopy(model)), [4, 8], [1, 2])
    assert not report.rewritten and len(report.refused) == 2
    assert all("pass example_inputs" in e.reason for e in report.refused)
    with pytest.raises(RewriteRefused, match="pass example_inputs"):
        dilated_ops.rewrite_symbolic(torch.fx.symbolic_trace(copy.deepcopy(model)), [4, 8], [1, 2], strict=True)


class WithEncoder(nn.Module):
    """An nn.TransformerEncoder inside a model: torch.fx keeps it as one call_module leaf."""

    def __init__(self):
        super().__init__()
        layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True, dtype=D64)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(8, 3, dtype=D64)

    def forward(self, x):
        return self.head(self.encoder(x))


@pytest.mark.parametrize("train", [True, False])
def test_transformer_encoder_inside_a_leaf_dense_branch_equals_original(train):
    model = WithEncoder().train(train)
    gm, report = traced_and_rewritten(model)
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["encoder", "head"]
    assert [e.module_path for e in report.rewritten] == ["encoder.layers.0.self_attn", "encoder.layers.1.self_attn"]
    assert all(isinstance(gm.get_submodule(f"encoder.layers.{i}.self_attn"), ConvertedMultiheadAttention) for i in (0, 1))
    x = x64(2, N, 8)
    if train:
        assert_same_outputs_and_grads(model, gm, (x,))
    else:
        with torch.no_grad():
            torch.testing.assert_close(gm(x), model(x), rtol=1e-10, atol=1e-10)


def test_leaf_swaps_follow_select_and_dilated_config_differs_from_dense():
    model = WithEncoder()
    gm, report = traced_and_rewritten(model, select=lambda path: path.endswith("layers.1.self_attn"))
    assert [e.module_path for e in report.rewritten] == ["encoder.layers.1.self_attn"]
    assert [e.module_path for e in report.skipped] == ["encoder.layers.0.self_attn"]
    assert type(gm.get_submodule("encoder.layers.0.self_attn")) is nn.MultiheadAttention
    gm, _ = traced_and_rewritten(model, segs=(4, 8), rates=(1, 2))
    converted, _ = dilated_ops.convert(copy.deepcopy(model), [4, 8], [1, 2])
    x = x64(2, N, 8)
    torch.testing.assert_close(gm(x), converted(x), rtol=1e-10, atol=1e-10)
    assert (gm(x) - model(x)).abs().max() > 1e-3


def test_key_padding_mask_is_converted_and_equal():
    """A bool key_padding_mask passes to the converted module (True = padding, MHA's convention)."""
    kpm = torch.zeros(2, N, dtype=torch.bool)
    kpm[1, -3:] = True
    model = Calls(lambda m, x: m(x, x, x, need_weights=False, key_padding_mask=kpm)[0])
    gm, report = traced_and_rewritten(model)
    assert [e.module_path for e in report.rewritten] == ["attn"] and not report.refused
    x = torch.randn(2, N, 8, dtype=D64)
    torch.testing.assert_close(gm(x), model(x), rtol=1e-10, atol=1e-10)
