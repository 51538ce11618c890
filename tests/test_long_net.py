"""LongNet, LongNetLM and their layers: structure, causality, compile (fullgraph) and export of a
2-layer LongNet matching eager, one dilated op node per attention call."""
import math

import pytest
import torch
import torch._functorch.config
import torch._inductor.config
import torch._inductor.exc
import torch.nn.functional as F

import dilated_ops
from dilated_ops import DilatedTransformerDecoderLayer, DilatedTransformerEncoderLayer, LongNet, LongNetLM

SMALL = dict(d_model=32, nhead=4, dim_feedforward=48, segment_lengths=[8, 16], dilation_rates=[1, 2])
DILATED_OP = torch.ops.dilated.dilated_attention.default


@pytest.fixture(autouse=True)
def _reset_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture
def no_compile_caches():
    """Compile for real: a cached artifact of an earlier graph of the same text (made before an
    op schema change, say) would hide a lowering error."""
    with torch._inductor.config.patch(fx_graph_cache=False), \
            torch._functorch.config.patch(enable_autograd_cache=False):
        yield


def two_layer_longnet(**kw):
    return LongNet(num_encoder_layers=1, num_decoder_layers=1, **SMALL, **kw).eval()


def test_shapes_and_magneto_gammas():
    m = LongNet(num_encoder_layers=2, num_decoder_layers=3, **SMALL)
    # MAGNETO, encoder-decoder (Fig. 2 of https://arxiv.org/abs/2210.06423), M=2 encoder, N=3 decoder layers
    enc_gamma = math.sqrt(math.log(3 * 3) * math.log(2 * 2) / 3)
    dec_gamma = math.sqrt(math.log(3 * 3))
    assert [layer.self_attn.gamma_init for layer in m.encoder.layers] == [enc_gamma] * 2
    assert [layer.self_attn.gamma_init for layer in m.decoder.layers] == [dec_gamma] * 3
    x = torch.randn(2, 40, 32)
    assert m(x).shape == x.shape
    # each layer initialised on its own (not deep copies of one)
    w = [layer.self_attn.q_proj.weight for layer in m.encoder.layers]
    assert not torch.equal(w[0], w[1])


def test_layers_are_sub_ln_over_multihead_dilated_attention():
    enc = DilatedTransformerEncoderLayer(**SMALL, dropout=0.0)
    dec = DilatedTransformerDecoderLayer(**SMALL, dropout=0.0)
    assert isinstance(enc.self_attn, dilated_ops.MultiheadDilatedAttention) and enc.self_attn.norm is not None
    assert isinstance(dec.self_attn, dilated_ops.MultiheadDilatedAttention) and dec.self_attn.norm is None
    x = torch.randn(2, 24, 32)
    h = enc.norm1(x)
    attn = x + enc.self_attn(h, h, h)[0]
    ff = enc.ff
    want = attn + ff.linear2(ff.norm_mid(F.relu(ff.linear1(ff.norm_in(attn)))))
    torch.testing.assert_close(enc(x), want)


def test_decoder_cross_attention_takes_memory_of_another_length():
    dec = DilatedTransformerDecoderLayer(**SMALL, dropout=0.0)
    tgt, memory = torch.randn(2, 24, 32), torch.randn(2, 40, 32)
    out = dec(tgt, memory, tgt_is_causal=True)
    assert out.shape == tgt.shape
    changed = dec(tgt, memory + torch.randn_like(memory), tgt_is_causal=True)
    assert (out - changed).abs().max() > 1e-4  # memory is read


@pytest.mark.parametrize("is_causal", [True, False])
def test_longnet_lm_is_causal(is_causal):
    torch.manual_seed(0)
    lm = LongNetLM(num_tokens=50, num_encoder_layers=1, num_decoder_layers=1, **SMALL).eval()
    tokens = torch.randint(0, 50, (2, 40))
    logits = lm(tokens, is_causal=is_causal)
    assert logits.shape == (2, 40, 50)
    edited = tokens.clone()
    edited[:, 25:] = (edited[:, 25:] + 1) % 50
    logits2 = lm(edited, is_causal=is_causal)
    prefix_change = (logits[:, :25] - logits2[:, :25]).abs().max()
    if is_causal:
        assert prefix_change < 1e-5
    else:
        assert prefix_change > 1e-3  # the check can fail: without causality the prefix sees the edit
    assert (logits[:, 25:] - logits2[:, 25:]).abs().max() > 1e-3


def test_bad_activation_and_layer_counts():
    with pytest.raises(ValueError, match="activation must be 'relu', 'gelu' or a callable: got 'swish'"):
        DilatedTransformerEncoderLayer(**SMALL, activation="swish")
    with pytest.raises(ValueError, match="num_decoder_layers must be a positive int: got 0"):
        LongNet(num_encoder_layers=1, num_decoder_layers=0, **SMALL)


def dilated_nodes(graph):
    return [n for n in graph.nodes if n.op == "call_function" and n.target == DILATED_OP]


# float64 keeps inductor's reordered arithmetic far below the tolerances; torch 2.11's Inductor
# hands the CPU flash SDPA backward (the decoder's dense cross-attention) a float32 lse for
# float64 inputs and fails (seen on the GPU machine), so older torch compares in float32.
_COMPILE_DTYPE, _COMPILE_TOL = (
    (torch.float64, dict(rtol=1e-9, atol=1e-10))
    if torch.__version__ >= (2, 13)
    else (torch.float32, dict(rtol=1e-4, atol=1e-4))  # some bias gradients are 0 up to rounding
)


def test_compile_fullgraph_matches_eager(no_compile_caches):
    torch.manual_seed(0)
    model = two_layer_longnet(dtype=_COMPILE_DTYPE)
    x = torch.randn(2, 40, 32, dtype=_COMPILE_DTYPE, requires_grad=True)
    eager = model(x)
    compiled = torch.compile(model, fullgraph=True)
    got = compiled(x)
    torch.testing.assert_close(got, eager, **_COMPILE_TOL)
    g = torch.randn_like(eager)
    params = (x,) + tuple(model.parameters())
    for a, b in zip(torch.autograd.grad(got, params, g), torch.autograd.grad(eager, params, g)):
        torch.testing.assert_close(a, b, **_COMPILE_TOL)


def test_export_one_dilated_node_per_attention_call_and_matches_eager():
    torch.manual_seed(0)
    model = two_layer_longnet()
    x = torch.randn(2, 40, 32)
    ep = torch.export.export(model, (x,))
    # one dilated self-attention per encoder and per decoder layer; the cross-attention is SDPA
    assert len(dilated_nodes(ep.graph)) == len(model.encoder.layers) + len(model.decoder.layers)
    torch.testing.assert_close(ep.module()(x), model(x))
    other = torch.randn(2, 40, 32)
    torch.testing.assert_close(ep.module()(other), model(other))


def test_export_dynamic_sequence_length():
    model = two_layer_longnet()
    seq = torch.export.Dim("seq", min=2, max=1024)
    ep = torch.export.export(model, (torch.randn(2, 40, 32),), dynamic_shapes=({1: seq},))
    for n in (17, 64):
        x = torch.randn(2, n, 32)
        torch.testing.assert_close(ep.module()(x), model(x))


def test_compile_improved_with_inductor(no_compile_caches):
    model = two_layer_longnet(attention_type="improved")
    x = torch.randn(2, 40, 32)
    torch.testing.assert_close(torch.compile(model, fullgraph=True)(x), model(x))
