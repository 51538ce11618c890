"""The Triton forward (kernels/triton_forward.py) compiles, without a GPU, for the devices it runs
on: each variant its launches ask for (TMA descriptors on Hopper, pointer loads before it; key
mask, causal, fill), through Triton's whole pipeline to a cubin. Under TRITON_INTERPRET a kernel
is Python, so a variant that Triton's compiler refuses (13173d8's key-mask variant did, at the
first masked call on an H100) passes there; this catches it on CPU CI. The results are checked
against the reference on a GPU in test_cuda.py."""
import itertools

import pytest
import torch

triton = pytest.importorskip("triton", reason="Triton is not installed (the test extra installs it on Linux x86-64)")

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import mangle_type  # noqa: E402
from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: E402

from dilated_ops.kernels import triton_forward  # noqa: E402


def _compile(head_dim: int, use_tma: bool, masked: bool, is_causal: bool, fill: bool, arch: int):
    """Compile ``_dilated_fwd`` with the arguments :func:`triton_forward._launch_args` makes for
    pieces of that kind (CPU tensors stand in for the GPU's: only their types matter)."""
    b, s, length, h, h_kv = 2, 3, 100, 4, 2
    q, out = (torch.randn(b, s, length, h, head_dim, dtype=torch.bfloat16) for _ in range(2))
    k, v = (torch.randn(b, s, length, h_kv, head_dim, dtype=torch.bfloat16) for _ in range(2))
    lse = torch.randn(b, s, length, h)
    km = (torch.rand(b, s, length, 1) > 0.5).to(torch.uint8) if masked else None
    _, rest, constexprs, options, _ = triton_forward._launch_args(
        q, k, v, out, lse, is_causal, 0.125, 0.5, (2, 1) if fill else None, km)
    constexprs["USE_TMA"] = use_tma
    if use_tma:
        block_m, block_n = constexprs["BLOCK_M"], constexprs["BLOCK_N"]
        q, k, v = (TensorDescriptor.from_tensor(t, [1, 1, block, 1, head_dim])
                   for t, block in ((q, block_m), (k, block_n), (v, block_n)))
    kernel = triton_forward._dilated_fwd
    values = dict(zip(kernel.arg_names, (q, k, v, out, lse, lse if km is None else km, *rest)))
    signature = {name: "constexpr" if name in constexprs else mangle_type(values[name])
                 for name in kernel.arg_names}
    return triton.compile(ASTSource(kernel, signature, constexprs), target=GPUTarget("cuda", arch, 32),
                          options=options)


# Every (mask, causal) pair with TMA and with pointer loads at head_dim 64, the fill on in half;
# head_dim 128 (its own tiles) with everything on.
VARIANTS = [(64, tma, masked, causal, masked != causal)
            for tma, masked, causal in itertools.product((True, False), repeat=3)] + [(128, True, True, True, True)]


@pytest.mark.parametrize("head_dim,use_tma,masked,is_causal,fill", VARIANTS)
def test_every_variant_compiles_to_a_cubin(head_dim, use_tma, masked, is_causal, fill):
    compiled = _compile(head_dim, use_tma, masked, is_causal, fill, arch=90 if use_tma else 80)
    assert compiled.asm.get("cubin"), "no cubin"
