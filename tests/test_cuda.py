"""GPU paths (cuDNN, flash, efficient, float64 math) against the float64 reference.
Skipped without CUDA; run on the device (see README, "GPU tests")."""
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import dilated_ops
from dilated_ops.kernels import attention
from dilated_ops.kernels.reference import dilated_attention_reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

BACKENDS = {
    # name: (sdpa_kernel backends that leave this one first in our order, dtype, rel tolerance)
    # "triton-*": our in-place Triton forward (groups mode), cuDNN backward; the others run
    # with Triton off.
    "triton-bf16": ([SDPBackend.CUDNN_ATTENTION], torch.bfloat16, 2e-2),
    "triton-fp16": ([SDPBackend.CUDNN_ATTENTION], torch.float16, 4e-3),
    "cudnn-bf16": ([SDPBackend.CUDNN_ATTENTION], torch.bfloat16, 2e-2),
    "cudnn-fp16": ([SDPBackend.CUDNN_ATTENTION], torch.float16, 4e-3),
    "flash-bf16": ([SDPBackend.FLASH_ATTENTION], torch.bfloat16, 2e-2),
    "efficient-fp32": ([SDPBackend.EFFICIENT_ATTENTION], torch.float32, 1e-5),
    "math-fp64": ([SDPBackend.MATH], torch.float64, 1e-10),
}
EXPECTED = {"triton-bf16": "cudnn", "triton-fp16": "cudnn", "cudnn-bf16": "cudnn", "cudnn-fp16": "cudnn", "flash-bf16": "flash", "efficient-fp32": "efficient", "math-fp64": "math"}

CASES = [
    # (b, n, h, d, segs, rates)
    (2, 300, 5, 64, [64, 128, 256], [1, 2, 4]),   # n not a multiple of any w, batch 2
    (1, 1024, 12, 64, [128, 256, 512], [1, 2, 4]),
    (3, 77, 7, 32, [16, 200], [2, 4]),           # w > n
    (1, 512, 3, 128, [512], [8]),
    (2, 21, 5, 64, [4, 8, 16], [1, 2, 4]),      # one-token pieces (cuDNN refuses s_q = s_kv = 1)
]


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-6)).item()


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"b{c[0]}n{c[1]}h{c[2]}d{c[3]}")
@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("mode", ["groups", "longnet"])
@pytest.mark.parametrize("name", list(BACKENDS))
def test_backend_matches_reference(name, mode, is_causal, case, monkeypatch):
    from dilated_ops.kernels import triton_forward

    monkeypatch.setattr(triton_forward, "ENABLED", name.startswith("triton"))
    kernels, dtype, tol = BACKENDS[name]
    b, n, h, d, segs, rates = case
    qkv = torch.randn(b, n, 3, h, d, device="cuda", dtype=torch.float64)
    q64, k64, v64 = (t.requires_grad_() for t in qkv.clone().unbind(2))
    # q, k, v as strided slices of a fused projection, as models produce them
    fused = qkv.to(dtype).requires_grad_()
    q, k, v = fused.unbind(2)
    g = torch.randn(b, n, h, d, device="cuda", dtype=torch.float64)
    with sdpa_kernel(kernels):
        assert attention.select_backend(q, 0.0, 0.125) == EXPECTED[name]
        out = dilated_ops.dilated_attention(q, k, v, segs, rates, mode=mode, is_causal=is_causal)
        out.backward(g.to(dtype))
    ref = dilated_attention_reference(q64, k64, v64, segs, rates, mode=mode, is_causal=is_causal)
    ref.backward(g)
    assert out.dtype == dtype
    assert rel(out, ref) < tol
    for i, want in enumerate((q64.grad, k64.grad, v64.grad)):
        assert rel(fused.grad[:, :, i], want) < tol, ("dq", "dk", "dv")[i]


def test_cudnn_backward_unaffected_by_other_layouts():
    # PyTorch 2.11 caches cuDNN backward graphs by q/k/v layout and silently misreads
    # grad_out/out of another layout: run F.sdpa's own backward on the shapes first, then ours.
    b, n, h, d = 1, 512, 4, 64
    q, k, v = (torch.randn(b, n, h, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        for _ in range(2):
            qt, kt, vt = (t.detach().transpose(1, 2).requires_grad_() for t in (q, k, v))
            torch.nn.functional.scaled_dot_product_attention(qt, kt, vt).sum().backward()
            out = dilated_ops.dilated_attention(q, k, v, [128, 512], [1, 4], mode="longnet")
            g = torch.randn_like(out)
            dq, dk, dv = torch.autograd.grad(out, (q, k, v), g)
            ref_in = [t.detach().double().requires_grad_() for t in (q, k, v)]
            ref = dilated_attention_reference(*ref_in, [128, 512], [1, 4], mode="longnet")
            want = torch.autograd.grad(ref, ref_in, g.double())
            for got, w in zip((dq, dk, dv), want):
                assert rel(got, w) < 2e-2


def test_compile_on_cuda():
    q, k, v = (torch.randn(1, 1000, 6, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    fn = lambda q, k, v: dilated_ops.dilated_attention(q, k, v, [128, 256, 512], [1, 2, 4], is_causal=True)
    compiled = torch.compile(fn, fullgraph=True, dynamic=True)
    eager = fn(q, k, v)
    got = compiled(q, k, v)
    assert torch.equal(got, eager)
    g = torch.randn_like(eager)
    for a, c in zip(torch.autograd.grad(got, (q, k, v), g), torch.autograd.grad(eager, (q, k, v), g)):
        assert torch.equal(a, c)


@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("d", [16, 32, 64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_forward_writes_every_selected_element(dtype, d, is_causal):
    from dilated_ops.kernels import triton_forward
    from dilated_ops.kernels.segments import plan, segment_views, to_bhld

    b, n, h = 2, 700, 5  # partial trailing segment, odd heads
    q, k, v = (torch.randn(b, n, h, d, device="cuda", dtype=dtype) for _ in range(3))
    out = torch.full((b, n, h, d), float("nan"), device="cuda", dtype=dtype)
    lse = torch.full((b, n, h), float("nan"), device="cuda")
    for call in plan(h, (128, 512), (1, 4), "groups"):
        for qp, kp, vp, op, lp in zip(*(segment_views(t, call) for t in (q, k, v, out, lse))):
            triton_forward.forward_into(qp, kp, vp, op, lp, is_causal, d**-0.5, 0.5)
            want = torch.nn.functional.scaled_dot_product_attention(
                *(to_bhld(t).float() for t in (qp, kp, vp)), is_causal=is_causal
            ) * 0.5
            assert not torch.isnan(op).any() and not torch.isnan(lp).any()
            assert rel(to_bhld(op), want) < 1e-2
            s = to_bhld(qp).float() @ to_bhld(kp).float().transpose(-1, -2) * d**-0.5
            if is_causal:
                s = s.masked_fill(torch.ones_like(s, dtype=torch.bool).triu(1), float("-inf"))
            torch.testing.assert_close(to_bhld(lp), torch.logsumexp(s, -1), atol=2e-2, rtol=1e-3)


@pytest.mark.parametrize("n", [4096, 4096 + 777, 1000])
@pytest.mark.parametrize("is_causal", [False, True])
def test_groups_output_fully_written_from_poisoned_memory(n, is_causal):
    # Hand the op NaN-poisoned memory through the caching allocator (a freed block of the same
    # size is reused for the next allocation) and check every element of out and lse was
    # written (zero fill, in-place kernel writes, partial trailing segments).
    from dilated_ops.kernels import triton_forward

    b, h, d = 2, 7, 64
    segs, rates = [512, 1536, 2048], [1, 3, 4]
    q, k, v = (torch.randn(b, n, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    assert triton_forward.supported(q, 0.0, 0.125)
    poison = torch.full((b, n, h, d), float("nan"), device="cuda", dtype=torch.bfloat16)
    poison_lse = torch.full((b, n, h), float("nan"), device="cuda")
    ptr, ptr_lse = poison.data_ptr(), poison_lse.data_ptr()
    del poison, poison_lse
    out, lse = torch.ops.dilated.dilated_attention(q, k, v, segs, rates, "groups", is_causal)
    assert out.data_ptr() == ptr and lse.data_ptr() == ptr_lse, "allocator did not reuse the poisoned blocks"
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    ref = dilated_attention_reference(q.double(), k.double(), v.double(), segs, rates, is_causal=is_causal)
    assert rel(out, ref) < 2e-2


@pytest.mark.parametrize("backend", ["auto", "sdpa"])
@pytest.mark.parametrize("scale", [-0.3, 0.0, 0.3])
def test_any_scale_sign_forward_backward(scale, backend):
    # The Triton forward takes the running max of unscaled scores (valid for scale > 0 only),
    # and torch 2.11's cuDNN and flash SDPA return NaN for scale <= 0: other scales must take
    # another path and still match the reference, forward and backward.
    from dilated_ops.kernels import triton_forward

    q, k, v = (torch.randn(2, 1000, 5, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    segs, rates = [128, 512], [1, 4]
    assert triton_forward.supported(q, 0.0, scale) == (scale > 0)
    assert (attention.select_backend(q, 0.0, scale) in ("cudnn", "flash")) == (scale > 0)
    got = dilated_ops.dilated_attention(q, k, v, segs, rates, scale=scale, backend=backend)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = dilated_attention_reference(q64, k64, v64, segs, rates, scale=scale)
    assert rel(got, ref) < 1e-2
    g = torch.randn_like(ref)
    for a, c in zip(torch.autograd.grad(got, (q, k, v), g.to(got.dtype)), torch.autograd.grad(ref, (q64, k64, v64), g)):
        # scale 0: dq and dk are exactly zero, so bound the error by v's gradient scale too
        assert (a.double() - c).norm() <= 2e-2 * c.norm() + 1e-3 * a.numel() ** 0.5


def test_kernel_sdpa_skips_triton_and_agrees():
    q, k, v = (torch.randn(1, 2048, 6, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    auto = dilated_ops.dilated_attention(q, k, v, [256, 512, 1024], [1, 2, 4])
    sdpa = dilated_ops.dilated_attention(q, k, v, [256, 512, 1024], [1, 2, 4], backend="sdpa")
    assert not torch.equal(auto, sdpa)  # different kernels, different rounding
    assert rel(auto, sdpa) < 1e-2


def _replay_inputs(layout, b, n, h, d=64):
    """q, k, v ``(b, n, h, d)`` bf16 in one of the layouts the recorded launches key on."""
    if layout == "contiguous":
        return [torch.randn(b, n, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(3)]
    if layout == "fused":  # slices of one (b, n, 3, h, d) projection
        return list(torch.randn(b, n, 3, h, d, device="cuda", dtype=torch.bfloat16).unbind(2))
    if layout == "unaligned":  # rows 2 bytes off 16-byte alignment: pointer loads, not TMA
        return [torch.randn(b, n, h, d + 1, device="cuda", dtype=torch.bfloat16)[..., 1:] for _ in range(3)]
    raise ValueError(layout)


@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("layout, b, n, h, segs, rates", [
    ("fused", 2, 300, 5, [64, 128, 256], [1, 2, 4]),                # partial trailing segments
    ("contiguous", 1, 4096 + 777, 7, [512, 1536, 2048], [1, 3, 4]),
    ("unaligned", 3, 1000, 6, [128, 512], [1, 4]),
])
def test_replayed_launches_match_the_plain_launches(layout, b, n, h, segs, rates, is_causal, monkeypatch):
    # The first call of a layout records its Triton launches, later calls replay them on new
    # tensors; the replay must compute exactly what the plain (JIT) launches do, write every
    # element (poisoned memory), and not reuse launches across layouts.
    from dilated_ops.kernels import triton_replay
    from dilated_ops.kernels.segments import plan, segment_views

    if not triton_replay.REPLAY:
        pytest.skip(f"launch replay is off for Triton {triton_replay.triton.__version__}")
    triton_replay.clear_recorded()
    call = lambda q, k, v: torch.ops.dilated.dilated_attention(q, k, v, segs, rates, "groups", is_causal)
    q_rec, k_rec, v_rec = _replay_inputs(layout, b, n, h)
    call(q_rec, k_rec, v_rec)
    assert triton_replay.num_recorded() == 1
    (rec,) = triton_replay._LAUNCHES.values()
    launches = rec.launches
    assert rec.direct is not None, "Triton 3.6: replays go straight to the C launcher"
    pieces = [p for c in plan(h, tuple(segs), tuple(rates), "groups") for p in segment_views(q_rec, c)]
    assert len(launches) == len(pieces)
    assert all((x.tma is None) == (layout == "unaligned") for x in launches)

    q, k, v = _replay_inputs(layout, b, n, h)
    poison = torch.full((b, n, h, 64), float("nan"), device="cuda", dtype=torch.bfloat16)
    poison_lse = torch.full((b, n, h), float("nan"), device="cuda")
    ptr, ptr_lse = poison.data_ptr(), poison_lse.data_ptr()
    del poison, poison_lse
    out, lse = call(q, k, v)
    assert out.data_ptr() == ptr and lse.data_ptr() == ptr_lse, "allocator did not reuse the poisoned blocks"
    assert triton_replay.num_recorded() == 1, "same layout: replayed, not recorded again"
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    assert len(rec.ready) == 1, "one argument set per set of base pointers"
    first = out.clone(), lse.clone()
    out.fill_(float("nan")), lse.fill_(float("nan"))
    del out, lse
    out, lse = call(q, k, v)  # the same blocks again: the argument set built above
    assert (out.data_ptr(), lse.data_ptr()) == (ptr, ptr_lse) and len(rec.ready) == 1
    assert torch.equal(out, first[0]) and torch.equal(lse, first[1])

    monkeypatch.setattr(triton_replay, "REPLAY", False)
    triton_replay.clear_recorded()
    plain_out, plain_lse = call(q, k, v)
    assert triton_replay.num_recorded() == 0
    assert torch.equal(out, plain_out) and torch.equal(lse, plain_lse)
    ref = dilated_attention_reference(q.double(), k.double(), v.double(), segs, rates, is_causal=is_causal)
    assert rel(out, ref) < 2e-2


def test_replay_calls_triton_launch_hooks():
    # A launch hook (a profiler such as proton) must see every replayed launch: with one set,
    # replays take Triton's launch path instead of the C launcher, with the same results.
    from dilated_ops.kernels import triton_replay

    if not triton_replay.REPLAY:
        pytest.skip(f"launch replay is off for Triton {triton_replay.triton.__version__}")
    triton_replay.clear_recorded()
    q, k, v = _replay_inputs("contiguous", 2, 1000, 6)
    segs, rates = [128, 512], [1, 4]
    direct = [dilated_ops.dilated_attention(q, k, v, segs, rates) for _ in range(2)][-1]
    (rec,) = triton_replay._LAUNCHES.values()
    seen = []
    hooks = triton_replay.triton.knobs.runtime.launch_enter_hook  # Triton 3.6: a HookChain
    hook = lambda metadata: seen.append(metadata.get()["name"])
    hooks.add(hook)
    try:
        hooked = dilated_ops.dilated_attention(q, k, v, segs, rates)
    finally:
        hooks.remove(hook)
    assert seen == ["_dilated_fwd"] * len(rec.launches)
    assert torch.equal(hooked, direct)
    seen.clear()
    dilated_ops.dilated_attention(q, k, v, segs, rates)
    assert seen == []


def test_replay_keys_on_alignment_and_config():
    # Same shape and strides, base pointers 16-byte aligned or not, causal or not: four
    # layouts, each with its own launches, each correct.
    from dilated_ops.kernels import triton_replay

    if not triton_replay.REPLAY:
        pytest.skip(f"launch replay is off for Triton {triton_replay.triton.__version__}")
    triton_replay.clear_recorded()
    b, n, h, d, segs, rates = 1, 1500, 6, 64, [256, 1024], [1, 4]
    numel = b * n * h * d
    flat = torch.randn(3, numel + 8, device="cuda", dtype=torch.bfloat16)
    for start in (8, 1, 8, 1):  # 16 bytes in: aligned; 2 bytes in: not
        q, k, v = (flat[i, start:start + numel].view(b, n, h, d) for i in range(3))
        for is_causal in (False, True):
            out = dilated_ops.dilated_attention(q, k, v, segs, rates, is_causal=is_causal)
            ref = dilated_attention_reference(q.double(), k.double(), v.double(), segs, rates, is_causal=is_causal)
            assert rel(out, ref) < 2e-2, (start, is_causal)
    assert triton_replay.num_recorded() == 4
    info = dilated_ops.get_memory_pool_info()["caches"]["kernels.triton_replay.launches"]
    assert info["entries"] == 4 and info["tensor_bytes"] == 0
    dilated_ops.clear_memory_pool()
    assert triton_replay.num_recorded() == 0


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 2e-2), (torch.float16, 4e-3), (torch.float32, 1e-5)])
@pytest.mark.parametrize("pattern,is_causal", [("local_window", False), ("global_local", True),
                                               ("dilated_sparse", True)])
def test_block_sparse_on_cuda_matches_reference(pattern, is_causal, dtype, tol):
    from dilated_ops.kernels import block_sparse
    from dilated_ops.kernels.reference import block_sparse_reference

    b, n, h, d, bs = 2, 300, 5, 64, 32
    cfg = dilated_ops.SparsePatternConfig(pattern, block_size=bs, local_window_size=96, global_tokens=32)
    qkv = torch.randn(b, n, 3, h, d, device="cuda", dtype=torch.float64)
    q64, k64, v64 = (t.requires_grad_() for t in qkv.clone().unbind(2))
    fused = qkv.to(dtype).requires_grad_()
    q, k, v = fused.unbind(2)
    g = torch.randn(b, n, h, d, device="cuda", dtype=torch.float64)
    out = dilated_ops.block_sparse_attention(q, k, v, cfg, is_causal=is_causal, segment_lengths=[64, 128],
                                             dilation_rates=[1, 2])
    out.backward(g.to(dtype))
    layout = block_sparse.pattern_layout(pattern, n, h, bs, 96, 32, 0.1, (64, 128), (1, 2), is_causal, q.device)
    ref = block_sparse_reference(q64, k64, v64, layout, bs, is_causal)
    ref.backward(g)
    assert out.dtype == dtype and rel(out, ref) < tol
    for i, want in enumerate((q64.grad, k64.grad, v64.grad)):
        assert rel(fused.grad[:, :, i], want) < tol, ("dq", "dk", "dv")[i]


@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("block_size,d", [(16, 64), (64, 64), (128, 64), (128, 128), (32, 16)])
def test_block_sparse_triton_kernels_match_reference_and_opcheck(block_size, d, is_causal):
    """The Triton path (CUDA half types, these block and head sizes): a random per-head mask with
    an empty query block and a partial last block, against the reference; opcheck of the op."""
    from dilated_ops.kernels import block_sparse
    from dilated_ops.kernels.reference import block_sparse_reference

    b, h = 2, 3
    n = 5 * block_size - 3
    nb = block_sparse.num_blocks(n, block_size)
    mask = torch.rand(h, nb, nb, device="cuda") < 0.5
    mask[1, 2] = False
    q, k, v = (torch.randn(b, n, h, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    assert block_sparse._triton(q, q, block_size, None) is not None
    cfg = dilated_ops.SparsePatternConfig("mask", block_size=block_size)
    out = dilated_ops.block_sparse_attention(q, k, v, cfg, is_causal=is_causal, block_mask=mask)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    ref_in = [t.detach().double().requires_grad_() for t in (q, k, v)]
    layout = block_sparse.causal_blocks(mask) if is_causal else mask
    ref = block_sparse_reference(*ref_in, layout, block_size, is_causal)
    ref_grads = torch.autograd.grad(ref, ref_in, g.double())
    assert not out.isnan().any() and rel(out, ref) < 2e-2
    assert out[:, 2 * block_size:3 * block_size, 1].abs().max() == 0  # the empty query block
    for got, want in zip(grads, ref_grads):
        assert not got.isnan().any() and rel(got, want) < 2e-2
    torch.library.opcheck(torch.ops.dilated.block_sparse_attention.default,
                          (q, k, v, "mask", block_size, None, 0, 0.1, [], [], is_causal, None, mask))


@pytest.mark.parametrize("layout_kind", ["contiguous", "fused_qkv", "transposed"])
def test_block_sparse_tma_and_pointer_loads_agree(monkeypatch, layout_kind):
    """On Hopper the Triton kernels load through TMA descriptors where the tensors allow it
    (contiguous, or rows of a fused qkv projection), else through pointers: both give the same
    outputs and gradients, partial last block and batch > 1 included (TMA reads the next batch's
    rows past the end of a sequence; the kernels must mask them)."""
    from dilated_ops.kernels import triton_block_sparse

    b, n, h, d, bs = 3, 4 * 128 - 37, 5, 64, 128
    if layout_kind == "fused_qkv":
        qkv = torch.randn(b, n, 3, h, d, device="cuda", dtype=torch.bfloat16)
        q, k, v = qkv.unbind(2)
    elif layout_kind == "transposed":
        q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16).transpose(1, 2) for _ in range(3))
    else:
        q, k, v = (torch.randn(b, n, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    expect_tma = layout_kind != "transposed" and torch.cuda.get_device_capability() >= (9, 0)
    assert triton_block_sparse._use_tma(q, k, v) == expect_tma
    cfg = dilated_ops.SparsePatternConfig("local_window", block_size=bs, local_window_size=256)
    g = torch.randn(b, n, h, d, device="cuda", dtype=torch.bfloat16)
    results = []
    for flag in ("1", "0"):
        monkeypatch.setenv("DILATED_OPS_TMA", flag)
        for is_causal in (False, True):
            leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
            out = dilated_ops.block_sparse_attention(*leaves, cfg, is_causal=is_causal)
            results.append((out, *torch.autograd.grad(out, leaves, g)))
    for with_tma, with_pointers in zip(results[:2], results[2:]):
        for a, c in zip(with_tma, with_pointers):
            assert not a.isnan().any() and rel(a, c) < 1e-3


@pytest.mark.parametrize("tma", ["1", "0"])
def test_block_sparse_replayed_launches_match_the_plain_launches(tma, monkeypatch):
    """The block-sparse kernels' launches are recorded per layout (forward, dQ, dK/dV) and
    replayed on later calls (new tensors, the allocator's memory poisoned first): the same
    outputs and gradients as Triton's own launches, a new layout recorded apart, TMA and pointer
    loads never mixed up."""
    from dilated_ops.kernels import triton_replay

    if not triton_replay.REPLAY:
        pytest.skip(f"launch replay is off for Triton {triton_replay.triton.__version__}")
    monkeypatch.setenv("DILATED_OPS_TMA", tma)
    b, n, h, d, bs = 2, 5 * 64 - 11, 3, 64, 64
    cfg = dilated_ops.SparsePatternConfig("local_window", sparsity_ratio=0.3, block_size=bs, local_window_size=None)
    q, k, v, g = (torch.randn(b, n, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(4))

    def run(seq=n):
        leaves = [t[:, :seq].detach().clone().requires_grad_() for t in (q, k, v)]
        out = dilated_ops.block_sparse_attention(*leaves, cfg, is_causal=True)
        return (out, *torch.autograd.grad(out, leaves, g[:, :seq]))

    triton_replay.clear_recorded()
    first = run()
    assert triton_replay.num_recorded() == 3, "forward, dQ and dK/dV launches"
    assert all(r.direct is not None for r in triton_replay._LAUNCHES.values())
    torch.full((8 * b * n * h * d,), float("nan"), device="cuda", dtype=torch.bfloat16)  # freed: poisoned blocks
    replayed = run()
    assert triton_replay.num_recorded() == 3, "same layout: replayed, not recorded again"
    shorter = run(n - 64)
    assert triton_replay.num_recorded() == 6
    monkeypatch.setattr(triton_replay, "REPLAY", False)
    plain, plain_shorter = run(), run(n - 64)
    for a, c, x in zip(first, replayed, plain):
        assert not a.isnan().any() and torch.equal(a, x) and torch.equal(c, x)
    for a, x in zip(shorter, plain_shorter):
        assert torch.equal(a, x)
    from dilated_ops.kernels import block_sparse
    from dilated_ops.kernels.reference import block_sparse_reference

    layout = block_sparse.pattern_layout("local_window", n, h, bs, None, bs, 0.3, (), (), True, q.device)
    ref = block_sparse_reference(q.double(), k.double(), v.double(), layout, bs, True)
    assert rel(plain[0], ref) < 2e-2


MASK_CASES = [
    # (b, n, h, h_kv, d, segs, rates)
    (3, 300, 8, 2, 64, [64, 128, 256], [1, 2, 4]),   # GQA 4:1, n not a multiple of any w
    (2, 257, 6, 3, 64, [64, 128], [1, 2]),           # 2:1, odd length
    (2, 512, 5, 1, 128, [128, 512], [1, 4]),         # heads_kv = 1, odd head count
    (2, 192, 4, 4, 32, [32, 64], [1, 2]),            # no GQA
]


@pytest.mark.parametrize("case", MASK_CASES, ids=lambda c: f"b{c[0]}n{c[1]}h{c[2]}kv{c[3]}d{c[4]}")
@pytest.mark.parametrize("extra", ["gqa", "padding", "packed"])
@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("mode", ["groups", "longnet"])
@pytest.mark.parametrize("name", list(BACKENDS))
def test_gqa_padding_packed_match_reference(name, mode, is_causal, extra, case, monkeypatch):
    """SPEC section 8 on the GPU: grouped-query attention (K/V with fewer heads), random key padding
    with a fully padded batch row, and packed documents, on each backend, forward and backward."""
    from dilated_ops.kernels import triton_forward

    monkeypatch.setattr(triton_forward, "ENABLED", name.startswith("triton"))
    kernels, dtype, tol = BACKENDS[name]
    b, n, h, h_kv, d, segs, rates = case
    torch.manual_seed(n + h)
    leaves64 = [torch.randn(b, n, hh, d, device="cuda", dtype=torch.float64, requires_grad=True)
                for hh in (h, h_kv, h_kv)]
    leaves = [t.detach().to(dtype).requires_grad_() for t in leaves64]
    g = torch.randn(b, n, h, d, device="cuda", dtype=torch.float64)
    kw = {}
    if extra == "padding":
        keep = torch.rand(b, n, device="cuda") > 0.3
        keep[1] = False
        kw["key_padding_mask"] = keep
    if extra == "packed":
        kw["cu_seqlens"] = torch.tensor([0, n // 3, n // 3 + 5, n], device="cuda", dtype=torch.int32)
    with sdpa_kernel(kernels):
        out = dilated_ops.dilated_attention(*leaves, segs, rates, mode=mode, is_causal=is_causal, **kw)
        out.backward(g.to(dtype))
    if "cu_seqlens" in kw:
        kw["cu_seqlens"] = kw["cu_seqlens"].tolist()
    ref = dilated_attention_reference(*leaves64, segs, rates, mode=mode, is_causal=is_causal, **kw)
    ref.backward(g)
    assert out.dtype == dtype and not out.isnan().any()
    assert rel(out, ref) < tol
    for i, (got, want) in enumerate(zip(leaves, leaves64)):
        assert got.grad.shape == want.shape and not got.grad.isnan().any()
        assert rel(got.grad, want.grad) < tol, ("dq", "dk", "dv")[i]
    if extra == "padding":  # the fully padded row: output and gradients exactly 0
        assert out[1].abs().max() == 0 and all(t.grad[1].abs().max() == 0 for t in leaves)


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 2e-2), (torch.float32, 1e-5)])
@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("h,h_kv", [(8, 2), (6, 6)])
def test_block_sparse_gqa_and_padding_on_cuda(h, h_kv, is_causal, dtype, tol):
    """Block-sparse with grouped-query K/V and a key padding mask (a fully padded batch row) on
    the GPU, forward and backward, against the float64 reference."""
    from dilated_ops.kernels import block_sparse
    from dilated_ops.kernels.reference import block_sparse_reference

    torch.manual_seed(h + h_kv)
    b, n, d, bs = 3, 300, 64, 64
    cfg = dilated_ops.SparsePatternConfig("global_local", block_size=bs, local_window_size=128, global_tokens=64)
    leaves64 = [torch.randn(b, n, hh, d, device="cuda", dtype=torch.float64, requires_grad=True)
                for hh in (h, h_kv, h_kv)]
    leaves = [t.detach().to(dtype).requires_grad_() for t in leaves64]
    keep = torch.rand(b, n, device="cuda") > 0.3
    keep[1] = False
    g = torch.randn(b, n, h, d, device="cuda", dtype=torch.float64)
    out = dilated_ops.block_sparse_attention(*leaves, cfg, is_causal=is_causal, key_padding_mask=keep)
    out.backward(g.to(dtype))
    layout = block_sparse.pattern_layout("global_local", n, h, bs, 128, 64, 0.1, (), (), is_causal, out.device)
    ref = block_sparse_reference(*leaves64, layout, bs, is_causal, key_padding_mask=keep)
    ref.backward(g)
    assert out.dtype == dtype and not out.isnan().any() and rel(out, ref) < tol
    for name, got, want in zip(("dq", "dk", "dv"), leaves, leaves64):
        assert got.grad.shape == want.shape and rel(got.grad, want.grad) < tol, name
    assert out[1].abs().max() == 0


@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("h,h_kv,masked", [(8, 2, False), (6, 6, True), (12, 3, True)])
def test_triton_forward_gqa_and_mask_replayed_equal_plain_and_reference(h, h_kv, masked, is_causal, monkeypatch):
    """Our Triton groups forward with grouped-query K/V (read by KV head index, no copy) and a key
    mask (a fully padded batch row: 0 and -inf): recorded, replayed on new tensors and launched
    plain give the same bits, and match the float64 reference."""
    from dilated_ops.kernels import triton_forward, triton_replay

    if not triton_replay.REPLAY:
        pytest.skip(f"launch replay is off for Triton {triton_replay.triton.__version__}")
    assert triton_forward.ENABLED
    b, n, d, segs, rates = 3, 1000, 64, [128, 512], [1, 4]
    torch.manual_seed(h + h_kv)

    def inputs():
        q = torch.randn(b, n, h, d, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(b, n, h_kv, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        keep = None
        if masked:
            keep = torch.rand(b, n, device="cuda") > 0.3
            keep[1] = False
        return q, k, v, keep

    def call(q, k, v, keep):
        kw = {} if keep is None else {"key_padding_mask": keep}
        return torch.ops.dilated.dilated_attention(q, k, v, segs, rates, "groups", is_causal, None, 0.0, None, "auto",
                                                   0, 0, **kw)

    triton_replay.clear_recorded()
    call(*inputs())
    assert triton_replay.num_recorded() == 1
    args = inputs()
    out, lse = call(*args)  # replayed
    assert triton_replay.num_recorded() == 1 and not out.isnan().any()
    monkeypatch.setattr(triton_replay, "REPLAY", False)
    plain_out, plain_lse = call(*args)
    assert torch.equal(out, plain_out) and torch.equal(lse, plain_lse)
    q, k, v, keep = args
    ref = dilated_attention_reference(q.double(), k.double(), v.double(), segs, rates, is_causal=is_causal,
                                      key_padding_mask=keep)
    assert rel(out, ref) < 2e-2
    if masked:
        assert out[1].abs().max() == 0 and torch.isneginf(lse[1]).all()


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 2e-2), (torch.float16, 4e-3), (torch.float32, 1e-5)])
@pytest.mark.parametrize("mode", ["groups", "longnet"])
@pytest.mark.parametrize("h,h_kv", [(8, 2), (5, 5), (6, 1)])
@pytest.mark.parametrize("triton", [True, False], ids=["triton", "gather"])
def test_decode_matches_reference_on_cuda(triton, h, h_kv, mode, dtype, tol, monkeypatch):
    """The decode op (SPEC section 9) on the GPU, its Triton forward (kernels/triton_decode.py)
    and the gather path: a few queries at the end of a cache whose length crosses segment
    boundaries, with GQA and a key padding mask (a fully padded batch row), forward and backward
    against the float64 reference."""
    from dilated_ops.kernels import decode, triton_decode
    from dilated_ops.kernels.reference import dilated_decode_reference

    monkeypatch.setattr(triton_decode, "ENABLED", triton)
    used = []
    monkeypatch.setattr(triton_decode, "forward", lambda *a, f=triton_decode.forward: used.append(1) or f(*a))

    segs, rates = [64, 128, 512], [1, 2, 8]
    for skv, sq in ((700, 1), (515, 1), (640, 3)):  # 515: just past a boundary of every branch
        torch.manual_seed(skv + h)
        q64 = torch.randn(3, sq, h, 64, device="cuda", dtype=torch.float64)
        k64, v64 = (torch.randn(3, skv, h_kv, 64, device="cuda", dtype=torch.float64) for _ in range(2))
        keep = torch.rand(3, skv, device="cuda") > 0.3
        keep[1] = False
        g = torch.randn(3, sq, h, 64, device="cuda", dtype=torch.float64)
        leaves = [t.to(dtype).requires_grad_() for t in (q64, k64, v64)]
        leaves64 = [t.clone().requires_grad_() for t in (q64, k64, v64)]
        out = dilated_ops.dilated_attention_decode(*leaves, segs, rates, mode=mode, is_causal=True,
                                                   key_padding_mask=keep)
        out.backward(g.to(dtype))
        ref = dilated_decode_reference(*leaves64, segs, rates, mode=mode, is_causal=True, key_padding_mask=keep)
        ref.backward(g)
        assert len(used) == (1 if triton else 0)
        used.clear()
        assert out.dtype == dtype and out.device.type == "cuda" and not out.isnan().any()
        assert rel(out, ref) < tol and out[1].abs().max() == 0
        for name, got, want in zip(("dq", "dk", "dv"), leaves, leaves64):
            assert not got.grad.isnan().any() and rel(got.grad, want.grad) < tol, name
