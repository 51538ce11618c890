"""Tiny Hugging Face models from configs (no downloads) through ``dilated_ops.backend`` (issue
21): grouped-query attention and padded batches rewritten, equal to the uncompiled model for a
dense-equivalent config; cross-attention refused; report paths without Dynamo's prefix."""
import pytest
import torch

import dilated_ops

transformers = pytest.importorskip("transformers", reason="transformers is an optional dependency (pip install "
                                   "transformers); CI installs it")


def llama(**kw):
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   attn_implementation="sdpa", **kw)
    return transformers.LlamaForCausalLM(cfg).double()


def qwen2():
    cfg = transformers.Qwen2Config(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=128,
                                   attn_implementation="sdpa")
    return transformers.Qwen2ForCausalLM(cfg).double()


def gpt2():
    cfg = transformers.GPT2Config(vocab_size=97, n_embd=32, n_layer=2, n_head=2, n_positions=64, attn_pdrop=0.0,
                                  resid_pdrop=0.0, embd_pdrop=0.0, bos_token_id=0, eos_token_id=0,
                                  attn_implementation="sdpa")
    return transformers.GPT2LMHeadModel(cfg).double()


def bert():
    cfg = transformers.BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=64, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0, attn_implementation="sdpa")
    return transformers.BertModel(cfg, add_pooling_layer=False).double()


# model, padding side (decoders left, as generation pads; BERT right, as tokenizers pad), its
# self-attention modules
MODELS = {
    "llama-gqa": (llama, "left", ["model.layers.0.self_attn", "model.layers.1.self_attn"]),
    "qwen2-gqa": (qwen2, "left", ["model.layers.0.self_attn", "model.layers.1.self_attn"]),
    "gpt2": (gpt2, "left", ["transformer.h.0.attn", "transformer.h.1.attn"]),
    "bert": (bert, "right", ["encoder.layer.0.attention.self", "encoder.layer.1.attention.self"]),
}


def padded_batch(n=16, side="left"):
    ids = torch.randint(0, 97, (2, n))
    mask = torch.ones(2, n, dtype=torch.long)
    mask[1, :5] = 0  # left padding of 5
    if side == "right":
        mask[1] = mask[1].flip(0)
    return ids, mask


def _output(out):
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("name", list(MODELS))
def test_padded_batch_equals_the_uncompiled_model(name):
    """Every self-attention call rewritten with the padding mask; logits at non-pad positions and
    parameter gradients equal the uncompiled model's (one dense branch: SDPA's result)."""
    torch.manual_seed(0)
    make, side, paths = MODELS[name]
    model = make()
    ids, mask = padded_batch(side=side)
    keep = mask.bool()
    want = _output(model(input_ids=ids, attention_mask=mask))
    (want[keep] ** 2).sum().backward()
    want_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    backend = dilated_ops.backend([16], [1], inner="aot_eager")
    torch._dynamo.reset()
    got = _output(torch.compile(model, backend=backend, fullgraph=True)(input_ids=ids, attention_mask=mask))
    assert [e.module_path for e in backend.report.rewritten] == paths
    assert not backend.report.refused
    torch.testing.assert_close(got[keep], want[keep].detach(), rtol=1e-10, atol=1e-10)
    (got[keep] ** 2).sum().backward()
    for (pname, p), g in zip(model.named_parameters(), want_grads):
        torch.testing.assert_close(p.grad, g, rtol=1e-8, atol=1e-8, msg=pname)


@pytest.mark.parametrize("name", list(MODELS))
def test_padded_batch_with_dilation_equals_the_op_on_the_same_mask(name):
    """A dilated config (not dense-equivalent): the rewrite takes effect (the output differs from
    the uncompiled model's) and so does the padding (non-pad outputs do not depend on the pad
    tokens' ids)."""
    torch.manual_seed(5)
    make, side, _ = MODELS[name]
    model = make().eval()
    ids, mask = padded_batch(side=side)
    backend = dilated_ops.backend([4, 8], [1, 2], inner="aot_eager")
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    got = _output(compiled(input_ids=ids, attention_mask=mask))
    other = ids.clone()
    other[~mask.bool()] = (other[~mask.bool()] + 1) % 97  # different pad tokens
    got2 = _output(compiled(input_ids=other, attention_mask=mask))
    keep = mask.bool()
    torch.testing.assert_close(got2[keep], got[keep], rtol=1e-10, atol=1e-10)
    want = _output(model(input_ids=ids, attention_mask=mask))
    assert (got[keep] - want[keep]).abs().max() > 1e-3


def test_llama_rewrite_reads_the_unrepeated_kv_and_the_padding_input():
    torch.manual_seed(1)
    model = llama()
    ids, mask = padded_batch()
    seen = []

    def inner(gm, example_inputs):
        seen.extend(n for n in gm.graph.nodes if n.target is torch.ops.dilated.dilated_attention.default)
        assert not any(n.op == "call_method" and n.target == "expand" for n in gm.graph.nodes), "K/V repeats left"
        return gm

    torch._dynamo.reset()
    torch.compile(model, backend=dilated_ops.backend([8, 16], [1, 2], inner=inner), fullgraph=True)(
        input_ids=ids, attention_mask=mask)
    assert len(seen) == 2 and all(n.kwargs["key_padding_mask"].args[0].op == "placeholder" for n in seen)


def test_select_by_model_layers_path():
    torch.manual_seed(2)
    model = llama()
    ids, mask = padded_batch()
    backend = dilated_ops.backend([16], [1], inner="aot_eager", select=lambda p: p.startswith("model.layers.0"))
    torch._dynamo.reset()
    torch.compile(model, backend=backend, fullgraph=True)(input_ids=ids, attention_mask=mask)
    assert [e.module_path for e in backend.report.rewritten] == ["model.layers.0.self_attn"]
    assert [e.module_path for e in backend.report.skipped] == ["model.layers.1.self_attn"]


def test_bart_cross_attention_is_refused_at_equal_lengths():
    torch.manual_seed(3)
    cfg = transformers.BartConfig(vocab_size=97, d_model=32, encoder_layers=1, decoder_layers=1,
                                  encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
                                  decoder_ffn_dim=32, max_position_embeddings=64, attn_implementation="sdpa")
    model = transformers.BartModel(cfg).eval()
    ids = torch.randint(3, 97, (1, 12))
    backend = dilated_ops.backend([12], [1], inner="aot_eager")
    torch._dynamo.reset()
    torch.compile(model, backend=backend)(input_ids=ids, decoder_input_ids=ids)
    refused = [e for r in backend.reports for e in r.refused]
    cross = [e for e in refused if "encoder_attn" in e.module_path]
    assert cross and all(e.reason.startswith("cross-attention") for e in cross), refused
    rewritten = [e.module_path for r in backend.reports for e in r.rewritten]
    assert "encoder.layers.0.self_attn" in rewritten and not any("encoder_attn" in p for p in rewritten)


def test_decode_steps_left_dense_after_a_rewritten_prompt_warn(recwarn):
    """Issue 22: model.forward compiled through the backend, a prompt (rewritten) then a decode
    step against its cache (query 1, keys 13: refused, dense): a warning names the mismatch and
    attn_implementation="dilated". BART's cross-attention at unequal lengths is named
    cross-attention (not a decode step) and does not warn."""
    torch.manual_seed(5)
    model = llama().float().eval()
    backend = dilated_ops.backend([16], [1], inner="aot_eager")
    torch._dynamo.reset()
    forward = torch.compile(model.forward, backend=backend)
    ids = torch.randint(0, 97, (1, 12))
    out = forward(input_ids=ids, use_cache=True)
    assert len(backend.reports[0].rewritten) == 2 and not [w for w in recwarn if "decode steps" in str(w.message)]
    with pytest.warns(UserWarning, match=r"2 attention call\(s\) of this graph are decode steps against a KV cache, "
                                         r"left dense.*attn_implementation=\"dilated\""):
        forward(input_ids=ids[:, :1], past_key_values=out.past_key_values, use_cache=True)
    assert [e.reason.split(" (")[0] for e in backend.report.refused] == ["query length 1 differs from key length 13"] * 2

    cfg = transformers.BartConfig(vocab_size=97, d_model=32, encoder_layers=1, decoder_layers=1,
                                  encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
                                  decoder_ffn_dim=32, max_position_embeddings=64, attn_implementation="sdpa")
    bart = transformers.BartModel(cfg).eval()
    backend = dilated_ops.backend([16], [1], inner="aot_eager")
    torch._dynamo.reset()
    recwarn.clear()
    torch.compile(bart, backend=backend)(input_ids=torch.randint(3, 97, (1, 16)),
                                         decoder_input_ids=torch.randint(3, 97, (1, 8)))
    cross = [e for r in backend.reports for e in r.refused if "encoder_attn" in e.module_path]
    assert cross and all(e.reason.startswith("cross-attention") for e in cross), cross
    assert not [w for w in recwarn if "decode steps" in str(w.message)]


def test_eager_attention_warns_naming_attn_implementation_sdpa():
    torch.manual_seed(4)
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                                   attn_implementation="eager")
    model = transformers.LlamaForCausalLM(cfg)
    backend = dilated_ops.backend([8], [1], inner="aot_eager")
    torch._dynamo.reset()
    with pytest.warns(UserWarning, match='attn_implementation="sdpa"'):
        torch.compile(model, backend=backend, fullgraph=True)(input_ids=torch.randint(0, 97, (1, 8)))
    assert not backend.report.rewritten and not backend.report.refused


@pytest.mark.parametrize("name", list(MODELS))
def test_export_with_the_attention_mask(name, tmp_path):
    """``dilated_ops.export`` with a padded batch's attention_mask: every self-attention call is
    the dilated op on the unrepeated K/V with the padding as key_padding_mask (no SDPA left); the
    program equals the model at non-pad positions (dense-equivalent config), ignores the pad
    tokens under a dilated one, and survives save/load."""
    torch.manual_seed(6)
    make, side, paths = MODELS[name]
    model = make().eval()
    ids, mask = padded_batch(side=side)
    kw = {"input_ids": ids, "attention_mask": mask}
    if name != "bert":
        kw["use_cache"] = False  # a DynamicCache is no pytree output
    keep = mask.bool()
    want = _output(model(**kw))
    ep = dilated_ops.export(model, (), kw, segment_lengths=[16], dilation_rates=[1])
    assert [e.module_path for e in ep.dilated_ops_report.rewritten] == paths
    nodes = [n for n in ep.graph.nodes if n.target == torch.ops.dilated.dilated_attention.default]
    assert len(nodes) == 2 and all(n.kwargs.get("key_padding_mask") is not None for n in nodes)
    assert not any(n.target == torch.ops.aten.scaled_dot_product_attention.default for n in ep.graph.nodes)
    kv_heads = model.config.num_key_value_heads if hasattr(model.config, "num_key_value_heads") else None
    if kv_heads is not None:
        assert all(n.args[1].meta["val"].shape[2] == kv_heads for n in nodes)
    torch.testing.assert_close(_output(ep.module()(**kw))[keep], want[keep], rtol=1e-10, atol=1e-10)
    dilated = dilated_ops.export(model, (), kw, segment_lengths=[4, 8], dilation_rates=[1, 2])
    path = str(tmp_path / "program.pt2")
    torch.export.save(dilated, path)
    loaded = torch.export.load(path).module()
    other = ids.clone()
    other[~keep] = (other[~keep] + 1) % 97
    a, b = _output(loaded(**kw)), _output(loaded(**dict(kw, input_ids=other)))
    torch.testing.assert_close(a[keep], b[keep], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(a, _output(dilated.module()(**kw)), rtol=0, atol=0)
    assert (a[keep] - want[keep]).abs().max() > 1e-3
