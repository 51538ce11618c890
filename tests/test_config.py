"""DilatedAttentionConfig and MultiheadConfig: frozen, normalised, validated with the guide's
messages."""
import dataclasses
import re

import pytest

from dilated_ops import DilatedAttentionConfig, MultiheadConfig


def test_lists_become_tuples_and_configs_are_frozen_and_hashable():
    a = DilatedAttentionConfig(segment_lengths=[8, 16], dilation_rates=[1, 2])
    b = DilatedAttentionConfig(segment_lengths=(8, 16), dilation_rates=(1, 2))
    assert a.segment_lengths == (8, 16) and a.dilation_rates == (1, 2)
    assert a == b and hash(a) == hash(b)
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.dropout = 0.5
    m = MultiheadConfig(embed_dim=64, num_heads=4)
    with pytest.raises(dataclasses.FrozenInstanceError):
        m.num_heads = 8
    assert m.head_dim == 16


def test_defaults_are_v020s():
    a = DilatedAttentionConfig([8], [1])
    assert (a.dropout, a.use_tf32, a.mode) == (0.0, True, "groups")
    m = MultiheadConfig(64, 4)
    assert (m.bias, m.layer_norm, m.layer_norm_eps, m.gamma_init, m.batch_first) == (True, True, 1e-5, 1.0, True)


def test_the_guides_messages_verbatim():
    # The two "After:" lines of the guide's "Better Error Messages".
    with pytest.raises(ValueError) as info:
        DilatedAttentionConfig(segment_lengths=[2048, 4096, 8192], dilation_rates=[1, 2])
    assert str(info.value) == "segment_lengths and dilation_rates must have same length: got 3 and 2"
    with pytest.raises(ValueError) as info:
        MultiheadConfig(embed_dim=768, num_heads=13)
    assert str(info.value) == "embed_dim (768) must be divisible by num_heads (13). Got head_dim=59.08"


ATTENTION_ERRORS = [
    (dict(segment_lengths=[8, 6], dilation_rates=[1, 4]), ValueError, "segment_lengths[1] (6) must be divisible by dilation_rates[1] (4)"),
    (dict(segment_lengths=[], dilation_rates=[]), ValueError, "segment_lengths must not be empty: got []"),
    (dict(segment_lengths=[0], dilation_rates=[1]), ValueError, "segment_lengths must be positive: got [0]"),
    (dict(segment_lengths=[8], dilation_rates=[1.5]), TypeError, "dilation_rates must be a list of positive ints: got [1.5]"),
    (dict(segment_lengths="8", dilation_rates=[1]), TypeError, "segment_lengths must be a list of positive ints: got '8'"),
    (dict(segment_lengths=[8], dilation_rates=[1], dropout=1.0), ValueError, "dropout must be in [0, 1): got 1.0"),
    (dict(segment_lengths=[8], dilation_rates=[1], dropout="0.1"), TypeError, "dropout must be a float in [0, 1): got '0.1'"),
    (dict(segment_lengths=[8], dilation_rates=[1], use_tf32=1), TypeError, "use_tf32 must be a bool: got 1"),
    (dict(segment_lengths=[8], dilation_rates=[1], mode="paper"), ValueError, "mode must be 'groups' or 'longnet': got 'paper'"),
]

MULTIHEAD_ERRORS = [
    (dict(embed_dim=0, num_heads=1), ValueError, "embed_dim must be a positive int: got 0"),
    (dict(embed_dim=64, num_heads=2.0), TypeError, "num_heads must be a positive int: got 2.0"),
    (dict(embed_dim=64, num_heads=4, bias=None), TypeError, "bias must be a bool: got None"),
    (dict(embed_dim=64, num_heads=4, layer_norm="yes"), TypeError, "layer_norm must be a bool: got 'yes'"),
    (dict(embed_dim=64, num_heads=4, layer_norm_eps=0.0), ValueError, "layer_norm_eps must be > 0: got 0.0"),
    (dict(embed_dim=64, num_heads=4, gamma_init=-1.0), ValueError, "gamma_init must be > 0: got -1.0"),
    (dict(embed_dim=64, num_heads=4, batch_first=0), TypeError, "batch_first must be a bool: got 0"),
]


@pytest.mark.parametrize("kwargs, exc, message", ATTENTION_ERRORS, ids=lambda x: None)
def test_attention_config_errors(kwargs, exc, message):
    with pytest.raises(exc, match=re.escape(message) + "$"):
        DilatedAttentionConfig(**kwargs)


@pytest.mark.parametrize("kwargs, exc, message", MULTIHEAD_ERRORS)
def test_multihead_config_errors(kwargs, exc, message):
    with pytest.raises(exc, match=re.escape(message) + "$"):
        MultiheadConfig(**kwargs)


def test_replace_revalidates():
    a = DilatedAttentionConfig([8, 16], [1, 2])
    assert dataclasses.replace(a, dropout=0.25).dropout == 0.25
    with pytest.raises(ValueError, match="must have same length: got 1 and 2"):
        dataclasses.replace(a, segment_lengths=[8])
