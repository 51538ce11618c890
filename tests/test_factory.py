"""The factory: every name, config/keyword precedence, every error, "auto" decisions with the
machine simulated, and repr stating the choice."""
import dataclasses
import re

import pytest
import torch

import dilated_ops
from dilated_ops import (
    DilatedAttentionConfig,
    MultiheadConfig,
    create_dilated_attention,
    create_multihead_dilated_attention,
    factory,
)
from dilated_ops import _env

SEGS = dict(segment_lengths=[8, 16], dilation_rates=[1, 2])
MH = dict(embed_dim=32, num_heads=4)


@pytest.fixture
def machine(monkeypatch):
    """Simulate the machine: ``machine(cuda=..., world=...)``."""

    def set_state(cuda=False, world=1):
        monkeypatch.setattr(_env, "cuda_available", lambda: cuda)
        monkeypatch.setattr(_env, "distributed_world_size", lambda: world)

    set_state()
    return set_state


BUILT = [
    ("standard", dilated_ops.DilatedAttention, dilated_ops.MultiheadDilatedAttention, "sdpa"),
    ("improved", dilated_ops.ImprovedDilatedAttention, dilated_ops.ImprovedMultiheadDilatedAttention, "auto"),
    ("ring", dilated_ops.RingDilatedAttention, dilated_ops.RingMultiheadDilatedAttention, "auto"),
    ("distributed", dilated_ops.DistributedDilatedAttention, dilated_ops.DistributedMultiheadDilatedAttention, None),
]


@pytest.mark.parametrize("name, dilated_cls, multihead_cls, kernel", BUILT)
def test_built_names_give_their_classes_and_kernels(machine, name, dilated_cls, multihead_cls, kernel):
    a = create_dilated_attention(name, **SEGS)
    m = create_multihead_dilated_attention(name, **MH, **SEGS)
    assert type(a) is dilated_cls and type(m) is multihead_cls
    assert a.backend == kernel and m.attention.backend == kernel
    assert f"implementation={name!r} (requested by name)" in repr(a)
    assert f"implementation={name!r} (requested by name)" in repr(m)


def test_unbuilt_names_raise_naming_the_capability(machine, monkeypatch):
    # Every name of the table is built now: an unbuilt row (as the table marks one) is refused
    # by both factories with its own text, never a silent fallback.
    from dilated_ops import variants

    missing = "distributed: sequence-parallel dilated attention across processes is not built yet"
    monkeypatch.setitem(variants.VARIANTS, "distributed",
                        dataclasses.replace(variants.VARIANTS["distributed"], missing=missing))
    for create, kw in ((create_dilated_attention, SEGS), (create_multihead_dilated_attention, {**MH, **SEGS})):
        with pytest.raises(NotImplementedError, match="^" + re.escape(missing) + "$"):
            create("distributed", **kw)


def test_every_name_of_the_guide_is_in_the_table():
    # The guide's "Available implementations".
    assert set(factory.NAMES) == {"auto", "standard", "improved", "ring", "distributed", "block_sparse"}


def test_unknown_name():
    with pytest.raises(ValueError, match=re.escape("attention_type must be one of 'auto', 'standard', 'improved', 'ring', 'distributed', 'block_sparse': got 'fast'")):
        create_dilated_attention("fast", **SEGS)


# --- "auto" ----------------------------------------------------------------------------------

@pytest.mark.parametrize("state, kwargs, expected, reason", [
    (dict(cuda=False), {}, "standard", "auto: no CUDA device"),
    (dict(cuda=True), {}, "improved", "auto: CUDA is available"),
    (dict(cuda=True), dict(device="cpu"), "standard", "auto: device='cpu' is not CUDA"),
    (dict(cuda=True), dict(max_seq_len=factory.RING_MIN_SEQ_LEN), "improved", "auto: CUDA is available"),
    (dict(cuda=True), dict(max_seq_len=factory.RING_MIN_SEQ_LEN + 1), "ring", "auto: max_seq_len="),
    (dict(cuda=False), dict(max_seq_len=factory.RING_MIN_SEQ_LEN + 1), "ring", "auto: max_seq_len="),
])
def test_auto_decisions(machine, state, kwargs, expected, reason):
    machine(**state)
    mh = create_multihead_dilated_attention("auto", **MH, **SEGS, **kwargs)
    assert mh.implementation == expected
    assert f"implementation={expected!r} ({reason}" in repr(mh)
    if "device" not in kwargs:  # create_dilated_attention takes no device
        a = create_dilated_attention("auto", **SEGS, **kwargs)
        assert a.implementation == expected and f"({reason}" in repr(a)


def test_auto_reads_the_device_argument(machine):
    # A CUDA device cannot hold parameters on a CPU-only machine: ask the chooser itself.
    assert factory.choose_implementation(device="cuda") == ("improved", "auto: device='cuda' is CUDA")
    assert factory.choose_implementation(device=torch.device("cuda", 1))[0] == "improved"
    assert factory.choose_implementation(device="meta")[0] == "standard"


def test_auto_with_a_process_group_picks_distributed(machine):
    machine(cuda=True, world=4)
    a = create_dilated_attention("auto", **SEGS)
    m = create_multihead_dilated_attention("auto", **MH, **SEGS)
    assert type(a) is dilated_ops.DistributedDilatedAttention
    assert type(m) is dilated_ops.DistributedMultiheadDilatedAttention
    for module in (a, m):
        assert "auto: a torch.distributed process group of world size 4 is initialized" in module.selection_reason


def test_distributed_options_are_checked(machine):
    with pytest.raises(ValueError, match="strategy must be one of 'auto', 'longnet', 'ulysses', 'ring': got 'fast'"):
        create_dilated_attention("distributed", **SEGS, strategy="fast")
    assert create_multihead_dilated_attention("distributed", **MH, **SEGS, strategy="ring").attention.strategy == "ring"
    with pytest.raises(TypeError, match="process_group must be a torch.distributed.ProcessGroup or None: got str"):
        create_dilated_attention("distributed", **SEGS, process_group="world")
    with pytest.raises(ValueError, match="dropout must be 0.0 for distributed"):
        create_dilated_attention("distributed", **SEGS, dropout=0.1)


def test_ring_builds_in_a_process_group_and_runs_alone_outside_one(machine):
    machine(world=2)
    m = create_multihead_dilated_attention("ring", **MH, **SEGS)
    assert type(m.attention) is dilated_ops.RingDilatedAttention and m.attention.process_group is None
    with pytest.raises(TypeError, match="process_group must be a torch.distributed.ProcessGroup or None"):
        create_dilated_attention("ring", **SEGS, process_group=2)
    machine(world=1)
    ring = create_dilated_attention("ring", **SEGS)
    q = torch.randn(1, 16, 4, 8)
    torch.testing.assert_close(ring(q, q, q), dilated_ops.dilated_attention(q, q, q, **SEGS), rtol=0, atol=0)


def test_auto_on_this_machine_is_not_simulated():
    expected = "improved" if torch.cuda.is_available() else "standard"
    assert create_dilated_attention(**SEGS).implementation == expected


# --- configs and keywords --------------------------------------------------------------------

def test_keywords_override_config_fields(machine):
    att = DilatedAttentionConfig([8, 16], [1, 2], dropout=0.1, mode="longnet")
    mh = MultiheadConfig(embed_dim=32, num_heads=4, layer_norm=False, gamma_init=2.0)
    m = create_multihead_dilated_attention(
        "standard", multihead_config=mh, attention_config=att, dropout=0.2, num_heads=8, segment_lengths=[4, 16],
    )
    assert m.attention_config == DilatedAttentionConfig([4, 16], [1, 2], dropout=0.2, mode="longnet")
    assert m.multihead_config == MultiheadConfig(embed_dim=32, num_heads=8, layer_norm=False, gamma_init=2.0)
    assert m.norm is None and m.num_heads == 8
    a = create_dilated_attention("standard", attention_config=att, dilation_rates=[2, 4])
    assert a.config == DilatedAttentionConfig([8, 16], [2, 4], dropout=0.1, mode="longnet")
    # The config objects themselves are untouched (frozen) and reusable.
    assert att.dropout == 0.1 and mh.num_heads == 4


def test_config_only_and_keywords_only_agree(machine):
    torch.manual_seed(0)
    a = create_multihead_dilated_attention(
        "standard", multihead_config=MultiheadConfig(**MH), attention_config=DilatedAttentionConfig(**SEGS))
    torch.manual_seed(0)
    b = create_multihead_dilated_attention("standard", **MH, **SEGS)
    assert a.multihead_config == b.multihead_config and a.attention_config == b.attention_config
    x = torch.randn(2, 20, 32)
    torch.testing.assert_close(a(x, x, x)[0], b(x, x, x)[0], rtol=0, atol=0)


def test_device_and_dtype_reach_the_parameters(machine):
    m = create_multihead_dilated_attention("standard", **MH, **SEGS, dtype=torch.float64, device="cpu")
    assert {p.dtype for p in m.parameters()} == {torch.float64}


FACTORY_ERRORS = [
    (create_dilated_attention, dict(**SEGS, dropuot=0.1), TypeError,
     "create_dilated_attention() got unknown keyword argument(s) 'dropuot'; known: segment_lengths, dilation_rates, dropout, use_tf32, mode, attention_config, max_seq_len"),
    (create_dilated_attention, dict(**SEGS, embed_dim=32, num_heads=4), TypeError,
     "create_dilated_attention() got multi-head option(s) 'embed_dim', 'num_heads'; use create_multihead_dilated_attention for those"),
    (create_dilated_attention, dict(**SEGS, multihead_config=MultiheadConfig(**MH)), TypeError,
     "create_dilated_attention() got multi-head option(s) 'multihead_config'; use create_multihead_dilated_attention for those"),
    (create_dilated_attention, dict(dilation_rates=[1]), TypeError,
     "create_dilated_attention() needs segment_lengths, dilation_rates (as keywords or in attention_config=): missing segment_lengths"),
    (create_dilated_attention, dict(attention_config=MultiheadConfig(**MH)), TypeError,
     "attention_config must be a DilatedAttentionConfig: got MultiheadConfig"),
    (create_dilated_attention, dict(**SEGS, max_seq_len=0), ValueError, "max_seq_len must be a positive int: got 0"),
    (create_multihead_dilated_attention, dict(**MH, **SEGS, heads=4, op=None), TypeError,
     "create_multihead_dilated_attention() got unknown keyword argument(s) 'heads', 'op'; known: embed_dim, num_heads, bias, layer_norm, layer_norm_eps, gamma_init, batch_first, segment_lengths, dilation_rates, dropout, use_tf32, mode, multihead_config, attention_config, max_seq_len, device, dtype"),
    (create_multihead_dilated_attention, dict(**SEGS, num_heads=4), TypeError,
     "create_multihead_dilated_attention() needs embed_dim, num_heads (as keywords or in multihead_config=): missing embed_dim"),
    (create_multihead_dilated_attention, dict(**MH, multihead_config=DilatedAttentionConfig(**SEGS)), TypeError,
     "multihead_config must be a MultiheadConfig: got DilatedAttentionConfig"),
    (create_multihead_dilated_attention, dict(embed_dim=768, num_heads=13, **SEGS), ValueError,
     "embed_dim (768) must be divisible by num_heads (13). Got head_dim=59.08"),
    (create_multihead_dilated_attention, dict(**MH, segment_lengths=[8, 16, 32], dilation_rates=[1, 2]), ValueError,
     "segment_lengths and dilation_rates must have same length: got 3 and 2"),
    (create_multihead_dilated_attention, dict(embed_dim=32, num_heads=2, segment_lengths=[4, 8, 16], dilation_rates=[1, 2, 4]), ValueError,
     "num_heads (2) must be >= number of segment groups (3)"),
    (create_multihead_dilated_attention, dict(**MH, **SEGS, dropout=1.5), ValueError, "dropout must be in [0, 1): got 1.5"),
]


@pytest.mark.parametrize("create, kwargs, exc, message", FACTORY_ERRORS)
def test_factory_errors(machine, create, kwargs, exc, message):
    with pytest.raises(exc, match="^" + re.escape(message) + "$"):
        create("standard", **kwargs)


def test_validation_comes_before_the_unbuilt_error(machine):
    """A bad configuration is reported as such even when the name is not built."""
    with pytest.raises(ValueError, match="same length"):
        create_dilated_attention("distributed", segment_lengths=[8, 16], dilation_rates=[1])


def test_longnet_mode_allows_fewer_heads_than_branches(machine):
    m = create_multihead_dilated_attention(
        "standard", embed_dim=32, num_heads=2, segment_lengths=[4, 8, 16], dilation_rates=[1, 2, 4], mode="longnet")
    x = torch.randn(1, 20, 32)
    assert m(x, x, x)[0].shape == x.shape


def test_readme_carries_the_capability_table():
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    assert factory.implementations_table() in readme


# --- issue 18, item 4: device and dtype name themselves --------------------------------------

@pytest.mark.parametrize("name", ["standard", "auto"])
@pytest.mark.parametrize("device, shown", [
    ("cuda", "'cuda'"), ("cuda:1", "'cuda:1'"), (torch.device("cuda", 0), "torch.device('cuda:0')"),
])
def test_cuda_device_without_cuda_is_a_clear_error(machine, name, device, shown):
    machine(cuda=False)
    with pytest.raises(ValueError) as info:
        create_multihead_dilated_attention(name, **MH, **SEGS, device=device)
    assert str(info.value) == f"device {shown} is not available: torch.cuda.is_available() is False"


def test_cuda_device_passes_the_check_where_cuda_is_available(machine):
    from dilated_ops import _checks

    machine(cuda=True)
    _checks.check_device("cuda")
    _checks.check_device(torch.device("cuda", 1))


@pytest.mark.parametrize("device, exc, start", [
    ("gpu", ValueError, "device must be a valid torch.device: got 'gpu' ("),
    (1.5, TypeError, "device must be a torch.device, a device string, an int or None: got 1.5"),
    (True, TypeError, "device must be a torch.device, a device string, an int or None: got True"),
])
def test_malformed_device_names_the_argument(machine, device, exc, start):
    with pytest.raises(exc) as info:
        create_multihead_dilated_attention("standard", **MH, **SEGS, device=device)
    assert str(info.value).startswith(start)


@pytest.mark.parametrize("dtype, shown", [
    (torch.int64, "torch.int64"), (torch.bool, "torch.bool"), (torch.complex64, "torch.complex64"),
    ("float32", "'float32'"), (float, "<class 'float'>"),
])
def test_dtype_must_be_a_floating_torch_dtype(machine, dtype, shown):
    with pytest.raises(TypeError) as info:
        create_multihead_dilated_attention("standard", **MH, **SEGS, dtype=dtype)
    assert str(info.value) == (
        "dtype must be a floating point torch.dtype (torch.float16, torch.bfloat16, torch.float32 or "
        f"torch.float64) or None: got {shown}"
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_every_floating_dtype_builds(machine, dtype):
    m = create_multihead_dilated_attention("standard", **MH, **SEGS, dtype=dtype, device=torch.device("cpu"))
    assert {p.dtype for p in m.parameters()} == {dtype}
