"""Small models and helpers shared by the tests (not a test module)."""
import contextlib

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

D64 = torch.float64


def rel_err(a, b, floor=1e-6):
    """||a - b|| / max(||b||, floor); the floor stands in for results that are exactly zero in
    exact arithmetic (dq when every query sees a single key, say)."""
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(floor)).item()


def assert_same_outputs_and_grads(model, rewritten, inputs, tol=1e-10, params=None, label=""):
    """``rewritten(*inputs)`` equals ``model(*inputs)``, and after a backward of one random
    cotangent through both, each parameter of ``model`` has the gradient of its namesake in
    ``params`` (default: ``rewritten``'s own named parameters), the names matching exactly."""
    out, got = model(*inputs), rewritten(*inputs)
    torch.testing.assert_close(got, out, rtol=tol, atol=tol, msg=label or None)
    g = torch.randn_like(out)
    out.backward(g)
    got.backward(g)
    params = dict(rewritten.named_parameters()) if params is None else params
    assert set(params) == {name for name, _ in model.named_parameters()}, label
    for name, p in model.named_parameters():
        torch.testing.assert_close(params[name].grad, p.grad, rtol=tol, atol=tol, msg=f"{label} {name}")


def x64(*shape):
    return torch.randn(*shape, dtype=D64)


@contextlib.contextmanager
def process_group(rank: int, world_size: int, init_file: str, backend: str = "gloo", **kwargs):
    """The default process group of a spawned test worker, rendezvous through ``init_file``.
    On a clean exit every rank meets at a barrier before the group is destroyed: a rank that
    tore its gloo connections down while a peer still finished its last collective aborted
    that peer once (SIGABRT, "terminate called without an active exception") in CI. A rank
    that raises leaves the group as it is: its process ends with its error reported first
    (closing the connections before that made a waiting peer's "connection reset" win the race
    to be the job's error).

    After a clean exit the worker process ends right there (``os._exit(0)``, output flushed), so
    a worker does all its work inside the block: gloo aborted a rank once more, after the barrier
    and the destroy, as the interpreter shut down ("terminate called without an active
    exception", CI), and ending the process skips that shutdown."""
    import os
    import sys

    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=world_size, **kwargs)
    yield
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def encoder():
    """A two-layer float64 nn.TransformerEncoder (no dropout, batch first)."""
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True, dtype=D64)
    return nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)


def call_targets(gm):
    """The call_function/call_method targets of ``gm``'s graph, one a line: OpOverloads as
    ``str``, everything else by ``__name__``."""
    def name(t):
        if isinstance(t, torch._ops.OpOverload):
            return str(t)
        return getattr(t, "__name__", str(t))
    return "\n".join(name(n.target) for n in gm.graph.nodes if n.op in ("call_function", "call_method"))


class SelfMHA(nn.Module):
    """One nn.MultiheadAttention (embed 8, 2 heads) called as self-attention, or with the
    key and value passed after ``x``; ``**kw`` go to nn.MultiheadAttention (``dtype=None``:
    the default dtype)."""

    def __init__(self, batch_first=True, bias=True, dtype=D64, **kw):
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=batch_first, bias=bias, dtype=dtype, **kw)

    def forward(self, x, *kv):
        k, v = kv or (x, x)
        return self.attn(x, k, v, need_weights=False)[0]


def run_saved_in_fresh_process(ep, args, expected, op, directory) -> int:
    """Saves ``ep``, loads it in a fresh Python process that imports ``dilated_ops`` first, runs
    it on ``args`` and asserts the output equals ``expected`` bitwise; returns the number of
    ``op`` nodes the loaded program holds."""
    import os
    import subprocess
    import sys

    path = os.path.join(str(directory), "program.pt2")
    torch.export.save(ep, path)
    io = os.path.join(str(directory), "io.pt")
    torch.save({"args": args, "expected": expected}, io)
    script = (
        "import sys, torch\n"
        "import dilated_ops  # registers torch.ops.dilated before load\n"
        "ep = torch.export.load(sys.argv[1])\n"
        "io = torch.load(sys.argv[2])\n"
        "out = ep.module()(*io['args'])\n"
        "assert torch.equal(out, io['expected']), (out - io['expected']).abs().max()\n"
        "op = eval(sys.argv[3])\n"
        "print('ok', sum(n.target == op for n in ep.graph.nodes))\n"
    )
    res = subprocess.run([sys.executable, "-c", script, path, io, f"torch.ops.{op}"], capture_output=True,
                         text=True, env=os.environ.copy())
    assert res.returncode == 0, res.stderr
    word, count = res.stdout.split()
    assert word == "ok"
    return int(count)


class GPTBlock(nn.Module):
    def __init__(self, e=8, h=2):
        super().__init__()
        self.h = h
        self.ln = nn.LayerNorm(e, dtype=D64)
        self.qkv = nn.Linear(e, 3 * e, dtype=D64)
        self.proj = nn.Linear(e, e, dtype=D64)
        self.mlp = nn.Sequential(nn.Linear(e, 2 * e, dtype=D64), nn.GELU(), nn.Linear(2 * e, e, dtype=D64))

    def forward(self, x):  # (batch, seq, embed)
        b, n, e = x.shape
        q, k, v = self.qkv(self.ln(x)).split(e, dim=-1)
        q, k, v = (t.view(b, n, self.h, e // self.h).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, n, e))
        return x + self.mlp(x)


class GPT(nn.Module):
    def __init__(self, vocab=11, e=8, layers=2):
        super().__init__()
        self.emb = nn.Embedding(vocab, e, dtype=D64)
        self.blocks = nn.ModuleList(GPTBlock(e) for _ in range(layers))
        self.head = nn.Linear(e, vocab, dtype=D64)

    def forward(self, idx):
        x = self.emb(idx)
        for block in self.blocks:
            x = block(x)
        return self.head(x)
