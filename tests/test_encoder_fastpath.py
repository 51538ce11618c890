"""nn.TransformerEncoderLayer's fused eval fast path (eval + no_grad: one
torch._transformer_encoder_layer_fwd node per layer in the Dynamo graph) expanded by
dilated_ops.fx_passes.encoder_fastpath into the decomposed layer around the dilated op."""
import copy

import pytest
import torch
import torch.nn.functional as F
from expecttest import assert_expected_inline
from torch import nn

import dilated_ops
from dilated_ops.kernels.reference import dilated_attention_reference
from models import call_targets

N = 16
FUSED = torch._transformer_encoder_layer_fwd
OP = torch.ops.dilated.dilated_attention.default


pytestmark = pytest.mark.usefixtures("reset_dynamo")


def encoder(activation="relu", norm_first=False, dtype=torch.float64, heads=2, layers=2):
    layer = nn.TransformerEncoderLayer(8, heads, 16, dropout=0.0, batch_first=True, dtype=dtype,
                                       activation=activation, norm_first=norm_first)
    return nn.TransformerEncoder(layer, layers, enable_nested_tensor=False).eval()


def compiled(model, be):
    return torch.compile(copy.deepcopy(model), backend=be, fullgraph=True)


def test_dynamo_emits_the_fused_node_in_eval_under_no_grad():
    # The premise of the pass, on this torch version: without rewriting, the graph holds the fused node.
    graphs = []
    with torch.no_grad():
        torch.compile(encoder(), backend=lambda gm, ex: graphs.append(gm) or gm, fullgraph=True)(torch.randn(2, N, 8, dtype=torch.float64))
    assert [n.target for n in graphs[0].graph.nodes if n.op == "call_function"] == [FUSED, FUSED]


@pytest.mark.parametrize("activation", ["relu", "gelu"])
@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_dense_branch_equals_uncompiled(activation, norm_first, dtype, tol):
    model = encoder(activation, norm_first, dtype)
    be = dilated_ops.backend([N], [1], inner="aot_eager")
    x = torch.randn(2, N, 8, dtype=dtype)
    with torch.no_grad():
        got, want = compiled(model, be)(x), model(x)
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    assert [(e.kind, e.module_path) for e in be.report.rewritten] == [
        ("_transformer_encoder_layer_fwd", "layers.0"), ("_transformer_encoder_layer_fwd", "layers.1")]
    assert not be.report.refused


def test_inductor_float32():
    model = encoder("gelu", True, torch.float32)
    x = torch.randn(3, N, 8)
    with torch.no_grad():
        got = compiled(model, dilated_ops.backend([N], [1], inner="inductor"))(x)
        torch.testing.assert_close(got, model(x), rtol=1e-5, atol=1e-5)


def test_explain_zero_graph_breaks():
    with torch.no_grad():
        explanation = torch._dynamo.explain(torch.compile(encoder(), backend=dilated_ops.backend([N], [1], inner="aot_eager")))(
            torch.randn(2, N, 8, dtype=torch.float64))
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1


@pytest.mark.parametrize("norm_first", [False, True])
def test_rewritten_graph_pinned(norm_first):
    graphs = []
    be = dilated_ops.backend([N], [1], inner=lambda gm, ex: graphs.append(gm) or gm)
    with torch.no_grad():
        torch.compile(encoder(norm_first=norm_first, layers=1), backend=be, fullgraph=True)(torch.randn(2, N, 8, dtype=torch.float64))
    text = call_targets(graphs[0])
    assert "_transformer_encoder_layer_fwd" not in text and "scaled_dot_product" not in text
    if norm_first:
        assert_expected_inline(text, """\
layer_norm
linear
chunk
getitem
getitem
getitem
unflatten
unflatten
unflatten
dilated.dilated_attention.default
getitem
flatten
linear
add
layer_norm
linear
relu
linear
add""")
    else:
        assert_expected_inline(text, """\
linear
chunk
getitem
getitem
getitem
unflatten
unflatten
unflatten
dilated.dilated_attention.default
getitem
flatten
linear
add
layer_norm
linear
relu
linear
add
layer_norm""")


@pytest.mark.parametrize("norm_first", [False, True])
def test_real_dilated_config_equals_hand_built_layer(norm_first):
    n, segs, rates = 32, [8, 16], [1, 2]
    model = encoder("gelu", norm_first, heads=4, layers=1)
    x = torch.randn(2, n, 8, dtype=torch.float64)
    with torch.no_grad():
        got = compiled(model, dilated_ops.backend(segs, rates, inner="aot_eager"))(x)
        lay = model.layers[0]
        m = lay.self_attn

        def attn(y):
            q, k, v = (t.unflatten(-1, (4, 2)) for t in F.linear(y, m.in_proj_weight, m.in_proj_bias).chunk(3, dim=-1))
            return m.out_proj(dilated_attention_reference(q, k, v, segs, rates).flatten(2))

        def ffn(y):
            return lay.linear2(F.gelu(lay.linear1(y)))

        if norm_first:
            h = x + attn(lay.norm1(x))
            want = h + ffn(lay.norm2(h))
        else:
            h = lay.norm1(x + attn(x))
            want = lay.norm2(h + ffn(h))
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
        assert (got - model(x)).abs().max() > 1e-3  # it is not dense attention


def test_mask_is_refused_and_left_as_it_is():
    model = encoder()
    mask = nn.Transformer.generate_square_subsequent_mask(N, dtype=torch.float64)
    be = dilated_ops.backend([N], [1], inner="aot_eager")
    x = torch.randn(2, N, 8, dtype=torch.float64)
    with torch.no_grad():
        got = compiled(model, be)(x, mask=mask, is_causal=True)
        torch.testing.assert_close(got, model(x, mask=mask, is_causal=True))
    assert not be.report.rewritten
    assert [(e.module_path, e.reason.split(" reaches")[0]) for e in be.report.refused] == [
        ("layers.0", "a mask (src_mask or src_key_padding_mask)"), ("layers.1", "a mask (src_mask or src_key_padding_mask)")]
    torch._dynamo.reset()
    with pytest.raises(Exception, match="without the is_causal hint"), torch.no_grad():
        compiled(model, dilated_ops.backend([N], [1], inner="aot_eager", strict=True))(x, mask=mask, is_causal=True)


def test_too_few_heads_refused_and_select_skips():
    # (The fast path needs an even head count, so 2 heads against 3 groups.)
    be = dilated_ops.backend([4, 8, 16], [1, 2, 4], inner="aot_eager", select=lambda p: p != "layers.1")
    model = encoder(heads=2)
    x = torch.randn(2, N, 8, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(compiled(model, be)(x), model(x))
    assert [str(e) for e in be.report.refused] == [
        "_transformer_encoder_layer_fwd at layers.0 (node output): 2 heads cannot cover 3 dilation groups (mode 'groups')"]
    assert [e.module_path for e in be.report.skipped] == ["layers.1"]


@pytest.mark.skipif(torch.__version__ < (2, 13), reason=(
    "torch 2.11 has no fake kernel for aten::_transformer_encoder_layer_fwd, so Dynamo itself "
    "cannot trace the eval fast path with dynamic shapes (Unsupported before any backend runs)"))
def test_dynamic_sequence_length_equals_converted_model():
    # The expansion uses no sizes but embed_dim/num_heads, so dynamic=True works; compared with
    # dilated_ops.convert of the same model (the ordinary path around the same op). Segments of 4
    # so that every length differs from dense attention. Under dynamic=True the first graph gets
    # eps as a SymFloat graph input (Dynamo specializes it on a restart): rewritten too.
    model = encoder()
    converted, _ = dilated_ops.convert(copy.deepcopy(model), [4], [1])
    be = dilated_ops.backend([4], [1], inner="aot_eager")
    fn = torch.compile(copy.deepcopy(model), backend=be, dynamic=True, fullgraph=True)
    with torch.no_grad():
        for n in (8, 12, 20):
            x = torch.randn(2, n, 8, dtype=torch.float64)
            torch.testing.assert_close(fn(x), converted(x), rtol=1e-10, atol=1e-10)
            assert (fn(x) - model(x)).abs().max() > 1e-3
    assert be.reports and all(len(r.rewritten) == 2 and not r.refused for r in be.reports)
