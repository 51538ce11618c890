"""The variant table: its rows agree with the modules they name, and the factory, the rewrites'
target and the CLI take their names (and their refusals) from it."""
import dataclasses

import pytest
import torch

import dilated_ops
from dilated_ops import modules, variants
from dilated_ops.cli import build_parser
from dilated_ops.fx_passes import RewriteConfig
from dilated_ops.variants import Call

BUILT = [v for v in variants.VARIANTS.values() if v.built]
NOT_BUILT = [v for v in variants.VARIANTS.values() if not v.built]


def test_every_factory_name_has_a_row():
    assert set(variants.NAMES) == {"auto", *variants.VARIANTS}
    assert BUILT and not NOT_BUILT, "every name the migration guide lists is built"


@pytest.fixture
def unbuilt_row(monkeypatch):
    """A row marked not built, as the table marks one (``missing``), in place of "distributed"."""
    row = dataclasses.replace(variants.VARIANTS["distributed"],
                              missing="distributed: sequence-parallel attention is not built yet")
    monkeypatch.setitem(variants.VARIANTS, row.name, row)
    return row


@pytest.mark.parametrize("variant", BUILT, ids=lambda v: v.name)
def test_built_rows_name_modules_that_pass_the_rows_op_arguments(variant):
    single, multi = getattr(modules, variant.module), getattr(modules, variant.multihead_module)
    assert single.implementation == multi.implementation == variant.name
    m = multi(embed_dim=16, num_heads=2, dilation_rates=[1, 2], segment_lengths=[4, 8])
    assert m.attention.op_kwargs == variant.op_kwargs and type(m.attention) is single
    x = torch.randn(2, 12, 16)
    assert m(x, x, x)[0].shape == x.shape
    assert isinstance(variant.op, torch._ops.OpOverloadPacket) and variant.dtypes("cpu")
    assert variants.get(variant.name) is variant


def test_unbuilt_rows_are_refused_everywhere_with_their_text(unbuilt_row):
    variant = unbuilt_row
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
    assert "cpu: float16, bfloat16, float32, float64" in table


def test_markdown_table_marks_unbuilt_rows(unbuilt_row):
    assert f"| `distributed` | {unbuilt_row.summary} | not built |" in variants.markdown_table()


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


def _opcheck_matrix():
    """(variant, device, dtype) for every built row of the table, on each device it runs on and
    each dtype it supports there (CUDA ones skip without a GPU). Rows whose op runs across
    processes are opchecked inside a process group (tests/test_sequence_parallel.py)."""
    for v in BUILT:
        if v.needs_group:
            continue
        for device, dtypes in v.devices:
            skip = pytest.mark.skipif(device == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA GPU")
            for dtype in dtypes:
                yield pytest.param(v, device, dtype, id=f"{v.name}-{device}-{str(dtype)[6:]}", marks=skip)


# Options for the rows that take them: a pattern small enough to have several blocks here.
OPTIONS = {"sparse_config": dilated_ops.SparsePatternConfig("dilated_sparse", block_size=4)}


@pytest.mark.parametrize(
    "shape,segs,rates,mode,causal",
    [
        ((2, 16, 3, 8), [4, 8], [1, 2], "groups", False),
        ((1, 21, 5, 8), [4, 8, 16], [1, 2, 4], "longnet", True),
        ((3, 7, 2, 16), [16], [2], "groups", True),
        ((1, 70, 4, 64), [16, 32], [1, 2], "groups", False),  # head_dim 64: CUDA's Triton forward
    ],
)
@pytest.mark.parametrize("variant,device,dtype", list(_opcheck_matrix()))
def test_opcheck_matrix(variant, device, dtype, shape, segs, rates, mode, causal):
    """Each row's op, called as the graph rewrites call it (``Variant.bind``)."""
    q, k, v = (torch.randn(*shape, dtype=dtype).to(device).requires_grad_() for _ in range(3))
    options = {name: OPTIONS[name] for name in variant.options if name in OPTIONS}  # process_group: none
    args, kwargs = variant.bind(Call(q, k, v, tuple(segs), tuple(rates), mode, causal, None, 0.0, None, options))
    torch.library.opcheck(variant.op.default, args, kwargs)


def test_block_sparse_row_through_every_rewrite_route(reset_dynamo):
    """The row added last goes through backend, convert and rewrite_exported with its option
    (``pattern``), equal to its function on the same projections; a call with dropout is
    refused (the row has none)."""
    import copy

    from torch import nn

    pat = dilated_ops.SparsePatternConfig("global_local", block_size=8, local_window_size=16, global_tokens=8)
    mha = nn.MultiheadAttention(16, 2, batch_first=True, dtype=torch.float64)
    x = torch.randn(2, 40, 16, dtype=torch.float64)
    w, b = mha.in_proj_weight, mha.in_proj_bias
    q, k, v = (t.unflatten(-1, (2, 8)) for t in torch.nn.functional.linear(x, w, b).chunk(3, -1))
    want = mha.out_proj(dilated_ops.block_sparse_attention(q, k, v, pat).flatten(-2))

    be = dilated_ops.backend([16, 32], [1, 2], implementation="block_sparse", pattern=pat, inner="aot_eager")
    got = torch.compile(copy.deepcopy(mha), backend=be, fullgraph=True)(x, x, x, need_weights=False)[0]
    assert len(be.report.rewritten) == 1
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    converted, report = dilated_ops.convert(copy.deepcopy(mha), [16, 32], [1, 2], implementation="block_sparse",
                                            pattern=pat)
    torch.testing.assert_close(converted(x, x, x, need_weights=False)[0], want, rtol=1e-10, atol=1e-10)

    class Attend(nn.Module):
        def forward(self, q):  # (batch, heads, seq, head_dim)
            return nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)

    qh = torch.randn(1, 2, 40, 8, dtype=torch.float64)
    program, report = dilated_ops.rewrite_exported(torch.export.export(Attend(), (qh,)), [16, 32], [1, 2],
                                                   implementation="block_sparse", pattern=pat)
    (node,) = [n for n in program.graph.nodes if n.target == torch.ops.dilated.block_sparse_attention.default]
    qt = qh.transpose(1, 2)
    torch.testing.assert_close(program.module()(qh),
                               dilated_ops.block_sparse_attention(qt, qt, qt, pat, is_causal=True).transpose(1, 2))

    dropping = nn.MultiheadAttention(16, 2, dropout=0.1, batch_first=True, dtype=torch.float64)
    _, report = dilated_ops.convert(dropping, [16, 32], [1, 2], implementation="block_sparse", pattern=pat)
    assert [e.reason for e in report.refused] == ["dropout_p=0.1 is not supported by implementation 'block_sparse'"]
    with pytest.raises(ValueError, match="pattern is read by implementation 'block_sparse' only"):
        RewriteConfig([16], [1], pattern=pat)
    with pytest.raises(ValueError, match="pattern_type must name a pattern in a rewrite"):
        RewriteConfig([16], [1], implementation="block_sparse", pattern=dilated_ops.SparsePatternConfig("mask"))
