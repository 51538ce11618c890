"""Experiment (temporary): Triton forward variants timed interleaved (one call of each per
round, medians over rounds) so that clock drift hits all alike."""
import os, statistics, sys
import torch
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import baselines
import dilated_ops
import dilated_ops.kernels as K
from dilated_ops.kernels import triton_forward as new
import _old_triton_forward as old
_old_supported = old.supported
old.supported = lambda q, p, scale: _old_supported(q, p)
old.PARTIAL_FILL = False

def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()

def use(mod, pfill=False, cfg=(64, 64, 4, 3), ws=False, pipe=False):
    K.triton_forward = mod
    sys.modules["dilated_ops.kernels.triton_forward"] = mod
    mod.CONFIGS[64] = cfg
    mod.PARTIAL_FILL = pfill
    mod.WARP_SPEC = ws
    mod.PIPE_QK = pipe

segs, rates = [2048, 4096, 8192], [1, 2, 4]
def bench(n, dtype, variants, rounds=40):
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, n, 12, 64, device="cuda", dtype=dtype) for _ in range(3))
    run = lambda be="auto": dilated_ops.dilated_attention(q, k, v, segs, rates, backend=be)
    fns = {}
    with torch.no_grad():
        ref = dilated_ops.dilated_attention(q.float(), k.float(), v.float(), segs, rates, backend="sdpa")
        fns["sdpa-views"] = (lambda: None, lambda: run("sdpa"))
        if n % 8192 == 0:
            batches = baselines.pregather(q, k, v, segs, rates)
            fns["pregathered"] = (lambda: None, lambda: baselines.pregathered(batches))
        for name, setup in variants.items():
            fns[name] = (setup, run)
        times = {name: [] for name in fns}
        for name, (setup, fn) in fns.items():
            setup()
            out = fn()
            if name != "pregathered":
                print(f"  {name}: err {rel(out, ref):.2e}", flush=True)
            for _ in range(3):
                fn()
        torch.cuda.synchronize()
        for _ in range(rounds):
            for name, (setup, fn) in fns.items():
                setup()
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                s.record(); fn(); e.record(); torch.cuda.synchronize()
                times[name].append(s.elapsed_time(e))
    print(f"n={n} {dtype} (median ms over {rounds} interleaved rounds; q1-q3)")
    for name, t in times.items():
        qs = statistics.quantiles(t, n=4)
        print(f"  {name:28s} {statistics.median(t):7.3f}   ({qs[0]:.3f}-{qs[2]:.3f})", flush=True)
    use(new, True)

variants = {
    "old 64x64w4s3": lambda: use(old),
    "new 64x64w4s3": lambda: use(new),
    "new ws 64x64w4s3": lambda: use(new, ws=True),
    "new ws 64x64w4s2": lambda: use(new, ws=True, cfg=(64, 64, 4, 2)),
    "new ws 64x128w4s2": lambda: use(new, ws=True, cfg=(64, 128, 4, 2)),
    "new pipe 64x64w4s3": lambda: use(new, pipe=True),
}
bench(262144, torch.bfloat16, variants)
bench(262144, torch.float16, variants)
bench(65536, torch.bfloat16, variants)
