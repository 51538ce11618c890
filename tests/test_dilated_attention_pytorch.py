"""The alias package: v0.2.0's import paths, each a re-export of the dilated_ops object."""
import importlib

import pytest

import dilated_ops

ALIASES = {
    "core": ["create_dilated_attention", "create_multihead_dilated_attention", "DilatedAttentionConfig",
             "MultiheadConfig", "get_memory_pool_info", "clear_memory_pool"],
    "dilated_attention": ["DilatedAttention"],
    "multihead_dilated_attention": ["MultiheadDilatedAttention"],
    "improved_dilated_attention": ["ImprovedDilatedAttention"],
    "improved_multihead_dilated_attention": ["ImprovedMultiheadDilatedAttention"],
    "ring_dilated_attention": ["RingDilatedAttention"],
    "ring_multihead_dilated_attention": ["RingMultiheadDilatedAttention"],
    "long_net": ["LongNet", "LongNetLM"],
    "transformer": ["DilatedTransformerEncoderLayer", "DilatedTransformerDecoderLayer"],
}


@pytest.mark.parametrize("module, names", ALIASES.items())
def test_alias_modules_only_re_export(module, names):
    mod = importlib.import_module(f"dilated_attention_pytorch.{module}")
    public = {k: v for k, v in vars(mod).items() if not k.startswith("_")}
    assert set(public) == set(names)
    for name in names:
        assert public[name] is getattr(dilated_ops, name)


def test_package_root_exports_every_class_and_function():
    import dilated_attention_pytorch

    for names in ALIASES.values():
        for name in names:
            assert getattr(dilated_attention_pytorch, name) is getattr(dilated_ops, name)
