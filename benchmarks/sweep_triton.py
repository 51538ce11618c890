"""Sweep the Triton forward's tile configs on the standard config; prints a table of forward
ms (groups mode) against the SDPA-views path, side by side in one run."""
from __future__ import annotations

import itertools
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_dilated import time_ms  # noqa: E402

import dilated_ops  # noqa: E402
from dilated_ops.kernels import triton_forward  # noqa: E402


def main():
    n, h, d = int(os.environ.get("N", 262144)), 12, int(os.environ.get("D", 64))
    segs, rates = [2048, 4096, 8192], [1, 2, 4]
    q, k, v = (torch.randn(1, n, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    run = lambda causal=False: dilated_ops.dilated_attention(q, k, v, segs, rates, is_causal=causal)
    triton_forward.ENABLED = False
    with torch.no_grad():
        ref = run()
        base = time_ms(run, 5, 20)
    print(f"n={n} d={d}: SDPA views path fwd {base:.3f} ms")
    triton_forward.ENABLED = True
    best = None
    for tma, bm, bn, w, st in itertools.product([False, True], [64, 128], [64, 128], [4, 8], [2, 3]):
        triton_forward.USE_TMA = tma
        triton_forward.CONFIGS[d] = (bm, bn, w, st)
        try:
            with torch.no_grad():
                out = run()
                err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
                t = time_ms(run, 3, 15)
        except Exception as e:  # resource limits for big tiles
            print(f"  tma={tma} {bm}x{bn} w{w} s{st}: failed {str(e)[:200]}")
            continue
        print(f"  tma={tma} {bm}x{bn} w{w} s{st}: {t:.3f} ms  rel err vs SDPA path {err:.1e}", flush=True)
        if err < 1e-2 and (best is None or t < best[0]):
            best = (t, (tma, bm, bn, w, st))
    print(f"best: {best}")


if __name__ == "__main__":
    main()
