"""The index math: head groups, launch plans, and that segment views select exactly the
positions and heads of SPEC section 2."""
import pytest
import torch

from dilated_ops.kernels.segments import bhld_views, from_bhld, head_groups, plan, segment_views, to_bhld

from conftest import random_configs


def test_head_groups_sizes():
    assert head_groups(13, 3) == [(0, 5), (5, 9), (9, 13)]
    assert head_groups(12, 3) == [(0, 4), (4, 8), (8, 12)]
    assert head_groups(3, 3) == [(0, 1), (1, 2), (2, 3)]


def test_plan_longnet_offset_classes():
    calls = plan(5, (4, 8), (1, 2), "longnet")
    assert [(c.branch, c.offset, list(range(5))[c.heads]) for c in calls] == [(0, 0, [0, 1, 2, 3, 4]), (1, 0, [0, 2, 4]), (1, 1, [1, 3])]


@pytest.mark.parametrize("config", random_configs(30, seed=3), ids=str)
@pytest.mark.parametrize("mode", ["groups", "longnet"])
def test_segment_views_select_exactly_the_spec_positions(config, mode):
    b, n, h, _, segs, rates = config
    h = max(h, len(segs))
    for call in plan(h, tuple(segs), tuple(rates), mode):
        hits = torch.zeros(n, h)
        for piece in segment_views(hits.unsqueeze(0), call):
            piece += 1
        pos = torch.arange(n)
        want = ((pos % call.seg_len) % call.rate == call.offset).float()
        heads = torch.zeros(h, dtype=torch.bool)
        heads[call.heads] = True
        assert torch.equal(hits, want[:, None] * heads[None, :].float())


def test_to_bhld_roundtrip_is_a_view():
    x = torch.randn(1, 64, 6, 8)
    call = plan(6, (16, 32), (1, 2), "groups")[1]
    (piece,) = segment_views(x, call)
    t = to_bhld(piece)
    assert t.shape == (2, 3, 16, 8) and t.data_ptr() == x[0, 1, 3].data_ptr()
    assert torch.equal(from_bhld(t, piece), piece)


@pytest.mark.parametrize("config", random_configs(30, seed=5), ids=str)
@pytest.mark.parametrize("mode", ["groups", "longnet"])
@pytest.mark.parametrize("layout", ["contiguous", "fused", "lse"])
def test_bhld_views_are_to_bhld_of_the_pieces_as_views(config, mode, layout):
    b, n, h, d, segs, rates = config
    h = max(h, len(segs))
    if layout == "contiguous":
        x = torch.randn(b, n, h, d)
    elif layout == "fused":  # q sliced out of a (b, n, 3, h, d) projection
        x = torch.randn(b, n, 3, h, d)[:, :, 1]
    else:  # the log-sum-exp: no tail dim
        x = torch.randn(b, n, h)
    for call in plan(h, tuple(segs), tuple(rates), mode):
        pieces = segment_views(x, call)
        views = bhld_views(x, call)
        merges = b == 1 or n % call.seg_len == 0 or n < call.seg_len
        assert (views is not None) == merges
        if views is None:
            continue
        assert len(views) == len(pieces)
        for view, piece in zip(views, pieces):
            assert torch.equal(view, to_bhld(piece))
            assert view.untyped_storage().data_ptr() == x.untyped_storage().data_ptr()  # a view
            view.add_(1)  # writes land in x exactly where the piece's do
            assert torch.equal(view, to_bhld(piece))


@pytest.mark.parametrize("mode", ["groups", "longnet"])
@pytest.mark.parametrize("is_causal", [False, True])
def test_head_window_is_the_slice_of_the_whole_call(mode, is_causal):
    """Issue 20 (heads sharded over ranks): the forward and backward of heads [a, b) of an
    h-head call, given as a window (head_start=a, total_heads=h), equal the whole call's heads
    [a, b), for windows that cut through head groups and offset classes."""
    from dilated_ops.kernels.dilated import dilated_attention_backward, dilated_attention_forward

    torch.manual_seed(0)
    h, segs, rates = 7, [4, 8, 16], [1, 2, 4]
    q, k, v, g = (torch.randn(2, 37, h, 8, dtype=torch.float64) for _ in range(4))
    out, lse = dilated_attention_forward(q, k, v, segs, rates, mode, is_causal)
    grads = dilated_attention_backward(g, q, k, v, out, lse, segs, rates, mode, is_causal)
    for a, b in ((0, 3), (2, 5), (3, 7), (5, 6), (0, 7)):
        part = lambda t: t[:, :, a:b]  # noqa: E731
        o, l = dilated_attention_forward(*map(part, (q, k, v)), segs, rates, mode, is_causal, head_start=a,
                                         total_heads=h)
        torch.testing.assert_close(o, part(out), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(l, part(lse), rtol=1e-12, atol=1e-12)
        got = dilated_attention_backward(*map(part, (g, q, k, v, out, lse)), segs, rates, mode, is_causal,
                                         head_start=a, total_heads=h)
        for x, want in zip(got, grads):
            torch.testing.assert_close(x, part(want), rtol=1e-12, atol=1e-12)


def test_plan_head_window_launches():
    # groups: 7 heads in 3 groups [0, 3), [3, 5), [5, 7); the window [2, 6) cuts all three
    assert [(c.branch, c.heads) for c in plan(4, (4, 8, 16), (1, 2, 4), "groups", 2, 7)] == [
        (0, slice(0, 1, 1)), (1, slice(1, 3, 1)), (2, slice(3, 4, 1))]
    # longnet, rate 4: global heads 2..5 have offsets 2, 3, 0, 1 -> window heads 2, 3, 0, 1
    calls = [c for c in plan(4, (16,), (4,), "longnet", 2, 7)]
    assert [(c.offset, c.heads) for c in calls] == [(0, slice(2, 4, 4)), (1, slice(3, 4, 4)), (2, slice(0, 4, 4)),
                                                    (3, slice(1, 4, 4))]
    assert plan(7, (4, 8), (1, 2), "groups") == plan(7, (4, 8), (1, 2), "groups", 0, 7)
