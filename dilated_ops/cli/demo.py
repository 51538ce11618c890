"""``dilated-ops demo``: a stock ``nn.TransformerEncoder`` turned into dilated attention by the
compile backend, trained on a long-range retrieval task that local attention cannot solve,
exported, saved as ``.pt2``, reloaded in a fresh process and checked.

The task: a sequence of random filler tokens holds, somewhere in its first half, a key: one of
``NUM_KEYS`` key tokens written ``key_len`` (16) times in a row; the sequence ends with a query
token. The model must name the key, read out from its last segment (the mean of the final 16
positions' outputs; chance: 1 / NUM_KEYS). The key ends at least ``seq_len / 2`` tokens before
that segment, so a model whose attention stays inside local segments (the baseline,
``segment_lengths=[16], dilation_rates=[1]``: a position only ever sees its own 16-token segment,
however many layers) cannot do better than chance, whatever it learns. The dilated model can:
its widest branch (``w = seq_len``, ``r = 16``) connects every 16th position across the whole
sequence, a run of ``key_len >= r`` tokens always has one token on that lattice, and so does
the last segment: one attention hop carries the key to the read-out.
Training: AdamW, linear warm-up over 10% of the steps then cosine decay (without the schedule
some seeds stall at chance for the whole budget).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .. import _checks
from .._progress import Progress
from ..fx_passes.backend import backend as dilated_backend
from ..module_swap import export as dilated_export
from ._paths import check_out_dir, makedirs

NUM_FILLER = 8
NUM_KEYS = 16
QUERY = NUM_FILLER + NUM_KEYS
VOCAB = QUERY + 1
BASELINE_SEGMENTS, BASELINE_RATES = [16], [1]


class KeyRetriever(nn.Module):
    """Token embedding, a stock ``nn.TransformerEncoder`` (``nn.MultiheadAttention`` inside), and
    a linear read-out of the mean of the last ``pool`` positions. No positional encoding: the
    task needs none."""

    def __init__(self, d_model: int, heads: int, layers: int, pool: int = 16):
        super().__init__()
        self.pool = pool
        self.embed = nn.Embedding(VOCAB, d_model)
        layer = nn.TransformerEncoderLayer(d_model, heads, 2 * d_model, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.readout = nn.Linear(d_model, NUM_KEYS)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.readout(self.encoder(self.embed(tokens))[:, -self.pool:].mean(1))


def make_batch(batch: int, seq_len: int, key_len: int, generator: torch.Generator):
    """``(tokens (batch, seq_len) int64, answers (batch,) int64)``; see the module doc."""
    tokens = torch.randint(0, NUM_FILLER, (batch, seq_len), generator=generator)
    answers = torch.randint(0, NUM_KEYS, (batch,), generator=generator)
    start = torch.randint(0, seq_len // 2 - key_len + 1, (batch,), generator=generator)
    cols = start.unsqueeze(1) + torch.arange(key_len)
    tokens.scatter_(1, cols, (NUM_FILLER + answers).unsqueeze(1).expand(-1, key_len))
    tokens[:, -1] = QUERY
    return tokens, answers


def default_config(seq_len: int):
    """Segments ``[16, 64, seq_len]`` with rates ``[1, 4, 16]`` (seq_len >= 64)."""
    return [16, 64, seq_len], [1, 4, 16]


@dataclass
class Trained:
    name: str
    segments: List[int]
    rates: List[int]
    steps: int
    final_loss: float
    accuracy: float
    compile_s: float
    train_s: float
    report: str
    logits: Optional[torch.Tensor] = None


def _train(name, model, segments, rates, args, device, out) -> Trained:
    be = dilated_backend(segments, rates, mode=args.mode, implementation=args.implementation, inner=args.inner)
    compiled = torch.compile(model, backend=be)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    warm = max(1, args.steps // 10)

    def lr_factor(step: int) -> float:  # linear warm-up over 10% of the steps, then cosine to 0
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, args.steps - warm))))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    gen = torch.Generator().manual_seed(args.seed + 1)
    model.train()
    losses: List[float] = []
    compile_s = 0.0
    t0 = time.perf_counter()
    with Progress(args.steps, desc=f"  train {name:<8}", stream=out) as bar:
        for step in range(args.steps):
            tokens, answers = make_batch(args.batch, args.seq_len, args.key_len, gen)
            loss = F.cross_entropy(compiled(tokens.to(device)), answers.to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
            if step == 0:
                compile_s = time.perf_counter() - t0
            recent = losses[-20:]
            bar.update(1, loss=sum(recent) / len(recent))
    train_s = time.perf_counter() - t0
    # Held-out accuracy through the same compiled model (train mode: dropout is 0, and eval
    # under no_grad would take nn.TransformerEncoderLayer's fused fast path).
    eval_gen = torch.Generator().manual_seed(args.seed + 2)
    tokens, answers = make_batch(args.eval_size, args.seq_len, args.key_len, eval_gen)
    with torch.no_grad():
        logits = torch.cat([compiled(tokens[i:i + args.batch].to(device)).float().cpu()
                            for i in range(0, args.eval_size, args.batch)])
    accuracy = (logits.argmax(-1) == answers).float().mean().item()
    recent = losses[-20:]
    return Trained(name, list(segments), list(rates), args.steps, sum(recent) / len(recent), accuracy,
                   compile_s, train_s, str(be.reports[0]) if be.reports else "(no graph)", logits)


_CHILD = r"""
import json, sys, torch
import dilated_ops  # registers torch.ops.dilated before the program is loaded
ep = torch.export.load(sys.argv[1])
data = torch.load(sys.argv[2])
module, batch = ep.module(), int(sys.argv[4])
with torch.no_grad():  # in chunks of the training batch: the whole held-out set can be GiBs at long seq_len
    logits = torch.cat([module(data["tokens"][i:i + batch].to(sys.argv[3])).float().cpu()
                        for i in range(0, len(data["tokens"]), batch)])
nodes = sum(n.op == "call_function" and "dilated" in str(n.target) for n in ep.graph.nodes)
print(json.dumps({
    "max_abs_diff": (logits - data["logits"]).abs().max().item(),
    "accuracy": (logits.argmax(-1) == data["answers"]).float().mean().item(),
    "dilated_nodes": nodes,
}))
"""


def _reload_in_fresh_process(pt2: str, data: str, device: str, batch: int) -> dict:
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    proc = subprocess.run([sys.executable, "-c", _CHILD, pt2, data, device, str(batch)], env=env,
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"reloading {pt2} in a fresh process failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError):  # torch's messages name no flag
        raise ValueError(f"--device {device or repr(device)}: not a device, expected cpu, cuda, cuda:N or auto") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu, cuda or auto: got {device!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available on this machine (torch {torch.__version__})")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"--device {device}: no such CUDA device, this machine has "
                         f"{torch.cuda.device_count()} (cuda:0 to cuda:{torch.cuda.device_count() - 1})")
    return device


def validate(args) -> None:
    """Fills in defaults that depend on other flags and checks everything before any work, with
    the package's own messages (:mod:`dilated_ops._checks`)."""
    args.device = resolve_device(args.device)
    for name in ("seq_len", "steps", "batch", "d_model", "heads", "layers", "key_len", "eval_size"):
        _checks.check_positive_int(name, getattr(args, name))
    if args.baseline_steps is not None and args.baseline_steps < 0:
        raise ValueError(f"baseline_steps must be >= 0: got {args.baseline_steps}")
    if args.seq_len < 64:
        raise ValueError(f"seq_len must be >= 64 (the key sits in the first half, the local "
                         f"baseline's segment is 16): got {args.seq_len}")
    if args.segment_lengths is None and args.dilation_rates is None:
        args.segment_lengths, args.dilation_rates = default_config(args.seq_len)
    elif args.segment_lengths is None or args.dilation_rates is None:
        raise ValueError("give both --segment-lengths and --dilation-rates, or neither")
    _checks.check_segments(args.segment_lengths, args.dilation_rates)
    _checks.check_mode(args.mode)
    _checks.check_embed_dim(args.d_model, args.heads)
    if args.mode == "groups":
        _checks.check_num_groups(args.heads, len(args.segment_lengths))
    if not 2 * args.key_len <= args.seq_len:
        raise ValueError(f"key_len ({args.key_len}) must be at most seq_len / 2 ({args.seq_len // 2})")
    if args.inner is None:
        args.inner = "inductor" if torch.device(args.device).type == "cuda" else "aot_eager"
    import torch._dynamo as dynamo
    if isinstance(args.inner, str) and args.inner not in dynamo.list_backends(exclude_tags=()):
        raise ValueError(f"--inner {args.inner}: not a registered torch.compile backend, e.g. aot_eager, "
                         f"eager, inductor (torch._dynamo.list_backends(exclude_tags=()) lists them)")
    if getattr(args, "out", None) is not None:
        check_out_dir("--out", args.out, files=("demo_model.pt2", "demo_inputs.pt"))


def run(args, out=None) -> dict:
    out = out or sys.stdout
    validate(args)
    say = lambda *a: print(*a, file=out, flush=True)  # noqa: E731
    torch.manual_seed(args.seed)
    device = args.device
    baseline_steps = args.steps if args.baseline_steps is None else args.baseline_steps
    t_all = time.perf_counter()
    say(f"dilated_ops demo: torch {torch.__version__}, device {device}"
        + (f" ({torch.cuda.get_device_name(device)})" if device.startswith("cuda") else f", {torch.get_num_threads()} threads"))
    say(f"task: name the key (one of {NUM_KEYS} tokens, written {args.key_len} times in a row in the first half of "
        f"a {args.seq_len}-token sequence of random filler), read out from the last 16 positions; "
        f"chance {1 / NUM_KEYS:.1%}")
    say(f"model: stock nn.TransformerEncoder ({args.layers} layers, d_model {args.d_model}, {args.heads} heads, "
        f"nn.MultiheadAttention) + embedding + read-out; {args.steps} steps of AdamW (lr {args.lr}, warm-up + cosine), "
        f"batch {args.batch}, seed {args.seed}")
    say(f"compile: torch.compile(model, backend=dilated_ops.backend(segment_lengths, dilation_rates, "
        f"mode={args.mode!r}, inner={args.inner!r}))"
        + ("  [CPU: inner 'aot_eager' by default, Inductor's C++ build would take most of the minute]"
           if args.inner == "aot_eager" and device == "cpu" else ""))

    out_dir = args.out or tempfile.mkdtemp(prefix="dilated_ops_demo_")
    makedirs("--out", out_dir)
    runs = []
    torch.manual_seed(args.seed)
    model = KeyRetriever(args.d_model, args.heads, args.layers).to(device)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    say(f"\n[1/4] dilated: segment_lengths {args.segment_lengths}, dilation_rates {args.dilation_rates}")
    dilated = _train("dilated", model, args.segment_lengths, args.dilation_rates, args, device, out)
    say("  backend report (first graph): " + dilated.report.replace("\n", "\n    "))
    say(f"  compile (first step) {dilated.compile_s:.1f} s, training {dilated.train_s:.1f} s, "
        f"held-out accuracy {dilated.accuracy:.1%}")
    runs.append(dilated)

    if baseline_steps:
        say(f"\n[2/4] local-only baseline (same model, same initial weights): segment_lengths "
            f"{BASELINE_SEGMENTS}, dilation_rates {BASELINE_RATES}: the read-out segment sees only itself")
        base_model = KeyRetriever(args.d_model, args.heads, args.layers).to(device)
        base_model.load_state_dict(initial)
        b_args = _copy(args, steps=baseline_steps, mode="groups")
        base = _train("local", base_model, BASELINE_SEGMENTS, BASELINE_RATES, b_args, device, out)
        say(f"  training {base.train_s:.1f} s, held-out accuracy {base.accuracy:.1%}")
        runs.append(base)
    else:
        say("\n[2/4] local-only baseline skipped (--baseline-steps 0)")

    say("\n[3/4] export: dilated_ops.export(model, ...) -> torch.export.save")
    model.eval()
    eval_gen = torch.Generator().manual_seed(args.seed + 2)
    tokens, answers = make_batch(args.eval_size, args.seq_len, args.key_len, eval_gen)
    batch_dim = torch.export.Dim("batch", min=1, max=max(1024, args.eval_size))
    t0 = time.perf_counter()
    ep = dilated_export(model, (tokens[: args.batch].to(device),), segment_lengths=args.segment_lengths,
                        dilation_rates=args.dilation_rates, mode=args.mode,
                        implementation=args.implementation, dynamic_shapes=({0: batch_dim},))
    nodes = sum(n.op == "call_function" and "dilated" in str(n.target) for n in ep.graph.nodes)
    pt2 = os.path.join(out_dir, "demo_model.pt2")
    torch.export.save(ep, pt2)
    data = os.path.join(out_dir, "demo_inputs.pt")
    torch.save({"tokens": tokens, "answers": answers, "logits": dilated.logits}, data)
    say(f"  {nodes} torch.ops.dilated nodes in the program (one per layer; no dense attention left), "
        f"saved {pt2} ({os.path.getsize(pt2) / 1024:.0f} KiB) in {time.perf_counter() - t0:.1f} s")

    say("[4/4] reload in a fresh Python process (import dilated_ops; torch.export.load) on the held-out set")
    t0 = time.perf_counter()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()  # the child process needs the GPU memory this one keeps cached
    reloaded = _reload_in_fresh_process(pt2, data, device, args.batch)
    say(f"  reloaded program: {reloaded['dilated_nodes']} dilated nodes, accuracy {reloaded['accuracy']:.1%}, "
        f"max |logits - compiled model's logits| = {reloaded['max_abs_diff']:.2e} ({time.perf_counter() - t0:.1f} s)")

    total = time.perf_counter() - t_all
    say("\nsummary")
    rows = [("model", "attention (segments / rates)", "steps", "final loss", "accuracy")]
    for r in runs:
        rows.append((f"{r.name} (torch.compile)", f"{r.segments} / {r.rates}", str(r.steps),
                     f"{r.final_loss:.3f}", f"{r.accuracy:.1%}"))
    rows.append(("dilated, exported .pt2 reloaded", "same as dilated", "-", "-", f"{reloaded['accuracy']:.1%}"))
    rows.append(("chance", "-", "-", f"{torch.log(torch.tensor(float(NUM_KEYS))).item():.3f}", f"{1 / NUM_KEYS:.1%}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for j, row in enumerate(rows):
        say(("  " + "  ".join(c.ljust(w) for c, w in zip(row, widths))).rstrip())
        if j == 0:
            say("  " + "  ".join("-" * w for w in widths))
    tol = 1e-3 if device == "cpu" else 5e-2
    ok_export = reloaded["max_abs_diff"] <= tol and reloaded["dilated_nodes"] == args.layers
    say(f"  export round trip: {'ok' if ok_export else 'MISMATCH'} (max |diff| {reloaded['max_abs_diff']:.1e}, "
        f"tolerance {tol:g}); total time {total:.0f} s")
    if args.out is None:
        shutil.rmtree(out_dir, ignore_errors=True)
        say("  (files were in a temporary directory, now removed; pass --out DIR to keep the .pt2)")
    return {"dilated_accuracy": dilated.accuracy,
            "baseline_accuracy": runs[1].accuracy if len(runs) > 1 else None,
            "reloaded_accuracy": reloaded["accuracy"], "max_abs_diff": reloaded["max_abs_diff"],
            "dilated_nodes": nodes, "export_ok": ok_export, "seconds": total, "out_dir": out_dir}


def _copy(args, **changes):
    import argparse
    new = argparse.Namespace(**vars(args))
    for k, v in changes.items():
        setattr(new, k, v)
    return new
