"""The ATen-level pass over torch.export programs (dilated_ops.rewrite_exported, and
dilated_ops.export, which runs it after module swapping): aten.scaled_dot_product_attention
nodes become torch.ops.dilated.dilated_attention between transposes."""
import dataclasses
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from expecttest import assert_expected_inline
from torch import nn

import dilated_ops
from dilated_ops import variants
from dilated_ops.fx_passes import RewriteRefused
from dilated_ops.kernels.reference import dilated_attention_reference
from models import GPT, SelfMHA

D64 = torch.float64
N = 16
OP = torch.ops.dilated.dilated_attention.default
SDPA = torch.ops.aten.scaled_dot_product_attention.default


def idx(batch=2, n=N):
    return torch.randint(0, 11, (batch, n))


def count(ep, target):
    return sum(n.target == target for n in ep.graph.nodes)


def normalised(ep):
    """The program's call targets, one a line (names and sizes left out)."""
    return "\n".join(str(n.target) for n in ep.graph.nodes if n.op == "call_function")


def grads_equal(model, program, inputs):
    """Output and parameter gradients of ``program.module()`` equal ``model``'s (float64)."""
    out, got = model(*inputs), program.module()(*inputs)
    torch.testing.assert_close(got, out, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(out)
    want = torch.autograd.grad(out, list(model.parameters()), g)
    mod = program.module()
    have = dict(zip((n for n, _ in mod.named_parameters()),
                    torch.autograd.grad(mod(*inputs), list(mod.parameters()), g)))
    for (name, _), w in zip(model.named_parameters(), want):
        torch.testing.assert_close(have[name], w, rtol=1e-10, atol=1e-10, msg=name)


class Sdpa(nn.Module):
    def __init__(self, **kw):
        super().__init__()
        self.kw = kw

    def forward(self, q, k=None, v=None):
        return F.scaled_dot_product_attention(q, q if k is None else k, q if v is None else v, **self.kw)


def test_gpt_export_has_only_dilated_attention():
    model = GPT(layers=1)
    ep = dilated_ops.export(model, (idx(),), segment_lengths=[N], dilation_rates=[1])
    assert [str(e) for e in ep.dilated_ops_report.rewritten] == [
        "scaled_dot_product_attention at blocks.0 (node scaled_dot_product_attention)"]
    assert_expected_inline(normalised(ep), """\
aten.embedding.default
aten.layer_norm.default
aten.linear.default
aten.split.Tensor
<built-in function getitem>
<built-in function getitem>
<built-in function getitem>
aten.view.default
aten.transpose.int
aten.view.default
aten.transpose.int
aten.view.default
aten.transpose.int
aten.transpose.int
aten.transpose.int
aten.transpose.int
dilated.dilated_attention.default
<built-in function getitem>
aten.transpose.int
aten.transpose.int
aten.reshape.default
aten.linear.default
aten.add.Tensor
aten.linear.default
aten.gelu.default
aten.linear.default
aten.add.Tensor
aten.linear.default""")


def test_mha_program_without_conversion():
    # rewrite_exported on nn.MultiheadAttention's own export: its SDPA node is rewritten.
    ep = torch.export.export(SelfMHA(True), (torch.randn(2, N, 8, dtype=D64),))
    new, report = dilated_ops.rewrite_exported(ep, [N], [1])
    assert [e.module_path for e in report.rewritten] == ["attn"]
    assert (count(new, OP), count(new, SDPA), count(ep, SDPA)) == (1, 0, 1)  # ep kept


def test_gpt_dense_branch_equals_original_with_grads():
    model = GPT()
    ep = dilated_ops.export(model, (idx(),), segment_lengths=[N], dilation_rates=[1])
    assert count(ep, OP) == 2 and count(ep, SDPA) == 0
    grads_equal(model, ep, (idx(),))


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("kdim", [None, 6])
def test_rewrite_exported_mha_dense_branch_equals_original(batch_first, kdim):
    # kdim=6: separate q/k/v projection weights, key and value another input of query's length.
    model = SelfMHA(batch_first, kdim=kdim, vdim=kdim)
    shape = (3, N) if batch_first else (N, 3)
    inputs = (torch.randn(*shape, 8, dtype=D64),) + ((torch.randn(*shape, 6, dtype=D64),) * 2 if kdim else ())
    new, report = dilated_ops.rewrite_exported(torch.export.export(model, inputs), [N], [1])
    if kdim:  # key and value from another input: cross-attention, refused whatever the shapes
        assert not report.rewritten and report.refused[0].reason.startswith("cross-attention: the key is projected")
        return
    assert len(report.rewritten) == 1 and not report.refused
    grads_equal(model, new, inputs)


def test_real_dilated_config_equals_reference():
    segs, rates = [4, 8], [1, 2]
    q, k, v = (torch.randn(2, 2, 32, 4, dtype=D64) for _ in range(3))
    new, _ = dilated_ops.rewrite_exported(torch.export.export(Sdpa(is_causal=True), (q, k, v)), segs, rates)
    want = dilated_attention_reference(*(t.transpose(1, 2) for t in (q, k, v)), segs, rates, is_causal=True)
    got = new.module()(q, k, v)
    torch.testing.assert_close(got, want.transpose(1, 2), rtol=1e-10, atol=1e-10)
    assert (got - F.scaled_dot_product_attention(q, k, v, is_causal=True)).abs().max() > 1e-3


def test_scale_is_passed_through():
    q = torch.randn(1, 2, N, 4, dtype=D64)
    new, _ = dilated_ops.rewrite_exported(torch.export.export(Sdpa(scale=0.3), (q,)), [N], [1])
    torch.testing.assert_close(new.module()(q), F.scaled_dot_product_attention(q, q, q, scale=0.3))


def test_dynamic_batch_and_sequence():
    batch, seq = torch.export.Dim("batch", max=64), torch.export.Dim("seq", min=2, max=128)
    model = GPT()
    ep = dilated_ops.export(model, (idx(),), segment_lengths=[128], dilation_rates=[1],
                            dynamic_shapes=({0: batch, 1: seq},))
    for b, n in ((1, 5), (3, 40)):
        x = idx(b, n)
        torch.testing.assert_close(ep.module()(x), model(x), rtol=1e-10, atol=1e-10)


def test_save_load_round_trip(tmp_path):
    model = GPT()
    ep = dilated_ops.export(model, (idx(),), segment_lengths=[4, 8], dilation_rates=[1, 2])
    torch.export.save(ep, tmp_path / "gpt.pt2")
    loaded = torch.export.load(tmp_path / "gpt.pt2")
    assert count(loaded, OP) == 2 and count(loaded, SDPA) == 0
    x = idx()
    torch.testing.assert_close(loaded.module()(x), ep.module()(x), rtol=0, atol=0)


def test_fresh_process_loads_and_matches(tmp_path):
    # A new interpreter: `import dilated_ops` registers the op, the saved program runs there.
    model = GPT()
    x = idx()
    ep = dilated_ops.export(model, (x,), segment_lengths=[4, 8], dilation_rates=[1, 2])
    torch.export.save(ep, tmp_path / "gpt.pt2")
    torch.save({"x": x, "out": ep.module()(x).detach()}, tmp_path / "io.pt")
    script = (
        "import sys, torch, dilated_ops\n"
        "ep = torch.export.load(sys.argv[1] + '/gpt.pt2')\n"
        "io = torch.load(sys.argv[1] + '/io.pt')\n"
        "assert any(n.target == torch.ops.dilated.dilated_attention.default for n in ep.graph.nodes)\n"
        "torch.testing.assert_close(ep.module()(io['x']), io['out'], rtol=0, atol=0)\n"
        "print('fresh process ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "fresh process ok"


def refused(model, inputs, **kw):
    ep = torch.export.export(model, inputs)
    new, report = dilated_ops.rewrite_exported(ep, [N], [1], **kw)
    assert count(new, SDPA) == 1 and count(new, OP) == 0 and not report.rewritten
    return [e.reason for e in report.refused]


def test_refusals(monkeypatch):
    q = torch.randn(2, 2, N, 4, dtype=D64)
    float_mask = type("M", (nn.Module,), {"forward": lambda s, q, m: F.scaled_dot_product_attention(q, q, q, attn_mask=m)})
    assert refused(float_mask(), (q, torch.randn(N, N, dtype=D64))) == [
        "a float attn_mask (an additive bias) is not supported by dilated attention (use is_causal=True)"]
    # a boolean mask given as an input: its values are unknown, and it is no (batch, seq) padding
    assert refused(float_mask(), (q, torch.ones(N, N, dtype=torch.bool).tril())) == [
        f"a boolean attn_mask built from input m of shape ({N}, {N}), not a (batch, seq) = (2, {N}) key padding mask"]
    k = torch.randn(2, 2, 8, 4, dtype=D64)
    (reason,) = refused(Sdpa(), (q, k, k))
    assert reason.startswith(f"query length {N} differs from key length 8")
    # Every single-process row takes GQA now: a row without it, made so here, refuses it.
    gqa_inputs = (torch.randn(2, 4, N, 4, dtype=D64), q, q)
    new, report = dilated_ops.rewrite_exported(torch.export.export(Sdpa(enable_gqa=True), gqa_inputs), [N], [1],
                                               implementation="block_sparse")
    assert len(report.rewritten) == 1 and count(new, torch.ops.dilated.block_sparse_attention.default) == 1
    row = variants.VARIANTS["block_sparse"]
    monkeypatch.setitem(variants.VARIANTS, "block_sparse", dataclasses.replace(row, gqa=False))
    (reason,) = refused(Sdpa(enable_gqa=True), gqa_inputs, implementation="block_sparse")
    assert reason == "enable_gqa=True is not supported by implementation 'block_sparse'"
    assert refused(Sdpa(dropout_p=0.5), (q,)) == ["dropout_p=0.5 in an exported program (export in eval mode)"]
    assert refused(SelfMHA(True, add_bias_kv=True), (torch.randn(2, N, 8, dtype=D64),))[0].startswith(
        f"query length {N} differs from key length {N + 1}")


def test_select_strict_and_argument_checks():
    model = GPT()
    ep = torch.export.export(model, (idx(),))
    new, report = dilated_ops.rewrite_exported(ep, [N], [1], select=lambda path: path == "blocks.1")
    assert [e.module_path for e in report.rewritten] == ["blocks.1"]
    assert [(e.module_path, e.reason) for e in report.skipped] == [("blocks.0", "not chosen by select")]
    assert count(new, SDPA) == 1 and count(new, OP) == 1
    q = torch.randn(2, 2, N, 4, dtype=D64)
    with pytest.raises(RewriteRefused, match="dropout_p=0.5"):
        dilated_ops.rewrite_exported(torch.export.export(Sdpa(dropout_p=0.5), (q,)), [N], [1], strict=True)
    with pytest.raises(TypeError, match="ep must be a torch.export.ExportedProgram: got GPT"):
        dilated_ops.rewrite_exported(model, [N], [1])
    with pytest.raises(ValueError, match="segment_lengths"):
        dilated_ops.rewrite_exported(ep, [N, 8], [1])


def test_enable_gqa_and_a_padding_mask_are_rewritten_and_equal_sdpa():
    """Issue 21: SDPA with enable_gqa=True (2 KV heads for 4 query heads) and a boolean
    (batch, 1, 1, seq) padding mask built from a (batch, seq) input: one dense branch equals
    SDPA at every query that sees a key."""
    class Padded(nn.Module):
        def forward(self, q, k, v, keep):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :], enable_gqa=True)

    q, k, v = torch.randn(2, 4, N, 4, dtype=D64), torch.randn(2, 2, N, 4, dtype=D64), torch.randn(2, 2, N, 4, dtype=D64)
    keep = torch.rand(2, N) > 0.3
    keep[:, 0] = True
    new, report = dilated_ops.rewrite_exported(torch.export.export(Padded(), (q, k, v, keep)), [N], [1])
    assert len(report.rewritten) == 1 and not report.refused and count(new, OP) == 1
    torch.testing.assert_close(new.module()(q, k, v, keep), Padded()(q, k, v, keep), rtol=1e-10, atol=1e-10)
