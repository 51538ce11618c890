"""The Triton decode forward (kernels/triton_decode.py) compiles, without a GPU, to a cubin for
the devices it runs on, each variant a call can ask for (dtype, head_dim, GQA group, key mask,
causal), as tests/test_triton_forward.py does for the attention forward; the chunk table holds
exactly the keys SPEC section 9 gives a query. Its results are checked against the reference on a
GPU in test_cuda.py."""
import itertools

import pytest
import torch

triton = pytest.importorskip("triton", reason="Triton is not installed (the test extra installs it on Linux x86-64)")

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import mangle_type  # noqa: E402

from dilated_ops.kernels import triton_decode  # noqa: E402

SEGS, RATES = [64, 128, 512], [1, 2, 8]


def _launches(dtype, head_dim, h, h_kv, masked, is_causal, mode="longnet"):
    b, sq, skv = 2, 1, 700
    q = torch.randn(b, sq, h, head_dim, dtype=dtype)
    k, v = (torch.randn(b, skv, h_kv, head_dim, dtype=dtype) for _ in range(2))
    keep = torch.rand(b, skv) > 0.3 if masked else None
    table = triton_decode._table(SEGS, RATES, mode, h, q.device)
    m = torch.empty(b * sq, h, table.shape[0])
    parts = (m, m.clone(), torch.empty(*m.shape, head_dim))
    out, lse = torch.empty_like(q), torch.empty(b, sq, h)
    return triton_decode.launches(q, k, v, out, lse, table, parts, is_causal, 0.125, 1.0, keep)


VARIANTS = [(torch.bfloat16, 128, 32, 8, masked, causal) for masked, causal in itertools.product((False, True), repeat=2)]
VARIANTS += [(torch.float16, 64, 5, 5, True, True), (torch.float32, 64, 6, 1, True, False),
             (torch.bfloat16, 256, 4, 2, False, True)]


@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("dtype,head_dim,h,h_kv,masked,is_causal", VARIANTS)
def test_both_kernels_compile_to_a_cubin(dtype, head_dim, h, h_kv, masked, is_causal, arch):
    for kernel, _grid, args, constexprs, options in _launches(dtype, head_dim, h, h_kv, masked, is_causal):
        values = dict(zip(kernel.arg_names, args))
        signature = {name: "constexpr" if name in constexprs else mangle_type(values[name])
                     for name in kernel.arg_names}
        compiled = triton.compile(ASTSource(kernel, signature, constexprs), target=GPUTarget("cuda", arch, 32),
                                  options=options)
        assert compiled.asm.get("cubin"), f"no cubin for {kernel.fn.__name__}"


@pytest.mark.parametrize("mode", ["groups", "longnet"])
def test_the_chunk_table_covers_each_branch_once(mode):
    """Per branch, chunks of BLOCK_N key indices that tile ``[0, w / r)`` exactly once, with the
    heads that may select it (groups: SPEC section 3's group and offset i % r; longnet: all heads,
    each at its own offset)."""
    h = 7
    table = triton_decode._table(SEGS, RATES, mode, h, torch.device("cpu")).tolist()
    for i, (w, r) in enumerate(zip(SEGS, RATES)):
        rows = [row for row in table if row[:2] == [w, r]]
        covered = sorted(j for row in rows for j in range(row[5], min(row[5] + triton_decode.BLOCK_N, row[6])))
        assert covered == list(range(w // r)) and all(row[6] == w // r for row in rows)
        g0, g1, offset = rows[0][2:5]
        if mode == "groups":
            assert (g0, g1, offset) == ([(0, 3), (3, 5), (5, 7)][i] + (i % r,))
        else:
            assert (g0, g1, offset) == (0, h, -1)


def interpreted_check():
    """Runs both kernels under Triton's interpreter (TRITON_INTERPRET=1 must be set before Triton
    is imported) on CPU float32 tensors and compares ``out`` with the float64 reference and ``lse``
    with the op's PyTorch path; prints one line per case."""
    from dilated_ops.kernels.decode import decode_forward
    from dilated_ops.kernels.reference import dilated_decode_reference

    cases = itertools.product(["groups", "longnet"], [True, False], [(8, 2), (5, 5), (6, 1)], [(700, 1), (515, 3)])
    for mode, is_causal, (h, h_kv), (skv, sq) in cases:
        torch.manual_seed(skv + h)
        q, k, v = torch.randn(3, sq, h, 64), torch.randn(3, skv, h_kv, 64), torch.randn(3, skv, h_kv, 64)
        keep = torch.rand(3, skv) > 0.3
        keep[1] = False  # a batch row that sees no key: 0 and -inf
        keep = keep if h != 5 else None
        table = triton_decode._table(SEGS, RATES, mode, h, q.device)
        m = torch.empty(3 * sq, h, table.shape[0])
        out, lse = torch.empty_like(q), torch.empty(3, sq, h)
        parts = (m, torch.empty_like(m), torch.empty(*m.shape, 64))
        for kernel, grid, args, constexprs, _ in triton_decode.launches(
                q, k, v, out, lse, table, parts, is_causal, 64 ** -0.5, 1 / 3 if mode == "groups" else 1.0, keep):
            kernel[grid](*args, **constexprs)
        ref = dilated_decode_reference(q.double(), k.double(), v.double(), SEGS, RATES, mode=mode,
                                       is_causal=is_causal, key_padding_mask=keep)
        _, want_lse = decode_forward(q.double(), k.double(), v.double(), SEGS, RATES, mode, is_causal, None, keep)
        same_inf = torch.equal(torch.isneginf(lse), torch.isneginf(want_lse))
        finite = torch.isfinite(want_lse)
        print(mode, is_causal, h, h_kv, skv, sq, (out.double() - ref).abs().max().item(),
              (lse.double() - want_lse)[finite].abs().max().item() if same_inf else float("inf"))


def test_interpreted_kernels_match_the_reference():
    """The kernels' arithmetic on a CPU (Triton's interpreter, float32): out within 1e-5 of the
    float64 reference and lse of the op's PyTorch path, -inf where they are, for both modes,
    causal or not, GQA groups 4 and 6 and none, one and three queries, with a key mask; head_dim
    64, two slices of the merge."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, TRITON_INTERPRET="1",
               PYTHONPATH=os.pathsep.join([os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")]))
    res = subprocess.run([sys.executable, "-c", "import test_triton_decode as t; t.interpreted_check()"],
                         capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = res.stdout.split("\n")[:-1]
    assert len(lines) == 24
    for line in lines:
        *case, out_err, lse_err = line.split()
        assert float(out_err) < 1e-5 and float(lse_err) < 1e-5, line
