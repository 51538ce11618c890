"""``python -m dilated_ops``: the op forward and backward, compiled, and exported, on a small
embedded default (batch 2, 512 tokens, 6 heads of 32; segments [64, 128, 256], dilations
[1, 2, 4]). Prints what it did."""
from __future__ import annotations

import os
import tempfile
import time

import torch

from .registrations import dilated_attention


class _Attention(torch.nn.Module):
    def __init__(self, segment_lengths, dilation_rates, mode):
        super().__init__()
        self.segment_lengths, self.dilation_rates, self.mode = segment_lengths, dilation_rates, mode

    def forward(self, q, k, v):
        return dilated_attention(q, k, v, self.segment_lengths, self.dilation_rates, mode=self.mode)


def main() -> None:
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    b, n, h, d = 2, 512, 6, 32
    segs, rates = [64, 128, 256], [1, 2, 4]
    print(f"dilated_ops demo on {device}, torch {torch.__version__}")
    print(f"q, k, v: (batch={b}, seq={n}, heads={h}, head_dim={d}); segment_lengths={segs}, dilation_rates={rates}")
    q, k, v = (torch.randn(b, n, h, d, device=device, requires_grad=True) for _ in range(3))
    for mode in ("groups", "longnet"):
        t0 = time.perf_counter()
        out = dilated_attention(q, k, v, segs, rates, mode=mode)
        out.square().sum().backward()
        print(f"  eager {mode:8s}: out {tuple(out.shape)}, |dq| = {q.grad.norm():.3e}, "
              f"{(time.perf_counter() - t0) * 1e3:.1f} ms")
        q.grad = k.grad = v.grad = None

    model = _Attention(segs, rates, "groups")
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        eager_out = model(q, k, v)
        compiled_out = compiled(q, k, v)
    print(f"  torch.compile(fullgraph=True): max |compiled - eager| = {(compiled_out - eager_out).abs().max():.2e}")

    exported = torch.export.export(model, (q.detach(), k.detach(), v.detach()))
    nodes = [n.target for n in exported.graph.nodes if n.op == "call_function"]
    dilated_nodes = [str(t) for t in nodes if "dilated" in str(t)]
    print(f"  torch.export: {len(nodes)} call nodes, dilated ones: {dilated_nodes}")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "dilated.pt2")
        torch.export.save(exported, path)
        loaded = torch.export.load(path)
        reloaded_out = loaded.module()(q.detach(), k.detach(), v.detach())
        print(f"  export.save/load {os.path.getsize(path)} bytes: max |loaded - eager| = "
              f"{(reloaded_out - eager_out).abs().max():.2e}")
    print("done")


if __name__ == "__main__":
    main()
