"""The modules against the float64 reference: DilatedAttention directly, MultiheadDilatedAttention
against a hand-written composition (projections + reference + layer norm + out projection)."""
import math
import re

import pytest
import torch
import torch.nn.functional as F

import dilated_ops
from dilated_ops.kernels.reference import dilated_attention_reference

from conftest import random_configs

DILATED = [dilated_ops.DilatedAttention, dilated_ops.ImprovedDilatedAttention, dilated_ops.RingDilatedAttention]
MULTIHEAD = [
    dilated_ops.MultiheadDilatedAttention,
    dilated_ops.ImprovedMultiheadDilatedAttention,
    dilated_ops.RingMultiheadDilatedAttention,
]
# The op itself is checked against the reference at length in test_dilated_attention.py; here a
# few configurations show the modules pass their options through unchanged.
CONFIGS = [c for c in random_configs(8, seed=11) if c[2] >= len(c[4])][:4]


def rand(*shape):
    return torch.randn(*shape, dtype=torch.float64)


@pytest.mark.parametrize("cls", DILATED, ids=lambda c: c.__name__)
@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"b{c[0]}n{c[1]}h{c[2]}d{c[3]}w{c[4]}r{c[5]}")
def test_dilated_attention_groups_matches_reference(cls, is_causal, config):
    b, n, h, d, segs, rates = config
    module = cls(segs, rates)
    q, k, v = (rand(b, n, h, d).requires_grad_() for _ in range(3))
    out = module(q, k, v, is_causal=is_causal)
    ref = dilated_attention_reference(q, k, v, segs, rates, mode="groups", is_causal=is_causal)
    assert out.shape == (b, n, h, d)
    assert (out - ref).abs().max() < 1e-10
    g = rand(b, n, h, d)
    for got, want in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g)):
        assert (got - want).abs().max() < 1e-10


def test_mode_longnet_passes_through():
    b, n, h, d, segs, rates = 2, 50, 3, 8, [4, 8, 16], [1, 2, 4]
    q, k, v = (rand(b, n, h, d) for _ in range(3))
    out = dilated_ops.DilatedAttention(segs, rates, mode="longnet")(q, k, v)
    ref = dilated_attention_reference(q, k, v, segs, rates, mode="longnet")
    assert (out - ref).abs().max() < 1e-10
    groups = dilated_attention_reference(q, k, v, segs, rates, mode="groups")
    assert (out - groups).abs().max() > 1e-3  # the modes differ: the option reached the op


def test_dropout_only_in_training():
    q, k, v = (rand(2, 32, 4, 8) for _ in range(3))
    module = dilated_ops.DilatedAttention([8, 16], [1, 2], dropout=0.5)
    plain = dilated_attention_reference(q, k, v, [8, 16], [1, 2])
    module.eval()
    assert (module(q, k, v) - plain).abs().max() < 1e-10
    module.train()
    torch.manual_seed(3)
    first = module(q, k, v)
    torch.manual_seed(3)
    again = module(q, k, v)
    assert torch.equal(first, again)
    assert (first - plain).abs().max() > 1e-3


def hand_written_multihead(m, query, key, value, is_causal, segs, rates, padded=None):
    """What MultiheadDilatedAttention computes, from its parameters, written out (batch first);
    ``padded``: nn.MultiheadAttention's key_padding_mask (True = padding)."""
    b, n, e = query.shape
    h = m.num_heads
    q = F.linear(query, m.q_proj.weight, m.q_proj.bias).reshape(b, n, h, e // h)
    k = F.linear(key, m.k_proj.weight, m.k_proj.bias).reshape(b, n, h, e // h)
    v = F.linear(value, m.v_proj.weight, m.v_proj.bias).reshape(b, n, h, e // h)
    x = dilated_attention_reference(q, k, v, segs, rates, mode="groups", is_causal=is_causal,
                                    key_padding_mask=None if padded is None else ~padded).reshape(b, n, e)
    if m.norm is not None:
        x = F.layer_norm(x, (e,), m.norm.weight, m.norm.bias, m.norm.eps)
    return F.linear(x, m.out_proj.weight, m.out_proj.bias)


MULTIHEAD_CASES = [(cls, True, False, True) for cls in MULTIHEAD] + [
    (dilated_ops.MultiheadDilatedAttention, True, True, True),
    (dilated_ops.MultiheadDilatedAttention, False, True, True),
    (dilated_ops.MultiheadDilatedAttention, True, True, False),
]


@pytest.mark.parametrize("cls, layer_norm, is_causal, batch_first", MULTIHEAD_CASES,
                         ids=lambda x: x.__name__ if isinstance(x, type) else str(x))
def test_multihead_matches_hand_written_composition(cls, layer_norm, is_causal, batch_first):
    segs, rates = [8, 16, 32], [1, 2, 4]
    m = cls(embed_dim=40, num_heads=5, segment_lengths=segs, dilation_rates=rates, layer_norm=layer_norm,
            gamma_init=1.7, dtype=torch.float64, batch_first=batch_first)
    with torch.no_grad():  # non-trivial norm and biases, so every parameter matters
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    query, key, value = (rand(2, 45, 40).requires_grad_() for _ in range(3))
    if batch_first:
        out, weights = m(query, key, value, is_causal=is_causal)
    else:
        out, weights = m(*(t.transpose(0, 1) for t in (query, key, value)), is_causal=is_causal)
        out = out.transpose(0, 1)
    assert weights is None
    want = hand_written_multihead(m, query, key, value, is_causal, segs, rates)
    assert (out - want).abs().max() < 1e-10
    inputs = (query, key, value) + tuple(m.parameters())
    g = rand(*out.shape)
    for got_g, want_g in zip(torch.autograd.grad(out, inputs, g), torch.autograd.grad(want, inputs, g)):
        assert (got_g - want_g).abs().max() < 1e-10


@pytest.mark.parametrize("cls", MULTIHEAD, ids=lambda c: c.__name__)
def test_multihead_key_padding_mask_in_nn_multihead_attention_convention(cls):
    """key_padding_mask True = padding (nn.MultiheadAttention's convention), a fully padded
    batch row; against the hand-written composition, forward and backward;
    and, for one dense branch without the norm, against nn.MultiheadAttention itself at the rows
    it defines (it gives NaN for the fully padded row)."""
    segs, rates = [8, 16, 32], [1, 2, 4]
    m = cls(embed_dim=40, num_heads=5, segment_lengths=segs, dilation_rates=rates, dtype=torch.float64)
    padded = torch.rand(3, 45) < 0.3
    padded[2] = True
    query = rand(3, 45, 40).requires_grad_()
    out, _ = m(query, is_causal=True, key_padding_mask=padded)
    want = hand_written_multihead(m, query, query, query, True, segs, rates, padded)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)
    g = rand(*out.shape)
    params = (query,) + tuple(m.parameters())
    for x, y in zip(torch.autograd.grad(out, params, g), torch.autograd.grad(want, params, g)):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-10)

    dense = cls(embed_dim=40, num_heads=5, segment_lengths=[45], dilation_rates=[1], layer_norm=False,
                dtype=torch.float64)
    mha = torch.nn.MultiheadAttention(40, 5, batch_first=True, dtype=torch.float64)
    with torch.no_grad():
        for p in dense.parameters():  # non-zero biases, so the padded row's output is not 0
            p.add_(0.1 * torch.randn_like(p))
        mha.in_proj_weight.copy_(torch.cat([dense.q_proj.weight, dense.k_proj.weight, dense.v_proj.weight]))
        mha.in_proj_bias.copy_(torch.cat([dense.q_proj.bias, dense.k_proj.bias, dense.v_proj.bias]))
        mha.out_proj.weight.copy_(dense.out_proj.weight)
        mha.out_proj.bias.copy_(dense.out_proj.bias)
    x = query.detach()
    theirs, _ = mha(x, x, x, key_padding_mask=padded, need_weights=False)
    ours, _ = dense(x, key_padding_mask=padded)
    torch.testing.assert_close(ours[:2], theirs[:2], rtol=1e-10, atol=1e-10)
    # the fully padded row: attention 0, so the output projection's bias (torch versions differ
    # for nn.MultiheadAttention there: NaN or the same)
    torch.testing.assert_close(ours[2], dense.out_proj.bias.expand(45, 40), rtol=0, atol=0)


def test_magneto_init():
    gamma = 3.0
    m = dilated_ops.MultiheadDilatedAttention(256, 8, segment_lengths=[16], dilation_rates=[1], gamma_init=gamma)
    xavier = math.sqrt(2.0 / (256 + 256))
    for name, gain in (("q_proj", 1.0), ("k_proj", 1.0), ("v_proj", gamma), ("out_proj", gamma)):
        proj = getattr(m, name)
        assert abs(proj.weight.std().item() / (gain * xavier) - 1) < 0.05, name
        assert torch.equal(proj.bias, torch.zeros_like(proj.bias))
    assert list(m.buffers()) == []


def test_multihead_v020_positional_order():
    # v0.2.0: (embed_dim, num_heads, dilation_rates, segment_lengths, ...)
    m = dilated_ops.MultiheadDilatedAttention(32, 4, [1, 2], [8, 16])
    assert m.attention_config.dilation_rates == (1, 2) and m.attention_config.segment_lengths == (8, 16)


MH_ERRORS = [
    (dict(attn_mask=torch.zeros(16, 16)), (2, 16, 32), (2, 16, 32), ValueError,
     "attn_mask is not supported by dilated attention: got a tensor of shape (16, 16); use is_causal=True for causal "
     "masking and key_padding_mask for padding"),
    (dict(key_padding_mask=torch.zeros(2, 16)), (2, 16, 32), (2, 16, 32), TypeError,
     "key_padding_mask must be a bool tensor (batch, seq), True = padding as in nn.MultiheadAttention: got "
     "torch.float32"),
    ({}, (2, 16, 32), (2, 12, 32), ValueError,
     "key and value must have query's shape (batch, seq, embed_dim): got query (2, 16, 32), key (2, 12, 32), value (2, 12, 32) (cross-attention with another key length is not supported by dilated attention)"),
    ({}, (2, 16, 24), (2, 16, 24), ValueError, "query's last dim must be embed_dim (32): got shape (2, 16, 24)"),
    ({}, (16, 32), (16, 32), ValueError, "query must be 3-D (batch, seq, embed_dim): got shape (16, 32)"),
]


@pytest.mark.parametrize("kwargs, qshape, kvshape, exc, message", MH_ERRORS)
def test_multihead_input_errors(kwargs, qshape, kvshape, exc, message):
    m = dilated_ops.MultiheadDilatedAttention(32, 4, [1, 2], [8, 16])
    query, kv = torch.randn(qshape), torch.randn(kvshape)
    with pytest.raises(exc, match="^" + re.escape(message) + "$"):
        m(query, kv, kv, **kwargs)


def test_dilated_attention_mask_error_and_op_errors_reach_the_user():
    a = dilated_ops.DilatedAttention([8, 16, 32], [1, 2, 4])
    q = torch.randn(1, 16, 2, 8)
    with pytest.raises(ValueError, match="use is_causal=True"):
        a(q, q, q, attention_mask=torch.ones(16, 16))
    with pytest.raises(ValueError, match=re.escape("num_heads (2) must be >= number of segment groups (3)")):
        a(q, q, q)


def test_ring_repr_says_what_it_runs_in_a_process_group():
    text = repr(dilated_ops.RingMultiheadDilatedAttention(32, 4, [1, 2], [8, 16]))
    assert "implementation='ring'" in text
    assert "in a process group: each rank's shard (contiguous), strategy 'ring'" in text


def test_key_and_value_default_to_query():
    m = dilated_ops.MultiheadDilatedAttention(32, 4, segment_lengths=[8, 16], dilation_rates=[1, 2])
    x = torch.randn(2, 20, 32)
    assert torch.equal(m(x)[0], m(x, x, x)[0])


ALL_MODULES = [(cls, dict(segment_lengths=[8, 16], dilation_rates=[1, 2])) for cls in DILATED] + [
    (cls, dict(embed_dim=32, num_heads=4, segment_lengths=[8, 16], dilation_rates=[1, 2])) for cls in MULTIHEAD
]


def module_inputs(module):
    if isinstance(module, dilated_ops.MultiheadDilatedAttention):
        return (torch.randn(2, 40, 32),) * 3
    return tuple(torch.randn(2, 40, 4, 8) for _ in range(3))


@pytest.mark.parametrize("cls, kwargs", ALL_MODULES, ids=lambda x: x.__name__ if isinstance(x, type) else "")
def test_every_module_is_one_op_node_without_graph_breaks(cls, kwargs):
    module = cls(**kwargs).eval()
    args = module_inputs(module)
    ep = torch.export.export(module, args)
    nodes = [n for n in ep.graph.nodes if n.target == torch.ops.dilated.dilated_attention.default]
    assert len(nodes) == 1
    torch.testing.assert_close(ep.module()(*args), module(*args))
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(module)(*args)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
