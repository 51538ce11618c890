"""LongNetLM.generate (issue 22): greedy generation with a KV cache, each step's dilated
self-attention through the decode op, equal to the full causal forward."""
import pytest
import torch

import dilated_ops
from dilated_ops.generation import _step


def tiny_lm(mode, dtype=torch.float32, attention_type="auto"):
    torch.manual_seed(0)
    return dilated_ops.LongNetLM(50, d_model=32, nhead=4, num_encoder_layers=2, num_decoder_layers=2,
                                 dim_feedforward=64, segment_lengths=[4, 8, 16], dilation_rates=[1, 2, 4],
                                 mode=mode, dtype=dtype, attention_type=attention_type).eval()


@pytest.mark.parametrize("mode", ["groups", "longnet"])
def test_96_greedy_tokens_are_the_full_forwards_argmax_at_every_step(mode):
    """A prompt of 11 tokens, 96 new ones, crossing every branch's segment boundaries many times
    (segments 4, 8, 16), float32: each new token is the argmax of the causal forward's logits
    at the position before it (one forward over the result gives them all: position t's logits
    depend on tokens <= t only)."""
    model = tiny_lm(mode)
    prompt = torch.randint(0, 50, (2, 11))
    out = model.generate(prompt, 96)
    assert out.shape == (2, 107) and torch.equal(out[:, :11], prompt)
    torch.testing.assert_close(out[:, 11:], model(out)[:, 10:-1].argmax(-1), rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["groups", "longnet"])
def test_cached_logits_equal_the_forward_in_float64_and_each_row_is_its_own(mode):
    model = tiny_lm(mode, torch.float64)
    prompt = torch.randint(0, 50, (3, 7))
    out = model.generate(prompt, 40)
    cache = {}
    steps = [_step(model, out[:, :7], 0, cache)] + [_step(model, out[:, t:t + 1], t, cache) for t in range(7, 47)]
    torch.testing.assert_close(torch.cat(steps, dim=1), model(out), rtol=1e-10, atol=1e-10)
    for row in (0, 2):
        assert torch.equal(model.generate(prompt[row:row + 1], 40), out[row:row + 1])


def test_errors_name_the_argument():
    model = tiny_lm("groups")
    with pytest.raises(TypeError, match=r"tokens must be an integer tensor \(batch, seq\): got torch.float32"):
        model.generate(torch.zeros(1, 3), 4)
    with pytest.raises(ValueError, match=r"tokens must hold a prompt of at least one token: got shape \(1, 0\)"):
        model.generate(torch.zeros(1, 0, dtype=torch.long), 4)
    with pytest.raises(ValueError, match=r"max_new_tokens must be a positive int: got 0"):
        model.generate(torch.zeros(1, 3, dtype=torch.long), 0)
    sparse = tiny_lm("groups", attention_type="block_sparse")
    with pytest.raises(NotImplementedError, match="BlockSparseRingMultiheadDilatedAttention"):
        sparse.generate(torch.zeros(1, 3, dtype=torch.long), 2)
