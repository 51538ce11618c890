"""The op's eager host overhead against ``torch.compile(mode="reduce-overhead")`` (CUDA graphs
replay the launches): forward+backward ms at short sequences, side by side in one run, and the
compiled result checked against eager.

    python benchmarks/reduce_overhead.py
"""
from __future__ import annotations

import torch

import dilated_ops
from dilated_ops._bench import time_ms


def main():
    segs, rates = [512, 1024, 2048], [1, 2, 4]

    def attention(q, k, v):
        return dilated_ops.dilated_attention(q, k, v, segs, rates)

    compiled_attention = torch.compile(attention, mode="reduce-overhead", fullgraph=True)

    def make_step(fn):
        def step(q, k, v, g):
            out = fn(q, k, v)
            return (out, *torch.autograd.grad(out, (q, k, v), g))
        return step

    step, compiled = make_step(attention), make_step(compiled_attention)
    print("| n | eager fwd+bwd ms | reduce-overhead fwd+bwd ms | max abs diff |")
    print("|---|---|---|---|")
    for n in (2048, 8192, 32768):
        q, k, v = (torch.randn(1, n, 12, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        g = torch.randn(1, n, 12, 64, device="cuda", dtype=torch.bfloat16)
        want = step(q, k, v, g)
        for _ in range(3):
            got = compiled(q, k, v, g)
        diff = max((a.float() - b.float()).abs().max().item() for a, b in zip(got, want))
        eager = time_ms(lambda: step(q, k, v, g), 5, 30)
        graphs = time_ms(lambda: compiled(q, k, v, g), 5, 30)
        print(f"| {n} | {eager:.3f} | {graphs:.3f} | {diff:.1e} |", flush=True)


if __name__ == "__main__":
    main()
