"""Experiment (temporary): forward variants timed interleaved (one call of each per round,
medians over rounds) so that clock drift hits all alike."""
import os, statistics, sys
import torch
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import baselines
import dilated_ops
from dilated_ops.kernels import dilated as D
from dilated_ops.kernels import triton_forward as T
import gluon_forward as G  # noqa: E402 (this folder)
from dilated_ops.kernels.segments import plan, segment_views, to_bhld

orig = D._triton_forward
def use(kind, stages=3):
    G.STAGES = stages
    D._triton_forward = (lambda q, p, s: G) if kind == "gluon" else orig

def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()

def check():
    torch.manual_seed(1)
    worst = 0.0
    for dtype in (torch.bfloat16, torch.float16):
        for causal in (False, True):
            for stages in (2, 3):
                G.STAGES = stages
                b, n, h, d = 2, 700, 5, 64
                q, k, v = (torch.randn(b, n, h, d, device="cuda", dtype=dtype) for _ in range(3))
                out = torch.full((b, n, h, d), float("nan"), device="cuda", dtype=dtype)
                lse = torch.full((b, n, h), float("nan"), device="cuda")
                for call in plan(h, (128, 512, 256), (1, 4, 2), "groups"):
                    for qp, kp, vp, op, lp in zip(*(segment_views(t, call) for t in (q, k, v, out, lse))):
                        G.forward_into(qp, kp, vp, op, lp, causal, d**-0.5, 0.5)
                        want = torch.nn.functional.scaled_dot_product_attention(
                            *(to_bhld(t).float() for t in (qp, kp, vp)), is_causal=causal) * 0.5
                        s = to_bhld(qp).float() @ to_bhld(kp).float().transpose(-1, -2) * d**-0.5
                        if causal:
                            s = s.masked_fill(torch.ones_like(s, dtype=torch.bool).triu(1), float("-inf"))
                        e1, e2 = rel(to_bhld(op), want), (to_bhld(lp) - torch.logsumexp(s, -1)).abs().max().item()
                        worst = max(worst, e1)
                        ok = e1 < 1e-2 and e2 < 2e-2 and not torch.isnan(op).any()
                        if not ok:
                            print(f"  MISMATCH {dtype} causal={causal} stages={stages} piece {tuple(qp.shape)}: out {e1:.2e} lse {e2:.2e}")
    print(f"gluon piece check done, worst rel err {worst:.2e}", flush=True)

segs, rates = [2048, 4096, 8192], [1, 2, 4]
def bench(n, dtype, variants, rounds=40, causal=False):
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, n, 12, 64, device="cuda", dtype=dtype) for _ in range(3))
    run = lambda be="auto": dilated_ops.dilated_attention(q, k, v, segs, rates, backend=be, is_causal=causal)
    fns = {}
    with torch.no_grad():
        ref = dilated_ops.dilated_attention(q.float(), k.float(), v.float(), segs, rates, backend="sdpa", is_causal=causal)
        fns["sdpa-views"] = (lambda: use("triton"), lambda: run("sdpa"))
        if n % 8192 == 0 and not causal:
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
    print(f"n={n} {dtype} causal={causal} (median ms over {rounds} interleaved rounds; q1-q3)")
    for name, t in times.items():
        qs = statistics.quantiles(t, n=4)
        print(f"  {name:34s} {statistics.median(t):7.3f}   ({qs[0]:.3f}-{qs[2]:.3f})", flush=True)
    use("triton")

variants = {
    "triton (shipped)": lambda: use("triton"),
    "gluon s3": lambda: use("gluon", 3),
    "gluon s2": lambda: use("gluon", 2),
}
if __name__ == "__main__":
    check()
    bench(262144, torch.bfloat16, variants)
    bench(262144, torch.float16, variants)
    bench(65536, torch.bfloat16, variants)
    bench(262144, torch.bfloat16, variants, causal=True)
