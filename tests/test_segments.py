"""The index math: head groups, launch plans, and that segment views and unselected views
partition every tensor exactly (groups mode relies on it to skip zero-filling)."""
import pytest
import torch

from dilated_ops.kernels.segments import from_bhld, head_groups, plan, segment_views, to_bhld, unselected_views

from conftest import random_configs


def test_head_groups_sizes():
    assert head_groups(13, 3) == [(0, 5), (5, 9), (9, 13)]
    assert head_groups(12, 3) == [(0, 4), (4, 8), (8, 12)]
    assert head_groups(3, 3) == [(0, 1), (1, 2), (2, 3)]


def test_plan_longnet_offset_classes():
    calls = plan(5, (4, 8), (1, 2), "longnet")
    assert [(c.branch, c.offset, list(range(5))[c.heads]) for c in calls] == [(0, 0, [0, 1, 2, 3, 4]), (1, 0, [0, 2, 4]), (1, 1, [1, 3])]


@pytest.mark.parametrize("config", random_configs(30, seed=3), ids=str)
def test_groups_views_partition_the_tensor(config):
    b, n, h, _, segs, rates = config
    if h < len(segs):
        h = len(segs)
    count = torch.zeros(b, n, h)
    selected = torch.zeros(b, n, h)
    for call in plan(h, tuple(segs), tuple(rates), "groups"):
        for view in unselected_views(count, call):
            view += 1
        for piece in segment_views(count, call):
            piece += 1
            assert piece.shape[2] == len(range(call.offset, min(call.seg_len, n), call.rate)) or piece.shape[1] == 1
        for piece in segment_views(selected, call):
            piece += 1
    # every element is written exactly once after its fill; the partial segment is filled, then written
    full_end = torch.tensor([n // w * w for w in segs])
    assert (count >= 1).all()
    for call in plan(h, tuple(segs), tuple(rates), "groups"):
        head_count = count[:, : full_end[call.branch], call.heads]
        assert (head_count == 1).all()
        # selected positions: within-segment index % r == offset
        pos = torch.arange(n)
        want = ((pos % call.seg_len) % call.rate == call.offset).float()
        assert torch.equal(selected[0, :, call.heads], want[:, None].expand(n, selected[0, :, call.heads].shape[1]))


def test_to_bhld_roundtrip_is_a_view():
    x = torch.randn(1, 64, 6, 8)
    call = plan(6, (16, 32), (1, 2), "groups")[1]
    (piece,) = segment_views(x, call)
    t = to_bhld(piece)
    assert t.shape == (2, 3, 16, 8) and t.data_ptr() == x[0, 1, 3].data_ptr()
    assert torch.equal(from_bhld(t, piece), piece)
