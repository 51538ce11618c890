"""The variant table: its rows agree with the modules they name, and the factory, the rewrites'
target and the CLI take their names (and their refusals) from it."""
import dataclasses

import pytest
import torch

import dilated_ops
from dilated_ops import modules, variants
from dilated_ops.cli import build_parser
from dilated_ops.fx_passes import RewriteConfig

BUILT = [v for v in variants.VARIANTS.values() if v.built]
NOT_BUILT = [v for v in variants.VARIANTS.values() if not v.built]


def test_every_factory_name_has_a_row():
    assert set(variants.NAMES) == {"auto", *variants.VARIANTS}
    assert BUILT and NOT_BUILT


@pytest.mark.parametrize("variant", BUILT, ids=lambda v: v.name)
def test_built_rows_name_modules_that_pass_the_rows_op_arguments(variant):
    single, multi = getattr(modules, variant.module), getattr(modules, variant.multihead_module)
    assert single.implementation == multi.implementation == variant.name
    m = multi(16, 2, [1, 2], [4, 8])
    assert m.attention.op_kwargs == variant.op_kwargs
    assert isinstance(variant.op, torch._ops.OpOverloadPacket) and variant.dtypes("cpu")
    assert variants.get(variant.name) is variant


@pytest.mark.parametrize("variant", NOT_BUILT, ids=lambda v: v.name)
def test_unbuilt_rows_are_refused_everywhere_with_their_text(variant):
    kw = dict(segment_lengths=[4, 8], dilation_rates=[1, 2])
    for build in (lambda: variants.get(variant.name),
                  lambda: dilated_ops.create_dilated_attention(variant.name, **kw),
                  lambda: dilated_ops.create_multihead_dilated_attention(variant.name, embed_dim=8, num_heads=2, **kw),
                  lambda: RewriteConfig([4, 8], [1, 2], implementation=variant.name),
                  lambda: dilated_ops.backend([4, 8], [1, 2], implementation=variant.name)):
        with pytest.raises(NotImplementedError, match=variant.missing.split(":")[0]):
            build()


def test_unknown_names_are_value_errors_naming_the_argument():
    with pytest.raises(ValueError, match="implementation must be one of 'auto', 'standard'.*got 'fast'"):
        RewriteConfig([4], [1], implementation="fast")
    with pytest.raises(ValueError, match="attention_type must be one of .*got 'fast'"):
        dilated_ops.create_dilated_attention("fast", segment_lengths=[4], dilation_rates=[1])


def test_rewrite_target_is_the_rows_op_with_its_arguments():
    assert RewriteConfig([4], [1], implementation="standard").variant.op_kwargs == {"backend": "sdpa"}
    # "auto" in a rewrite is the variant that picks kernels per device when it runs.
    assert RewriteConfig([4], [1]).variant is variants.get("improved")
    graphs = []
    model = torch.nn.MultiheadAttention(8, 2, batch_first=True, dtype=torch.float64)
    be = dilated_ops.backend([8], [1], implementation="standard", inner=lambda gm, ex: graphs.append(gm) or gm)
    x = torch.randn(2, 8, 8, dtype=torch.float64)
    torch._dynamo.reset()
    try:
        torch.compile(model, backend=be, fullgraph=True)(x, x, x, need_weights=False)
    finally:
        torch._dynamo.reset()
    (node,) = [n for n in graphs[0].graph.nodes if n.target == torch.ops.dilated.dilated_attention.default]
    assert node.kwargs == {"backend": "sdpa"}


def test_cli_offers_the_built_rows():
    demo = build_parser()._subparsers._group_actions[0].choices["demo"]
    (action,) = [a for a in demo._actions if a.dest == "implementation"]
    assert tuple(action.choices) == ("auto",) + tuple(v.name for v in BUILT)


def test_markdown_table_lists_every_row_and_its_capabilities():
    table = variants.markdown_table()
    for v in variants.VARIANTS.values():
        assert f"| `{v.name}` |" in table
    assert "cpu: float32, float64" in table and "not built" in table


def test_rewrite_config_checks_and_overrides():
    base = RewriteConfig([4, 8], [1, 2], select=lambda p: True)
    assert RewriteConfig.of(base) is base
    assert RewriteConfig.of(base, strict=True) == dataclasses.replace(base, strict=True)
    assert RewriteConfig.of([4, 8], [1, 2], mode="longnet").mode == "longnet"
    with pytest.raises(TypeError, match="unknown rewrite option.*'segments'"):
        RewriteConfig.of(segments=[4])
    with pytest.raises(TypeError, match="select must be a callable"):
        RewriteConfig([4], [1], select="layers.0")
    with pytest.raises(ValueError, match="dilation_rates"):
        RewriteConfig([4, 8], [1])
