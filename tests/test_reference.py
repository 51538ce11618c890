"""The float64 oracle checked against things it must equal by construction."""
import math

import pytest
import torch
import torch.nn.functional as F

from dilated_ops.kernels.reference import branch_masks, dilated_attention_reference


def rand(*shape):
    return torch.randn(*shape, dtype=torch.float64)


@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("mode", ["groups", "longnet"])
def test_one_dense_branch_is_sdpa(mode, is_causal):
    q, k, v = rand(2, 23, 3, 8), rand(2, 23, 3, 8), rand(2, 23, 3, 8)
    out = dilated_attention_reference(q, k, v, [64], [1], mode=mode, is_causal=is_causal)
    sdpa = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), is_causal=is_causal)
    torch.testing.assert_close(out, sdpa.transpose(1, 2), rtol=0, atol=1e-12)


def test_segments_are_independent_blocks():
    # (w=8, r=1): attention within each block of 8; a trailing partial block of 5.
    q, k, v = rand(1, 21, 2, 4), rand(1, 21, 2, 4), rand(1, 21, 2, 4)
    out = dilated_attention_reference(q, k, v, [8], [1])
    for start, stop in [(0, 8), (8, 16), (16, 21)]:
        blk = [t[:, start:stop].transpose(1, 2) for t in (q, k, v)]
        torch.testing.assert_close(out[:, start:stop], F.scaled_dot_product_attention(*blk).transpose(1, 2), rtol=0, atol=1e-12)


def test_groups_dilation_selects_offset_positions_and_divides_by_G():
    n, h = 16, 2
    q, k, v = rand(1, n, h, 4), rand(1, n, h, 4), rand(1, n, h, 4)
    out = dilated_attention_reference(q, k, v, [4, 8], [1, 2])
    # head 1 is group 1: branch (8, 2) at offset 1 -> positions 1, 3, 5, 7 within each segment of 8.
    for seg in range(2):
        pos = torch.arange(seg * 8 + 1, seg * 8 + 8, 2)
        blk = [t[:, pos, 1:2].transpose(1, 2) for t in (q, k, v)]
        expect = F.scaled_dot_product_attention(*blk).transpose(1, 2) / 2
        torch.testing.assert_close(out[:, pos, 1:2], expect, rtol=0, atol=1e-12)
    unselected = torch.tensor([p for p in range(n) if p % 2 == 0])
    assert out[:, unselected, 1].abs().max() == 0


def test_longnet_is_softmax_over_union_of_key_sets():
    n, h, d = 12, 2, 4
    q, k, v = rand(1, n, h, d), rand(1, n, h, d), rand(1, n, h, d)
    segs, rates = [4, 12], [1, 2]
    out = dilated_attention_reference(q, k, v, segs, rates, mode="longnet")
    scale = 1 / math.sqrt(d)
    for head in range(h):
        for i in range(n):
            keys = []  # with multiplicity: a key in both branches counts twice
            for w, r in zip(segs, rates):
                o = head % r
                if (i % w) % r != o:
                    continue
                start = (i // w) * w
                keys += [j for j in range(start, min(start + w, n)) if (j - start) % r == o]
            if not keys:
                assert out[0, i, head].abs().max() == 0
                continue
            s = torch.stack([q[0, i, head] @ k[0, j, head] * scale for j in keys])
            expect = torch.softmax(s, 0) @ v[0, keys, head]
            torch.testing.assert_close(out[0, i, head], expect, rtol=0, atol=1e-12)


def test_branch_masks_causal_and_selection():
    selected, allowed = branch_masks(10, 4, 2, torch.tensor([1]), is_causal=True)
    assert selected[0].nonzero().flatten().tolist() == [1, 3, 5, 7, 9]
    assert allowed[0, 3].nonzero().flatten().tolist() == [1, 3]
    assert allowed[0, 9].nonzero().flatten().tolist() == [9]  # partial segment [8, 10)
    assert not allowed[0, 2].any()


@pytest.mark.parametrize("mode", ["groups", "longnet"])
def test_gradcheck_reference(mode):
    q, k, v = (rand(2, 11, 3, 4).requires_grad_() for _ in range(3))
    fn = lambda q, k, v: dilated_attention_reference(q, k, v, [4, 8], [1, 2], mode=mode, is_causal=True)
    assert torch.autograd.gradcheck(fn, (q, k, v))
