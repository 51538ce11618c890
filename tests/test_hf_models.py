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


def padded_batch(n=16):
    ids = torch.randint(0, 97, (2, n))
    mask = torch.ones(2, n, dtype=torch.long)
    mask[1, :5] = 0  # left padding of 5
    return ids, mask


def test_llama_gqa_with_a_padded_batch_equals_the_uncompiled_model():
    torch.manual_seed(0)
    model = llama()
    ids, mask = padded_batch()
    want = model(input_ids=ids, attention_mask=mask).logits
    (want[mask.bool()] ** 2).sum().backward()
    want_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    backend = dilated_ops.backend([16], [1], inner="aot_eager")  # one dense branch: SDPA's result
    torch._dynamo.reset()
    got = torch.compile(model, backend=backend, fullgraph=True)(input_ids=ids, attention_mask=mask).logits
    assert [e.module_path for e in backend.report.rewritten] == ["model.layers.0.self_attn",
                                                                 "model.layers.1.self_attn"]
    assert not backend.report.refused
    keep = mask.bool()
    torch.testing.assert_close(got[keep], want[keep].detach(), rtol=1e-10, atol=1e-10)
    (got[keep] ** 2).sum().backward()
    for (name, p), g in zip(model.named_parameters(), want_grads):
        torch.testing.assert_close(p.grad, g, rtol=1e-8, atol=1e-8, msg=name)


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
