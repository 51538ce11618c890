"""Module swapping (dilated_ops.convert) and export (dilated_ops.export): nn.MultiheadAttention
modules become in-proj + torch.ops.dilated.dilated_attention + out-proj on the same Parameters."""
import copy
import io

import pytest
import torch
import torch.nn.functional as F
from expecttest import assert_expected_inline
from torch import nn

import dilated_ops
from dilated_ops import ConvertedMultiheadAttention
from dilated_ops.fx_passes import RewriteRefused

from models import SelfMHA, assert_same_outputs_and_grads, encoder, x64
from dilated_ops.kernels.reference import dilated_attention_reference

D64 = torch.float64
N = 16
OP = torch.ops.dilated.dilated_attention.default


class KdimMHA(nn.Module):
    """kdim/vdim != embed_dim: MHA's separate q/k/v_proj_weight."""

    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, kdim=6, vdim=4, batch_first=True, dtype=D64)

    def forward(self, x, k, v):
        return self.attn(x, k, v, need_weights=False)[0]


def check_same(model, inputs, grad=True, **kwargs):
    """convert (dense branch) of a deep copy equals the original: output and parameter grads."""
    converted, report = dilated_ops.convert(copy.deepcopy(model), [N], [1])
    assert report.rewritten and not report.refused
    out, got = model(*inputs, **kwargs), converted(*inputs, **kwargs)
    torch.testing.assert_close(got, out, rtol=1e-10, atol=1e-10)
    if grad:
        g = torch.randn_like(out)
        out.backward(g)
        got.backward(g)
        for (name, p), q in zip(model.named_parameters(), converted.parameters()):
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-10, atol=1e-10, msg=name)
    return converted, report


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_mha_dense_branch_equals_original(batch_first, bias):
    converted, report = check_same(SelfMHA(batch_first, bias), (x64(3, N, 8),))
    assert isinstance(converted.attn, ConvertedMultiheadAttention)
    assert [e.module_path for e in report.rewritten] == ["attn"]


def test_separate_projection_weights_dense_branch_equals_original():
    converted, _ = check_same(KdimMHA(), (x64(3, N, 8), x64(3, N, 6), x64(3, N, 4)))
    assert converted.attn.in_proj_weight is None and converted.attn.q_proj_weight is not None


@pytest.mark.parametrize("train", [True, False])
def test_transformer_encoder_dense_branch_equals_original(train):
    model = encoder().train(train)
    converted, report = check_same(model, (x64(2, N, 8),))
    assert [e.module_path for e in report.rewritten] == ["layers.0.self_attn", "layers.1.self_attn"]
    # eval + no_grad: the original takes its fused fast path, the converted one the normal path.
    with torch.no_grad():
        x = x64(2, N, 8)
        torch.testing.assert_close(converted(x), model(x), rtol=1e-10, atol=1e-10)
    if not train:  # the converted layers ran our op, not torch._transformer_encoder_layer_fwd
        ep = torch.export.export(converted, (x64(2, N, 8),))
        targets = {n.target for n in ep.graph.nodes}
        assert OP in targets and torch.ops.aten._transformer_encoder_layer_fwd.default not in targets


def test_causal_encoder_dense_branch_equals_original():
    mask = nn.Transformer.generate_square_subsequent_mask(N, dtype=D64)
    check_same(encoder(), (x64(2, N, 8),), mask=mask, is_causal=True)


def test_real_dilated_config_equals_reference():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 4, batch_first=True, dtype=D64)
    seg, dil = [4, 8], [1, 2]
    x = x64(2, N, 8).requires_grad_()
    conv, _ = dilated_ops.convert(copy.deepcopy(mha), seg, dil)
    got = conv(x, x, x, need_weights=False, is_causal=True)[0]
    qkv = F.linear(x, mha.in_proj_weight, mha.in_proj_bias).chunk(3, dim=-1)
    q, k, v = (t.unflatten(-1, (4, 2)) for t in qkv)
    ref = mha.out_proj(dilated_attention_reference(q, k, v, seg, dil, "groups", is_causal=True).flatten(2))
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(ref)
    gx_got, *gp_got = torch.autograd.grad(got, [x, *conv.parameters()], g)
    gx_ref, *gp_ref = torch.autograd.grad(ref, [x, *mha.parameters()], g)
    torch.testing.assert_close(gx_got, gx_ref, rtol=1e-10, atol=1e-10)
    for a, b in zip(gp_got, gp_ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_parameters_are_shared_and_state_dict_keys_unchanged():
    model = encoder()
    before = dict(model.named_parameters())
    keys = list(model.state_dict())
    converted, _ = dilated_ops.convert(model, [N], [1])
    assert converted is model
    after = dict(converted.named_parameters())
    assert after.keys() == before.keys() and all(after[n] is before[n] for n in before)
    assert list(converted.state_dict()) == keys


def test_top_level_mha_and_shared_module():
    mha = nn.MultiheadAttention(8, 2, dtype=D64)
    conv, report = dilated_ops.convert(mha, [N], [1])
    assert isinstance(conv, ConvertedMultiheadAttention) and conv.in_proj_weight is mha.in_proj_weight
    assert [e.module_path for e in report.rewritten] == [""]
    shared = nn.ModuleDict({"a": mha, "b": mha})
    dilated_ops.convert(shared, [N], [1])
    assert shared["a"] is shared["b"]


def test_refusals_reported_kept_and_strict_raises():
    model = nn.ModuleDict({
        "kv": nn.MultiheadAttention(8, 2, add_bias_kv=True),
        "zero": nn.MultiheadAttention(8, 2, add_zero_attn=True),
        "one_head": nn.MultiheadAttention(8, 1),
        "ok": nn.MultiheadAttention(8, 2),
        "unselected": nn.MultiheadAttention(8, 2),
    })
    _, report = dilated_ops.convert(model, [4, 8], [1, 2], select=lambda p: p != "unselected")
    assert assert_reasons(report) == [
        "nn.MultiheadAttention at kv: add_bias_kv=True is not supported",
        "nn.MultiheadAttention at zero: add_zero_attn=True is not supported",
        "nn.MultiheadAttention at one_head: 1 heads cannot cover 2 dilation groups (mode 'groups')",
    ]
    assert [str(e) for e in report.rewritten] == ["nn.MultiheadAttention at ok"]
    assert [e.module_path for e in report.skipped] == ["unselected"]
    kept = [n for n, m in model.items() if type(m) is nn.MultiheadAttention]
    assert kept == ["kv", "zero", "one_head", "unselected"]
    with pytest.raises(RewriteRefused, match="add_bias_kv"):
        dilated_ops.convert(nn.Sequential(nn.MultiheadAttention(8, 2, add_bias_kv=True)), [N], [1], strict=True)


def assert_reasons(report):
    return [str(e) for e in report.refused]


def test_forward_refusals_name_the_module():
    model, _ = dilated_ops.convert(nn.ModuleDict({"attn": nn.MultiheadAttention(8, 2)}), [N], [1])
    attn, x = model["attn"], torch.randn(N, 2, 8)
    with pytest.raises(ValueError, match="'attn'.*need_weights=True"):
        attn(x, x, x)
    with pytest.raises(ValueError, match="'attn'.*a torch.float32 key_padding_mask .*pass a bool mask"):
        attn(x, x, x, need_weights=False, key_padding_mask=torch.zeros(2, N))
    with pytest.raises(ValueError, match="'attn'.*attn_mask without is_causal"):
        attn(x, x, x, need_weights=False, attn_mask=torch.zeros(N, N))
    with pytest.raises(ValueError, match="'attn'.*another length"):
        attn(x, x[:4], x[:4], need_weights=False)


def test_encoder_program_has_one_dilated_node_per_call_and_no_sdpa():
    model = encoder().eval()
    x = x64(2, N, 8)
    ep = dilated_ops.export(model, (x,), segment_lengths=[N], dilation_rates=[1])
    targets = [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]
    attention = [t for t in targets if "attention" in t or "transformer_encoder" in t]
    assert_expected_inline("\n".join(attention), """\
dilated.dilated_attention.default
dilated.dilated_attention.default""")
    assert [str(e) for e in ep.dilated_ops_report.rewritten] == [
        "nn.MultiheadAttention at layers.0.self_attn", "nn.MultiheadAttention at layers.1.self_attn"]
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(x), model(x), rtol=1e-10, atol=1e-10)
    assert type(model.layers[0].self_attn) is nn.MultiheadAttention  # the model passed in is kept


def test_encoder_program_equals_original_with_parameter_grads():
    # Train and eval mode: the exported program's output and parameter gradients (through
    # the unlifted module) equal the original's with one dense branch.
    for train in (True, False):
        model = encoder().train(train)
        x = x64(2, N, 8)
        ep = dilated_ops.export(model, (x,), segment_lengths=[N], dilation_rates=[1])
        assert sum(n.target == OP for n in ep.graph.nodes) == 2
        exported = ep.module()
        assert_same_outputs_and_grads(model, exported, (x,))


def test_save_load_round_trip():
    model = SelfMHA(batch_first=True).eval()
    x = x64(2, N, 8)
    ep = dilated_ops.export(model, (x,), segment_lengths=[4, 8], dilation_rates=[1, 2])
    buf = io.BytesIO()
    torch.export.save(ep, buf)
    buf.seek(0)
    loaded = torch.export.load(buf)
    assert sum(n.target == OP for n in loaded.graph.nodes) == 1
    torch.testing.assert_close(loaded.module()(x), ep.module()(x), rtol=0, atol=0)


def test_dynamic_batch_after_conversion():
    # PyTorch issue #156681: nn.MultiheadAttention with a dynamic batch fails on the fast path.
    model = SelfMHA(batch_first=True).eval()
    batch = torch.export.Dim("batch", min=1, max=64)
    ep = dilated_ops.export(model, (x64(2, N, 8),), segment_lengths=[N], dilation_rates=[1],
                            dynamic_shapes=({0: batch},))
    for b in (1, 5):
        x = x64(b, N, 8)
        with torch.no_grad():
            torch.testing.assert_close(ep.module()(x), model(x), rtol=1e-10, atol=1e-10)


def test_functional_sdpa_is_rewritten_too():
    # After module swapping, export runs the ATen pass (dilated_ops.rewrite_exported) on the
    # SDPA nodes left: functional calls are rewritten; refused ones stay, strict raises.
    class Sdpa(nn.Module):
        def forward(self, q, mask=None):
            return F.scaled_dot_product_attention(q, q, q, attn_mask=mask)

    q = x64(1, 2, N, 4)
    ep = dilated_ops.export(Sdpa(), (q,), segment_lengths=[N], dilation_rates=[1])
    assert [e.kind for e in ep.dilated_ops_report.rewritten] == ["scaled_dot_product_attention"]
    assert sum(n.target == OP for n in ep.graph.nodes) == 1
    torch.testing.assert_close(ep.module()(q), F.scaled_dot_product_attention(q, q, q), rtol=1e-10, atol=1e-10)
    with pytest.raises(RewriteRefused, match="float attn_mask"):
        dilated_ops.export(Sdpa(), (q, x64(N, N)), segment_lengths=[N], dilation_rates=[1], strict=True)


@pytest.mark.parametrize("batched", [True, False])
def test_key_padding_mask_equals_mha(batched):
    """A bool key_padding_mask (True = padding, MHA's convention), batched and unbatched, with and
    without the causal mask: output and gradients equal nn.MultiheadAttention's (one dense branch)."""
    torch.manual_seed(3)
    mha = nn.MultiheadAttention(8, 2, batch_first=True, dtype=torch.float64)
    converted, _ = dilated_ops.convert(copy.deepcopy(mha), [N], [1])
    x = torch.randn(2, N, 8, dtype=torch.float64) if batched else torch.randn(N, 8, dtype=torch.float64)
    kpm = torch.zeros(2, N, dtype=torch.bool) if batched else torch.zeros(N, dtype=torch.bool)
    kpm[..., -3:] = True
    if batched:
        kpm[0] = False
    for causal in (False, True):
        mask = torch.ones(N, N, dtype=torch.bool).triu(1) if causal else None
        kw = dict(key_padding_mask=kpm, need_weights=False, attn_mask=mask, is_causal=causal)
        want, got = mha(x, x, x, **kw)[0], converted(x, x, x, **kw)[0]
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
        g = torch.randn_like(want)
        dw = torch.autograd.grad(want, mha.in_proj_weight, g)[0]
        dg = torch.autograd.grad(got, converted.in_proj_weight, g)[0]
        torch.testing.assert_close(dg, dw, rtol=1e-10, atol=1e-10)
