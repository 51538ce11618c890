"""attn_implementation="dilated" (issue 22): tiny Hugging Face models from configs (no
downloads) with our attention function and mask function registered in transformers."""
import pytest
import torch

import dilated_ops
from dilated_ops.kernels.reference import dilated_attention_reference

transformers = pytest.importorskip("transformers", reason="transformers is an optional dependency (pip install "
                                   "transformers); CI installs it")
dilated_ops.register_transformers()  # a no-op when transformers was imported before dilated_ops

DILATED = {"segment_lengths": [4, 8, 16], "dilation_rates": [1, 2, 4], "mode": "longnet"}


def llama(dtype=torch.float32, **kw):
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, **kw)
    return transformers.LlamaForCausalLM(cfg).to(dtype).eval()


def qwen2(dtype=torch.float32, **kw):
    cfg = transformers.Qwen2Config(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=128, **kw)
    return transformers.Qwen2ForCausalLM(cfg).to(dtype).eval()


def gpt2(dtype=torch.float32, **kw):
    cfg = transformers.GPT2Config(vocab_size=97, n_embd=32, n_layer=2, n_head=2, n_positions=64, attn_pdrop=0.0,
                                  resid_pdrop=0.0, embd_pdrop=0.0, **kw)
    return transformers.GPT2LMHeadModel(cfg).to(dtype).eval()


MODELS = {"llama-gqa": llama, "qwen2-gqa": qwen2, "gpt2": gpt2}


def padded_batch(n=16):
    ids = torch.randint(0, 97, (2, n))
    mask = torch.ones(2, n, dtype=torch.long)
    mask[1, :5] = 0  # left padding of 5, as generation pads
    return ids, mask


def logits_and_grads(model, ids, mask):
    model.zero_grad()
    logits = model(input_ids=ids, attention_mask=mask).logits
    (logits[mask.bool()] ** 2).sum().backward()
    return logits.detach(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("name", list(MODELS))
def test_dense_equivalent_default_equals_sdpa_with_a_padded_batch(name):
    """Without config.dilated_attention the segments come from max_position_embeddings: one
    dense branch for these sizes, so logits at non-pad positions and parameter gradients equal
    attn_implementation="sdpa" (float32, 1e-5)."""
    torch.manual_seed(0)
    model = MODELS[name](attn_implementation="sdpa")
    ids, mask = padded_batch()
    want, want_grads = logits_and_grads(model, ids, mask)
    model.set_attn_implementation("dilated")
    assert model.config._attn_implementation == "dilated"
    got, got_grads = logits_and_grads(model, ids, mask)
    keep = mask.bool()
    torch.testing.assert_close(got[keep], want[keep], rtol=1e-5, atol=1e-5)
    for x, y in zip(got_grads, want_grads):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


def _reference_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                         **kwargs):
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))
    out = dilated_attention_reference(q, k, v, DILATED["segment_lengths"], DILATED["dilation_rates"], DILATED["mode"],
                                      is_causal=True, scale=scaling, key_padding_mask=attention_mask)
    return out, None


@pytest.mark.parametrize("name", ["llama-gqa", "gpt2"])
def test_dilated_config_equals_the_reference_attention(name):
    """config.dilated_attention = segments 4/8/16: the whole model's logits (float64) equal the
    same model with the float64 reference as its attention function, padded batch included."""
    from dilated_ops.integrations.transformers import mask_function

    transformers.AttentionInterface.register("dilated-reference", _reference_attention)
    transformers.masking_utils.AttentionMaskInterface.register("dilated-reference", mask_function)
    torch.manual_seed(1)
    model = MODELS[name](torch.float64, attn_implementation="dilated")
    model.config.dilated_attention = dict(DILATED)
    ids, mask = padded_batch()
    got = model(input_ids=ids, attention_mask=mask).logits
    model.set_attn_implementation("dilated-reference")
    want = model(input_ids=ids, attention_mask=mask).logits
    keep = mask.bool()
    torch.testing.assert_close(got[keep], want[keep], rtol=1e-10, atol=1e-10)
    model.set_attn_implementation("sdpa")  # and the pattern is not dense: SDPA differs
    assert (model(input_ids=ids, attention_mask=mask).logits[keep] - got[keep]).abs().max() > 1e-3


@pytest.mark.parametrize("name", ["llama-gqa", "qwen2-gqa"])
def test_generate_equals_the_full_forwards_argmax_at_every_step(name, monkeypatch):
    """model.generate (dynamic KV cache): the prompt through dilated_attention, each step
    through dilated_attention_decode; 48 greedy tokens from an 11-token prompt across segment
    boundaries equal the argmax of one full forward over the result at every step."""
    from dilated_ops.integrations import transformers as integration

    steps = []

    def counted(q, k, *args, **kwargs):
        steps.append((q.shape[1], k.shape[1]))
        return dilated_ops.dilated_attention_decode(q, k, *args, **kwargs)

    monkeypatch.setattr(integration, "dilated_attention_decode", counted)
    torch.manual_seed(2)
    model = MODELS[name](attn_implementation="dilated")
    model.config.dilated_attention = dict(DILATED)
    prompt = torch.randint(0, 97, (1, 11))
    out = model.generate(prompt, max_new_tokens=48, min_new_tokens=48, do_sample=False)
    assert out.shape == (1, 59)
    # each step after the prompt, in each of the 2 layers: one query against the cache so far
    assert steps == [(1, n) for n in range(12, 59) for _ in range(2)], steps[:4]
    torch.testing.assert_close(out[:, 11:], model(out).logits[:, 10:-1].argmax(-1), rtol=0, atol=0)


def test_a_training_step_compiles_with_fullgraph():
    """torch.compile(fullgraph=True) of a forward and backward through the registered function:
    no graph break, loss and gradients equal eager."""
    torch.manual_seed(3)
    model = llama(attn_implementation="dilated")
    model.config.dilated_attention = dict(DILATED)
    ids = torch.randint(0, 97, (2, 24))

    def loss(ids):
        return model(input_ids=ids, labels=ids).loss

    want = loss(ids)
    want_grads = torch.autograd.grad(want, list(model.parameters()))
    torch._dynamo.reset()
    got = torch.compile(loss, fullgraph=True, backend="aot_eager")(ids)
    got_grads = torch.autograd.grad(got, list(model.parameters()))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for x, y in zip(got_grads, want_grads):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)


def test_sliding_window_and_4d_masks_are_refused():
    torch.manual_seed(4)
    sliding = qwen2(attn_implementation="dilated", use_sliding_window=True, sliding_window=8,
                    layer_types=["sliding_attention", "sliding_attention"])
    with pytest.raises(ValueError, match="attn_implementation='dilated' takes causal or bidirectional attention with "
                                         "padding only"):
        sliding(input_ids=torch.randint(0, 97, (1, 12)))
    model = llama(attn_implementation="dilated")
    with pytest.raises(ValueError, match=r"takes a key padding mask \(batch, seq\); got an attention mask of shape "
                                         r"\(1, 1, 12, 12\)"):
        model(input_ids=torch.randint(0, 97, (1, 12)), attention_mask=torch.ones(1, 1, 12, 12, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"needs the queries at the end of the keys \(a dynamic cache\)"):
        model.generate(torch.randint(0, 97, (1, 5)), max_new_tokens=2, do_sample=False, cache_implementation="static")
    model.config.dilated_attention = {"segment_lengths": [4]}
    with pytest.raises(ValueError, match="config.dilated_attention must be a dict with 'segment_lengths' and "
                                         "'dilation_rates'"):
        model(input_ids=torch.randint(0, 97, (1, 12)))


def test_default_segments_grow_by_4_with_max_positions():
    from dilated_ops.integrations.transformers import default_config

    assert default_config(128) == {"segment_lengths": [128], "dilation_rates": [1], "mode": "longnet"}
    assert default_config(131072) == {"segment_lengths": [2048, 8192, 32768, 131072], "dilation_rates": [1, 4, 16, 64],
                                      "mode": "longnet"}
